"""Compressed chunks (spool schema 4): stored deflated, read back as sent, damage survived.

Real spools on real files; the client case aims at a loopback port, first down, then served by
the emulator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import sqlite3
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetrydeck_async._spool import (
    CODEC_DEFLATE,
    CODEC_NONE,
    DB_NAME,
    Destination,
    Spool,
    SpoolRecord,
    _deflate_isal,
    _deflate_stdlib,
    _pack_sizes,
    _salvage,
    checksum,
    decode_body,
    open_spool,
    split_chunk,
)
from telemetrydeck_async.devserver import IngestEmulator
from tests.helpers import SHORT_DEADLINE, balanced, free_port, spool_client, wait_until

#: Written by the spool code of schema 3 (commit 986652f) through ``open_spool``, ``append``
#: and ``append_now``, then closed and vacuumed: one one-signal row and one chunk of five.
SCHEMA_3_FILE = Path(__file__).parent / "data" / "schema3.sqlite3"
SCHEMA_3_DESTINATION = Destination("http://127.0.0.1:9/v2/namespace/com.example/", "A")
LOGGER = "telemetrydeck_async"


def fixture_body(i: int) -> bytes:
    """Signal ``i`` as the schema-3 file holds it (and as new rows here continue it)."""
    signal = {"appID": "A", "type": f"Fixture.signal{i}", "payload": {"n": str(i)}}
    return json.dumps(signal, separators=(",", ":")).encode()


def rows(spool_dir: Path) -> list[tuple[int, int, int]]:
    """(codec, count, size) of every row, oldest first, read by SQLite read-only."""
    uri = f"file:{spool_dir / DB_NAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        found = conn.execute("SELECT codec, count, size FROM records ORDER BY received_at, id")
        return [tuple(row) for row in found]


def write_compressed(spool: Spool, chunks: list[list[bytes]]) -> list[int]:
    """Each of ``chunks`` as one compressed row, one second apart, in one direct write; ids."""
    records = [
        SpoolRecord.chunk(1_800_000_000.0 + n, chunk, compress=True)
        for n, chunk in enumerate(chunks)
    ]
    results = spool.append_many_now(records)
    assert results is not None
    assert [r.codec for r in records] == [CODEC_DEFLATE] * len(chunks)
    return [result.ids[0] for result in results]


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(
        1
        for r in caplog.records
        if r.name == LOGGER and r.levelno >= logging.WARNING and text in r.getMessage()
    )


async def test_schema_3_file_of_the_previous_version_is_migrated_and_read_beside_new_rows(
    tmp_path: Path,
) -> None:
    """A file the schema-3 code wrote opens as schema 4: its rows come back as they were
    stored, in order with a compressed chunk written after the migration."""
    shutil.copy(SCHEMA_3_FILE, tmp_path / DB_NAME)
    spool = await open_spool(tmp_path, destination=SCHEMA_3_DESTINATION)
    try:
        assert (await spool.status()).records == 6
        later = [fixture_body(i) for i in range(6, 106)]
        written = spool.append_now(SpoolRecord.chunk(1_800_000_002.0, later, compress=True))
        assert written is not None
        assert written.stored == 100
        (old_one, old_chunk, new_chunk) = rows(tmp_path)
        assert old_one[:2] == (CODEC_NONE, 1)
        assert old_chunk[:2] == (CODEC_NONE, 5)
        assert new_chunk[:2] == (CODEC_DEFLATE, 100)
        assert new_chunk[2] < sum(map(len, later)) // 5, "stored compressed"
        claim = await spool.claim(1000)
        assert claim.bodies() == [fixture_body(i) for i in range(106)]
        await spool.ack(record_id for record_id, _ in claim.records)
        assert (await spool.status()).records == 0
    finally:
        await spool.close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=200), min_size=2, max_size=40),
    st.integers(min_value=1, max_value=20),
)
def test_a_chunk_compressed_or_not_gives_back_its_bodies(parts: list[bytes], times: int) -> None:
    """Any bodies, repetitive or not: the record gives them back, compressed only when that
    is shorter, and the length of the stored body tells which it is."""
    bodies = (parts * times)[: max(2, len(parts))]
    record = SpoolRecord.chunk(1.0, bodies, compress=True)
    plain = b",".join(bodies)
    assert record.bodies() == bodies
    assert record.wire_size == len(plain)
    assert record.crc == checksum(record.body, record.sizes)
    if record.codec == CODEC_DEFLATE:
        assert len(record.body) < len(plain)
    else:
        assert record.body == plain
    assert split_chunk(record.body, record.sizes) == bodies
    assert decode_body(record.body, record.sizes, record.codec) == plain


#: Both ways a chunk is compressed: the standard library's zlib, and ISA-L (the `fast` extra).
DEFLATERS = [
    pytest.param(_deflate_stdlib, id="stdlib"),
    pytest.param(
        _deflate_isal,
        id="isal",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("isal") is None, reason="isal (the fast extra) not installed"
        ),
    ),
]


@pytest.mark.parametrize("deflate", DEFLATERS)
@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=200), min_size=2, max_size=40),
    st.integers(min_value=1, max_value=20),
)
def test_either_deflater_writes_what_the_standard_library_reads(
    deflate: Callable[[bytes], bytes], parts: list[bytes], times: int
) -> None:
    """A chunk compressed by either is raw deflate that the stdlib's zlib (this version's
    reader and every older one's) inflates back to the joined bodies."""
    bodies = (parts * times)[: max(2, len(parts))]
    plain = b",".join(bodies)
    packed = deflate(plain)
    assert zlib.decompress(packed, -15) == plain
    assert decode_body(packed, _pack_sizes(bodies), CODEC_DEFLATE) == plain


@pytest.mark.parametrize("deflate", DEFLATERS)
def test_either_deflater_shrinks_a_chunk_of_telemetry_to_a_few_percent(
    deflate: Callable[[bytes], bytes],
) -> None:
    """A hundred signals of one app: one page on disk whichever compresses them."""
    plain = b",".join(text_row_body(i) for i in range(100))
    assert len(deflate(plain)) < len(plain) // 10
    assert len(deflate(plain)) < 4096


def test_a_damaged_compressed_body_never_decodes_to_other_bytes() -> None:
    """Cut short, lengthened or of an unknown codec: no body; a bit flipped: no body, or one
    the CRC of the stored bytes tells apart."""
    bodies = [fixture_body(i) for i in range(100)]
    record = SpoolRecord.chunk(1.0, bodies, compress=True)
    assert record.codec == CODEC_DEFLATE
    body, sizes = record.body, record.sizes
    assert decode_body(body[:-5], sizes, CODEC_DEFLATE) is None
    assert decode_body(body + b"\x00", sizes, CODEC_DEFLATE) is None
    assert decode_body(body, sizes, 7) is None
    for at in range(0, len(body), 7):
        flipped = body[:at] + bytes([body[at] ^ 0x10]) + body[at + 1 :]
        decoded = decode_body(flipped, sizes, CODEC_DEFLATE)
        assert decoded is None or checksum(flipped, sizes) != record.crc
    with pytest.raises(ValueError, match="does not decode"):
        split_chunk(body[:-5], sizes)


async def test_claims_count_bytes_as_sent_and_the_spool_as_stored(tmp_path: Path) -> None:
    """``status().bytes`` and ``max_bytes`` count the compressed size; a claim's byte budget
    counts the size a request carries."""
    spool = await open_spool(tmp_path)
    first = [fixture_body(i) for i in range(50)]
    second = [fixture_body(i) for i in range(50, 100)]
    records = [
        SpoolRecord.chunk(1_800_000_000.0, first, compress=True),
        SpoolRecord.chunk(1_800_000_001.0, second, compress=True),
        SpoolRecord.chunk(1_800_000_002.0, [fixture_body(100)]),
    ]
    try:
        await spool.append(records)
        assert (await spool.status()).bytes == sum(len(r.body) for r in records)
        sent_size = len(b",".join(first))
        claim = await spool.claim(1000, max_bytes=sent_size + 10)
        assert claim.bodies() == first, "two compressed chunks would fit; as sent, one does"
        rest = await spool.claim(1000)
        assert rest.bodies() == [*second, fixture_body(100)]
    finally:
        await spool.close()


async def test_damaged_compressed_rows_are_deleted_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two damaged rows (a flipped byte; bytes that do not inflate under a matching CRC) are
    left out of the claim, deleted and counted in ``damaged``, with one warning; the rows
    around them come back whole."""
    spool = await open_spool(tmp_path)
    chunks = [[fixture_body(100 * n + i) for i in range(20)] for n in range(4)]
    try:
        ids = write_compressed(spool, chunks)
        with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)) as db:
            body, sizes = db.execute(
                "SELECT body, sizes FROM records WHERE id = ?", (ids[1],)
            ).fetchone()
            flipped = body[:3] + bytes([body[3] ^ 0xFF]) + body[4:]
            db.execute("UPDATE records SET body = ? WHERE id = ?", (flipped, ids[1]))
            garbage = b"not deflate at all"
            db.execute(
                "UPDATE records SET body = ?, size = ?, crc = ? WHERE id = ?",
                (garbage, len(garbage), checksum(garbage, sizes), ids[2]),
            )
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            claim = await spool.claim(1000)
        assert claim.damaged == 40
        assert claim.bodies() == chunks[0] + chunks[3]
        assert warnings_about(caplog, "did not decode") == 1
        status = await spool.status()
        assert status.records == 40, "the damaged rows are gone, the claimed ones stay"
        await spool.ack(record_id for record_id, _ in claim.records)
        assert (await spool.status()).records == 0
    finally:
        await spool.close()


async def test_salvage_keeps_compressed_rows_whose_crc_matches_and_that_decode(
    tmp_path: Path,
) -> None:
    """Reading a damaged file page by page keeps compressed rows as they were stored and
    leaves out one whose CRC matches but whose bytes do not inflate."""
    spool = await open_spool(tmp_path)
    chunks = [[fixture_body(100 * n + i) for i in range(30)] for n in range(3)]
    try:
        bad_id = write_compressed(spool, chunks)[1]
    finally:
        await spool.close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)) as db:
        (sizes,) = db.execute("SELECT sizes FROM records WHERE id = ?", (bad_id,)).fetchone()
        garbage = b"\x00" * 40
        db.execute(
            "UPDATE records SET body = ?, size = ?, crc = ? WHERE id = ?",
            (garbage, len(garbage), checksum(garbage, sizes), bad_id),
        )
    found = _salvage(tmp_path / DB_NAME)
    assert [record.codec for record, _ in found] == [CODEC_DEFLATE, CODEC_DEFLATE]
    assert [record.bodies() for record, _ in found] == [chunks[0], chunks[2]]


async def test_spilled_chunks_are_stored_compressed_and_a_damaged_one_is_counted_dropped(
    tmp_path: Path,
) -> None:
    """A burst spilled by the client lands as compressed chunks; the next client sends them,
    and books a chunk damaged on disk meanwhile as dropped (spool_error); the books balance."""
    port = free_port()
    first = spool_client(
        f"http://127.0.0.1:{port}", tmp_path, max_queue_size=10, retry=SHORT_DEADLINE
    )
    await first.start()
    assert await wait_until(lambda: first._flusher.link.spool is not None)
    for i in range(1000):
        first.signal_nowait("Codec.burst", payload={"Test.id": i})
    await first.aclose(timeout=30)
    assert first.stats.dropped == {}
    assert first.stats.spooled == 1000
    stored = rows(tmp_path)
    chunked = [row for row in stored if row[0] == CODEC_DEFLATE]
    assert sum(row[1] for row in chunked) >= 900, "the overflow went to disk compressed"
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)) as db:
        victim, count, body = db.execute(
            "SELECT id, count, body FROM records WHERE codec = ? ORDER BY id LIMIT 1",
            (CODEC_DEFLATE,),
        ).fetchone()
        db.execute("UPDATE records SET body = ? WHERE id = ?", (b"\x00" + body, victim))
    async with IngestEmulator(port=port) as emulator:
        second = spool_client(emulator.base_url, tmp_path)
        await second.start()
        assert await wait_until(lambda: second.stats.recovered + count >= 1000)
        await second.aclose()
    assert second.stats.spool_dropped == {"spool_error": count}
    assert second.stats.recovered == 1000 - count
    assert len(emulator.distinct_ids()) == 1000 - count
    assert balanced(second.stats)


# --------------------------------------------------------------------------------------------
# Rows written by something else: TEXT where the spool writes blobs


def text_row_body(i: int) -> bytes:
    """Signal ``i`` as a client would have spooled it (the emulator accepts it)."""
    signal = {
        "appID": "spool-app",
        "clientUser": "0" * 64,
        "type": "Rows.text",
        "payload": {"Test.id": i},
    }
    return json.dumps(signal, separators=(",", ":")).encode()


def as_text(db_path: Path, record_id: int, column: str, hex_bytes: str) -> None:
    """Overwrite ``column`` of one row with TEXT that is not UTF-8, as only a foreign writer
    (a hand edit, another tool) could store it."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        db.execute(
            f"UPDATE records SET {column} = CAST(x'{hex_bytes}' AS TEXT) WHERE id = ?",
            (record_id,),
        )
        (kind,) = db.execute(f"SELECT typeof({column}) FROM records WHERE id = ?", (record_id,))
        assert kind == ("text",)


async def test_rows_holding_text_that_is_not_utf8_are_deleted_counted_and_claims_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A one-signal row and a chunk whose body is non-UTF-8 TEXT, and a chunk whose sizes is,
    no longer make every claim raise: the claim leaves them out, deletes and counts them
    (``damaged``), logs once, and hands out the rows around them; the next claim works."""
    spool = await open_spool(tmp_path)
    chunks = [[text_row_body(100 * n + i) for i in range(10)] for n in range(4)]
    try:
        chunk_ids = write_compressed(spool, chunks)
        single = await spool.append([SpoolRecord(1_800_000_100.0, text_row_body(999))])
        (single_id,) = single.ids
    finally:
        await spool.close()
    db_path = tmp_path / DB_NAME
    as_text(db_path, single_id, "body", "ff")
    as_text(db_path, chunk_ids[1], "body", "c3289f")
    as_text(db_path, chunk_ids[2], "sizes", "fffe")
    spool = await open_spool(tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            claim = await spool.claim(1000)
            again = await spool.claim(1000)
        assert claim.damaged == 10 + 10 + 1
        assert claim.bodies() == chunks[0] + chunks[3]
        assert again.records == ()
        assert again.damaged == 0
        assert warnings_about(caplog, "did not decode") == 1
        assert warnings_about(caplog, "transaction failed") == 0
        assert (await spool.status()).records == 20, "the three rows are gone"
    finally:
        await spool.close()


async def test_a_text_row_is_dropped_as_spool_error_and_the_rest_is_recovered(
    tmp_path: Path,
) -> None:
    """Through the client: recovery is not stuck on a non-UTF-8 TEXT body; that chunk's signals
    are counted dropped (spool_error), every other spooled signal is delivered; books balance."""
    async with IngestEmulator() as emulator:
        url = f"{emulator.base_url}/v2/namespace/com.example/"
        spool = await open_spool(tmp_path, destination=Destination(url, "spool-app"))
        chunks = [[text_row_body(100 * n + i) for i in range(50)] for n in range(3)]
        try:
            bad_id = write_compressed(spool, chunks)[1]
        finally:
            await spool.close()
        as_text(tmp_path / DB_NAME, bad_id, "body", "ff00ff")
        client = spool_client(emulator.base_url, tmp_path)
        await client.start()
        try:
            assert await wait_until(lambda: client.stats.recovered >= 100)
            assert await wait_until(lambda: client.stats.spool_dropped != {})
        finally:
            await client.aclose()
        assert client.stats.spool_dropped == {"spool_error": 50}
        assert client.stats.recovered == 100
        expected = {100 * n + i for n in (0, 2) for i in range(50)}
        assert emulator.distinct_ids() == expected
        assert balanced(client.stats)
