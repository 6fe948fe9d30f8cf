"""The on-disk spool: unsent signals kept in SQLite so they survive restarts, crashes and outages.

Several processes may share one spool directory (the workers of one gunicorn/uvicorn app);
they coordinate through SQLite's locking and the ownership protocol below, never through
each other.

On-disk format
--------------
One directory (created with mode 0700) holds::

    spool.sqlite3        the database (mode 0600), in WAL mode
    spool.sqlite3-wal    the write-ahead log (0600), present while the database is in use
    spool.sqlite3-shm    the WAL index (0600), present while the database is in use
    spool.lock           an advisory lock (flock), held only while opening or repairing the database
    spool.sqlite3.corrupt-<UTC time>-<pid>-<tag>[-wal|-shm]
                         a damaged database moved aside, kept for inspection

Schema (``PRAGMA user_version`` = 4)::

    records(id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, see below
            received_at REAL,     -- unix seconds of the (oldest) signal's receivedAt: FIFO, expiry
            size INTEGER,         -- len(body) as stored; the spool's size is the sum of these
            crc INTEGER,          -- crc32 of body as stored, then sizes: salvage keeps only
                                  -- rows that match
            owner TEXT NULL,      -- NULL = pending; else the owner id of the process sending it
            adopted INTEGER,      -- 1 = taken from a dead owner and not claimed since
            body BLOB,            -- the signals' JSON objects, UTF-8, joined by b","
            dest INTEGER NULL,    -- destinations.id; NULL = written by schema 1, nobody's yet
            count INTEGER,        -- how many signals body holds (1 for every row of schema 1, 2)
            sizes BLOB NULL,      -- count > 1: each signal's length, uint32 little-endian
            codec INTEGER)        -- 0: body as it is; 1: a chunk's body compressed (deflate)
    index records_by_age(received_at, id)         -- eviction (any destination), status
    index records_by_dest(dest, received_at, id)  -- claims and expiry of one destination
    destinations(id INTEGER PRIMARY KEY, url TEXT, app_id TEXT, UNIQUE (url, app_id))
    owners(owner TEXT PRIMARY KEY, pid, hostname, lease, started_at, heartbeat_at, closed)
    totals(id = 0, records, bytes)   -- signals and body bytes, kept by every insert/delete,
                                     -- recounted at each open
    meta(key, value)                 -- 'first_id': where ids of this file start (for salvage)

Only what the caller hands in is stored: bodies arrive encoded, with the user id already hashed.

Chunks: one row may hold many signals (a *chunk*, :meth:`SpoolRecord.chunk`): their bodies
joined by commas, i.e. the inside of a request's JSON array, and their lengths. A row costs one
insert, one claim and one delete however many signals it holds, which is what lets a spill or a
recovery run at network speed; the client makes each chunk at most one batch (``batch_size``
signals and the batch byte budget), so a claimed chunk is a ready request. A chunk is claimed,
expired (by its oldest signal's time) and evicted whole; counts (``totals``, ``status``) are
signals. Schema 1 and 2 files are migrated in place (two ``ALTER TABLE``): their rows are
one-signal rows.

Compression: the client stores the chunks it spills compressed (``codec`` 1, raw deflate
at zlib's level 1:
a hundred signals of one app repeat most of their bytes, so a chunk shrinks to a few percent
for about a microsecond per signal), which makes each commit one page instead of a chain of
overflow pages. ``size``, ``max_bytes`` and the totals count bytes as stored; the byte budget
of a claim counts them as sent. Claims decompress in the spool's thread and hand out the
signals as they go on the wire; a row that does not decompress to what its ``sizes`` says, or
whose ``body`` or ``sizes`` is not a blob (TEXT from another writer, which SQLite would hand
out as a string or fail to decode), is deleted, logged and counted (``ClaimResult.damaged``).
Schema 3 files are migrated in place (one ``ALTER TABLE``): their rows are stored as they are.

Destinations: several apps may (by mistake or on purpose) share one directory. A spool opened
with a :class:`Destination` (the endpoint URL, namespace included, and the app ID) tags every
record it stores with it and claims and expires only records of that destination, so one
app's signals never go to another app's namespace. Schema 1 files are migrated in place (one
``ALTER TABLE``); their records have no destination and are given to the first spool that
opens the file with one. A spool opened without a destination (the CLI's ``status``) claims
records of any destination.

Record ids are never reused (``AUTOINCREMENT``) and a fresh file starts counting at the current
time in microseconds, so an id held by a process from before a crash or a repair can never
name a different, newer record: a late ``ack`` is at worst a no-op.

Durability modes
----------------
``"spill"`` (default): signals are written only when they could not be sent in time.
``synchronous=NORMAL``: a commit survives the process being killed; the worker thread runs
``wal_checkpoint(PASSIVE)`` every second or so while there were writes, which is also when
the WAL reaches the disk, so a power cut loses at most about the last second.

``"always"``: every signal is written (``append(..., claimed=True)``) before it is sent and
deleted when the server accepted it. ``synchronous=FULL``: each commit is fsynced.

In both modes appends that arrive while the worker thread is busy are committed together in
one transaction (group commit): many concurrent ``await spool.append(...)`` share one fsync.

Threading
---------
All SQLite work runs in one dedicated thread per :class:`Spool` that owns the connection
(sqlite3 connections must stay in one thread). Coroutines put jobs on a queue and await a
future; the thread drains every queued job, runs them in one ``BEGIN IMMEDIATE`` transaction,
commits, and only then hands the results back -- one ``call_soon_threadsafe`` per event loop
and batch. The event loop never waits for the disk. ``ack`` and ``release`` are write-behind:
they return once queued and ride along in the next transaction (this spool applies them
before anything queued later; ``close`` waits for them).

One exception, for durability "spill": :meth:`Spool.append_now` commits a record in the
calling thread (the event loop's), on a second connection the worker opens for it, in one
short transaction that never waits (busy, a nearly full disk: the caller hands the record to
the worker instead). Beside an event loop that runs Python without a break, every SQLite call
of the worker waits up to the interpreter's switch interval (5 ms) to take the GIL back; a
write on the loop's own thread waits for nobody. No connection checkpoints inside a commit
(``wal_autocheckpoint = 0``): the worker does, about once a second while there are writes,
those of the direct connection included.

Nothing here ever open()s the database file itself: closing any descriptor of a file drops
all of this process's POSIX locks on it, including the one that tells other processes a WAL
connection is still using the file (see :func:`_make_private_file`).

Ownership and leases
--------------------
Each open :class:`Spool` is an *owner*: a random id with its pid, hostname, lease and a
heartbeat time in ``owners``. Write transactions renew the heartbeat (at most every
``lease / 10``), and the client calls :meth:`Spool.heartbeat` every ``lease / 3`` seconds.
A record is pending (``owner IS NULL``) or claimed by one owner. An owner is *dead* when

* it was closed (:meth:`Spool.close` marks it), or
* its heartbeat is older than its own lease, or
* it runs on this hostname and its pid no longer exists (or is a zombie).

:meth:`Spool.claim` runs in one ``BEGIN IMMEDIATE`` transaction -- one writer at a time across
all processes -- and first hands every dead owner's records back to the pending pool (marked
``adopted``) and deletes the dead owner's row, then deletes expired pending records, then
marks the oldest pending records as its own. So a record is taken over exactly once, and two
live processes never hold the same record. A process that stalls for longer than its lease
may lose its records to another process; both may then send them: delivery is at least once.

``close()`` does not release the records this process still holds: it marks the owner closed,
which makes them adoptable at once by the next claim of any process (counted as ``adopted``),
while ``status`` can still show what a process left in flight.

Fork: a :class:`Spool` belongs to the process that opened it. In a forked child every method
raises :class:`SpoolError` (``close()`` only forgets the object); open a new spool in the child.

Disk trouble never crashes the app: a damaged database is moved aside and a fresh one started
with whatever rows could still be read; a directory that cannot be used leaves the spool
``disabled`` (memory-only); failed writes are counted (``AppendResult.failed``) and logged
once per minute and kind through the ``telemetrydeck_async`` logger.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import logging
import math
import os
import queue
import secrets
import socket
import sqlite3
import struct
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

import attrs

from ._stats import RateLimitedLog
from .exceptions import ConfigurationError, SpoolError

try:  # the `fast` extra: ISA-L's deflate for the spilled chunks (see ``compress_chunk``)
    from isal import isal_zlib as _isal_zlib
except ImportError:  # the standard library's zlib then
    _isal_zlib = None  # type: ignore[assignment]  # reason: optional module, checked before use

try:  # POSIX only; elsewhere the open-time lock is skipped (SQLite's own locking still applies)
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]  # reason: optional module, checked before use

__all__ = [
    "AppendResult",
    "ClaimResult",
    "Destination",
    "DestinationInfo",
    "OwnerInfo",
    "Spool",
    "SpoolRecord",
    "SpoolStatus",
    "open_spool",
]

_log = logging.getLogger("telemetrydeck_async")

_T = TypeVar("_T")

DB_NAME: Final = "spool.sqlite3"
LOCK_NAME: Final = "spool.lock"
#: Seconds an owner counts as alive after its last heartbeat, unless ``open_spool`` is told
#: otherwise; the client renews it a few times within (see ``_spool_link``).
DEFAULT_LEASE: Final = 30.0
_SCHEMA_VERSION: Final = 4
#: How long one statement waits for another process's write lock before it fails.
_BUSY_TIMEOUT: Final = 5.0
#: Seconds between passive WAL checkpoints while there are writes ("spill"'s durability window).
_CHECKPOINT_INTERVAL: Final = 1.0
#: At most this many queued jobs share one transaction, so one commit never grows without bound.
_MAX_JOBS_PER_TRANSACTION: Final = 1024
#: ... and at most about this many bytes of appended bodies. Large, because beside a caller that
#: never yields each statement costs up to the interpreter's switch interval (5 ms) to get the
#: GIL back: few statements per megabyte are what lets the disk absorb a burst while it happens.
#: Well under the client's overflow bound (32 MiB), which counts what is being written.
_MAX_TRANSACTION_BYTES: Final = 8 * 2**20
#: Body bytes bound in one INSERT. SQLite copies every bound blob while the worker holds the GIL:
#: a megabyte is a fraction of a millisecond, so the event loop never waits long for it.
_MAX_STATEMENT_BYTES: Final = 2**20
#: crc32 is computed over slices of this size: ``zlib`` lets go of the GIL for longer inputs,
#: and beside a busy event loop taking it back costs up to the switch interval.
_CRC_SLICE: Final = 4096
#: A direct write (``Spool.append_now``) that took longer than this (seconds) found the disk
#: busy: a write() on ext4 may wait tens of milliseconds for a journal commit that some fsync
#: (of any process) started. The event loop must not wait like that again soon, so for
#: ``_DIRECT_PAUSE`` seconds the worker thread, which may wait, takes every write.
_DIRECT_SLOW: Final = 0.002
_DIRECT_PAUSE: Final = 1.0
#: Seconds a reading of plenty of free disk space is reused (see ``_Store.tight``).
_ROOM_REUSE: Final = 1.0
#: The same problem is logged at most once per this many seconds.
_LOG_INTERVAL: Final = 60.0
#: Keep the WAL file from staying huge after a burst.
_JOURNAL_SIZE_LIMIT: Final = 8 * 2**20
_SQL_VARIABLES_PER_STATEMENT: Final = 500
#: Variables per statement where the limit cannot be asked (SQLite's default before 3.32).
_OLD_VARIABLE_LIMIT: Final = 999


def _variable_limit(conn: sqlite3.Connection) -> int:
    """How many ``?`` one statement may hold (``getlimit`` exists from Python 3.11)."""
    getlimit = getattr(conn, "getlimit", None)
    category = getattr(sqlite3, "SQLITE_LIMIT_VARIABLE_NUMBER", None)
    if getlimit is None or category is None:
        return _OLD_VARIABLE_LIMIT
    limit: int = getlimit(category)
    # Very long statements cost more to parse than they save: a few thousand rows is plenty.
    return min(limit, 30_000)


_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_NOTADB: Final = 26
#: Disk space kept free for the spool's own bookkeeping (claims, acks, heartbeats and the
#: checkpoint that moves the WAL into the database) once the filesystem is nearly full.
_DISK_RESERVE: Final = 256 * 1024
#: Bytes of pages one byte of body costs at most (row header, two index entries, page fill).
#: Pessimistic on purpose: too high evicts a little early, too low lets SQLite hit ENOSPC.
_PAGE_FACTOR: Final = 2.0
#: Below this much free disk (beyond what a transaction needs) the spool watches every write.
_TIGHT_DISK: Final = 16 * 2**20


# --------------------------------------------------------------------------------------------
# Values


@attrs.frozen
class Destination:
    """Where the records of one spool go: the endpoint URL (namespace included) and app ID.

    ``url`` is the client's ``endpoint_url``, e.g. ``http://host/v2/namespace/com.example/``.
    """

    url: str
    app_id: str


@attrs.frozen
class DestinationInfo:
    """How many records one destination has in the spool (``status(by_destination=True)``).

    ``destination`` is None for records that have none (written by an older version, or
    salvaged from a file whose destination rows were damaged).
    """

    destination: Destination | None
    records: int
    bytes: int


#: How a row's ``body`` is stored (``records.codec``, schema 4): as it is, or compressed with
#: raw deflate (:func:`compress_chunk`). A reader that finds another value treats the row as
#: damaged.
CODEC_NONE: Final = 0
CODEC_DEFLATE: Final = 1
#: zlib's ``memLevel`` for :func:`compress_chunk` (its default is 8): each compression object
#: clears a hash table of ``2 ** (memLevel + 8)`` bytes when it starts, 64 KiB at the default,
#: more than the instructions of compressing a whole chunk of a hundred signals at level 1;
#: 4 KiB at 4. The matches of repetitive telemetry are found as well (measured: 1,289 instead
#: of 1,276 bytes for a 58 KB chunk, a tenth fewer instructions, about half the time). The
#: stream is plain raw deflate either way: any reader (older versions too) inflates it.
_DEFLATE_MEMORY: Final = 4


def checksum(body: bytes, sizes: bytes | None = None) -> int:
    """The CRC a row carries: crc32 of ``body``, continued over ``sizes`` for a chunk.

    Computed a few KiB per call: ``zlib`` releases the GIL for longer inputs, and a thread that
    lets go of it beside a busy event loop waits up to the switch interval to get it back.
    """
    crc = 0
    view = memoryview(body)
    for start in range(0, len(view), _CRC_SLICE):
        crc = zlib.crc32(view[start : start + _CRC_SLICE], crc)
    return crc if sizes is None else zlib.crc32(sizes, crc)


def _pack_sizes(bodies: Sequence[bytes]) -> bytes:
    sizes = array.array("I", map(len, bodies))
    if sys.byteorder == "big":  # pragma: no cover - the file format is little-endian
        sizes.byteswap()
    return sizes.tobytes()


def _unpack_sizes(sizes: bytes) -> array.array[int]:
    lengths = array.array("I")
    lengths.frombytes(sizes)
    if sys.byteorder == "big":  # pragma: no cover
        lengths.byteswap()
    return lengths


def _plain_length(sizes: bytes) -> int | None:
    """The length of the joined signals ``sizes`` describes (commas between them); None when
    ``sizes`` cannot be a chunk's."""
    if len(sizes) < 8 or len(sizes) % 4:
        return None
    lengths = _unpack_sizes(sizes)
    return sum(lengths) + len(lengths) - 1


def _chunk_is_consistent(body: bytes, sizes: bytes | None) -> bool:
    """Whether ``sizes`` cuts ``body`` into its signals exactly (commas between them)."""
    return sizes is None or _plain_length(sizes) == len(body)


def compress_chunk(plain: bytes) -> bytes | None:
    """``plain`` (a chunk's joined signals) compressed for storage, or None when that would
    not make it smaller.

    Raw deflate (level 1, no zlib header; ISA-L's when the `fast` extra is installed, else the
    standard library's zlib, both read back by the latter): a chunk of a hundred
    signals of one app repeats its keys, app ID, session and SDK keys in every signal, so even
    the fastest level keeps a few percent of it (58 KB -> 1.2 KB in the benchmark) for about
    a third of a microsecond per signal. Fewer bytes make the commit cheaper (one page instead
    of an overflow chain of fifteen), wait less on the disk's journal, and fit more signals in
    ``max_bytes``. Raw, because the zlib format's own adler32 over the uncompressed bytes
    would cost as much again: the row's CRC covers the stored bytes, and decompression checks
    the length (:func:`decode_body`).
    """
    packed = _deflate(plain)
    return packed if len(packed) < len(plain) else None


def _deflate_stdlib(plain: bytes) -> bytes:
    deflate = zlib.compressobj(1, zlib.DEFLATED, -15, _DEFLATE_MEMORY)
    return deflate.compress(plain) + deflate.flush()


def _deflate_isal(plain: bytes) -> bytes:
    return _isal_zlib.compress(plain, 1, -15)


#: ISA-L's level 1 when the `fast` extra (isal) is installed: the same format (raw deflate, read
#: by the standard library's zlib like any other), as small for telemetry (1,287 bytes for a
#: 58 KB chunk), for a third of the instructions (callgrind: 154,000 instead of 408,000 per
#: chunk of a hundred signals; 2,500 fewer per spilled signal through the client).
_deflate: Callable[[bytes], bytes] = _deflate_stdlib if _isal_zlib is None else _deflate_isal


def decode_body(body: bytes, sizes: bytes | None, codec: int) -> bytes | None:
    """A stored row's joined signals as they go on the wire; None when the row is damaged
    (an unknown codec, data that does not decompress, or not to the length ``sizes`` says).

    Decompression stops one byte past the expected length, so a damaged row can never make
    it allocate more than its own signals would take.
    """
    if codec == CODEC_NONE:
        return body if _chunk_is_consistent(body, sizes) else None
    if codec != CODEC_DEFLATE or sizes is None:
        return None
    expected = _plain_length(sizes)
    if expected is None:
        return None
    inflate = zlib.decompressobj(-15)
    try:
        plain = inflate.decompress(body, expected + 1)
    except zlib.error:
        return None
    if len(plain) != expected or not inflate.eof or inflate.unused_data:
        return None
    return plain


def split_chunk(body: bytes, sizes: bytes | None, codec: int | None = None) -> list[bytes]:
    """The signal bodies of one stored row (a chunk's, or the one signal's).

    ``codec`` is how ``body`` is stored; None: as its length says. A chunk's body is stored
    compressed only when that is shorter (:func:`compress_chunk`), so one shorter than its
    signals is compressed, and one exactly as long is not. Raises ValueError for a body that
    does not decode to the signals ``sizes`` describes.
    """
    if sizes is None:
        return [body]
    if codec is None:
        codec = CODEC_NONE if _plain_length(sizes) == len(body) else CODEC_DEFLATE
    if codec != CODEC_NONE:
        plain = decode_body(body, sizes, codec)
        if plain is None:
            raise ValueError("a chunk's body does not decode to the signals its sizes describe")
        body = plain
    out = []
    pos = 0
    for length in _unpack_sizes(sizes):
        out.append(body[pos : pos + length])
        pos += length + 1
    return out


@attrs.frozen
class SpoolRecord:
    """One row to store: one signal, or a chunk of many (:meth:`chunk`).

    Bodies are already validated, encoded, and carry only a hashed user id. ``received_at`` is
    the unix time (seconds) of the signal's ``receivedAt`` (a chunk's oldest); it decides the
    order records are claimed in and when they expire. ``body`` is the signal's JSON object,
    UTF-8 encoded: what goes inside the request's JSON array; a chunk's bodies are joined by
    commas and ``sizes`` holds their lengths. ``codec`` says how ``body`` is stored:
    :data:`CODEC_NONE`, as it is, or :data:`CODEC_DEFLATE`, a chunk's joined bodies compressed
    (:func:`compress_chunk`). The spool stores ``body`` verbatim. ``crc``, when given, is
    :func:`checksum` of ``body`` (as stored) and ``sizes`` (the caller may compute it where it
    is cheapest); otherwise the spool computes it.
    """

    received_at: float
    body: bytes
    sizes: bytes | None = None
    crc: int | None = None
    codec: int = 0

    @classmethod
    def chunk(
        cls,
        received_at: float,
        bodies: Sequence[bytes],
        *,
        compress: bool = False,
        joined: bytes | None = None,
    ) -> SpoolRecord:
        """One row holding ``bodies`` (one or more encoded signals), checksum included.

        ``compress``: store a chunk of several compressed (:func:`compress_chunk`) when that
        makes it smaller. ``joined``: ``bodies`` joined by commas, when the caller has it.
        """
        if len(bodies) == 1:
            return cls(received_at, bodies[0], None, checksum(bodies[0]))
        body = b",".join(bodies) if joined is None else joined
        sizes = _pack_sizes(bodies)
        if compress and (packed := compress_chunk(body)) is not None:
            return cls(received_at, packed, sizes, checksum(packed, sizes), CODEC_DEFLATE)
        return cls(received_at, body, sizes, checksum(body, sizes))

    @property
    def count(self) -> int:
        """How many signals this row holds."""
        return 1 if self.sizes is None else len(self.sizes) // 4

    @property
    def wire_size(self) -> int:
        """The length of the joined signals as they are sent (``body`` decompressed)."""
        if self.codec == CODEC_NONE or self.sizes is None:
            return len(self.body)
        return _plain_length(self.sizes) or 0

    def bodies(self) -> list[bytes]:
        """The signal bodies, one per signal (ValueError for a body that does not decode)."""
        return split_chunk(self.body, self.sizes, self.codec)


@attrs.frozen
class AppendResult:
    """What :meth:`Spool.append` did.

    ``ids`` are the ids of the stored records (rows) in the order given. When the spool is
    full they are the ids of the *last* ``len(ids)`` records given: a batch larger than
    ``max_bytes`` (or than what a nearly full disk can take) on its own loses its first (oldest)
    records, whose signals are counted in ``rejected``. On a disk error nothing of the batch is
    stored and ``failed`` counts all its signals. ``evicted`` counts the signals of older
    records (of any owner) deleted to stay within ``max_bytes`` or the disk. The caller reports
    ``rejected`` and ``evicted`` as dropped ("spool_full"): the first were never spooled, the
    second had been. Every count but ``ids`` is in signals (a chunk counts all it holds):
    ``stored + failed + rejected`` is always the number of signals given.
    """

    ids: tuple[int, ...]
    failed: int
    evicted: int
    rejected: int = 0
    #: Signals stored (``len(ids)`` when every record holds one).
    stored: int = 0


@attrs.frozen
class ClaimResult:
    """What :meth:`Spool.claim` took.

    ``records`` are ``(id, body)`` pairs, oldest ``received_at`` first, now owned by the caller:
    ``ack`` them once delivered (or finally dropped), ``release`` them to give them back.
    ``sizes`` goes with them, one entry per record: None for a one-signal record, else the
    chunk's packed lengths (:func:`split_chunk` cuts it). ``expired`` counts the signals of
    pending records deleted because they were older than ``max_age`` (the caller reports them
    as dropped, "expired"); ``adopted`` says how many of ``records`` were taken over from an
    owner that died or closed. Bodies come as they go on the wire (decompressed). ``damaged``
    counts the signals of records deleted because their body did not decode (the caller
    reports them as dropped, "spool_error"); like ``expired``, only the first result of a
    claim carries it.
    """

    records: tuple[tuple[int, bytes], ...]
    expired: int
    adopted: int
    sizes: tuple[bytes | None, ...] = ()
    damaged: int = 0

    @property
    def signals(self) -> int:
        """How many signals the claimed records hold."""
        return sum(1 if sizes is None else len(sizes) // 4 for sizes in self.sizes) or len(
            self.records
        )

    def bodies(self) -> list[bytes]:
        """Every claimed signal's body, in order."""
        if not self.sizes:
            return [body for _, body in self.records]
        return [
            part
            for (_, body), sizes in zip(self.records, self.sizes, strict=True)
            for part in split_chunk(body, sizes)
        ]


@attrs.frozen
class OwnerInfo:
    """One process (one open :class:`Spool`) known to the spool, for ``status``.

    ``alive`` is the judgement of the process that asked: an owner that is not alive has its
    records taken over by the next claim.
    """

    owner_id: str
    pid: int
    hostname: str
    heartbeat_at: float
    claimed: int
    closed: bool
    alive: bool


@attrs.frozen
class SpoolStatus:
    """A snapshot of the spool for ``telemetrydeck-async spool status DIR`` and client stats.

    ``records`` and ``bytes`` count every stored record (pending and claimed); ``bytes`` is the
    sum of body sizes, the figure ``max_bytes`` limits (the file is somewhat larger).
    ``disabled`` is true when the spool could not be used and the client runs memory-only.
    ``error`` is set when the spool could not be read just now (the figures are then zeros
    and mean nothing: *unknown*, never *empty*). ``destinations`` is filled only when asked
    for (``status(by_destination=True)``): it costs a scan of the table.
    """

    records: int
    bytes: int
    oldest_received_at: float | None
    newest_received_at: float | None
    owners: tuple[OwnerInfo, ...]
    path: str
    disabled: bool = False
    error: str | None = None
    destinations: tuple[DestinationInfo, ...] = ()


@attrs.frozen(kw_only=True)
class _Settings:
    """Everything the worker thread and ``append_sync`` need, fixed at open."""

    directory: Path
    max_bytes: int
    max_age: float
    durability: Literal["spill", "always"]
    lease: float
    clock: Callable[[], float]
    owner_id: str
    pid: int
    hostname: str
    destination: Destination | None = None

    @property
    def db_path(self) -> Path:
        return self.directory / DB_NAME


# --------------------------------------------------------------------------------------------
# Schema

#: What schema 2 added to schema 1 (besides ``records.dest``); also run by the migration.
_DESTINATION_SCHEMA: Final = (
    # A second index: without it a claim would walk past every record of other destinations.
    "CREATE INDEX IF NOT EXISTS records_by_dest ON records (dest, received_at, id)",
    """CREATE TABLE IF NOT EXISTS destinations (
        id     INTEGER PRIMARY KEY,
        url    TEXT NOT NULL,
        app_id TEXT NOT NULL,
        UNIQUE (url, app_id)
    )""",
)
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS records (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at REAL    NOT NULL,
        size        INTEGER NOT NULL,
        crc         INTEGER NOT NULL,
        owner       TEXT,
        adopted     INTEGER NOT NULL DEFAULT 0,
        body        BLOB    NOT NULL,
        dest        INTEGER,
        count       INTEGER NOT NULL DEFAULT 1,
        sizes       BLOB,
        codec       INTEGER NOT NULL DEFAULT 0
    )""",
    # One index serves FIFO claims (filtering owner IS NULL while walking it), expiry, eviction
    # and min/max for status. An owner index would make every insert and claim more expensive
    # to speed up only rare events (taking over a dead owner, closing, status).
    "CREATE INDEX IF NOT EXISTS records_by_age ON records (received_at, id)",
    """CREATE TABLE IF NOT EXISTS owners (
        owner        TEXT    PRIMARY KEY,
        pid          INTEGER NOT NULL,
        hostname     TEXT    NOT NULL,
        lease        REAL    NOT NULL,
        started_at   REAL    NOT NULL,
        heartbeat_at REAL    NOT NULL,
        closed       INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS totals (
        id      INTEGER PRIMARY KEY CHECK (id = 0),
        records INTEGER NOT NULL,
        bytes   INTEGER NOT NULL
    )""",
    # Not triggers: a per-row trigger costs a quarter of the claim+ack throughput, while the
    # code knows the sizes it inserts and deletes anyway.
    "INSERT OR IGNORE INTO totals (id, records, bytes) VALUES (0, 0, 0)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    *_DESTINATION_SCHEMA,
)
#: What schema 3 added to schema 2: a record may hold a chunk of signals.
_CHUNK_MIGRATION: Final = (
    "ALTER TABLE records ADD COLUMN count INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE records ADD COLUMN sizes BLOB",
)
#: What schema 4 added to schema 3: a chunk's body may be stored compressed.
_CODEC_MIGRATION: Final = ("ALTER TABLE records ADD COLUMN codec INTEGER NOT NULL DEFAULT 0",)
_RECORD_COLUMNS: Final = (
    "id",
    "received_at",
    "size",
    "crc",
    "owner",
    "adopted",
    "body",
    "dest",
    "count",
    "sizes",
    "codec",
)


class _CorruptError(Exception):
    """The database file is damaged (or not a database at all)."""


class _IncompatibleError(Exception):
    """The database was written by a newer version of this package, or by something else."""


# --------------------------------------------------------------------------------------------
# Helpers


def _is_corruption(exc: BaseException) -> bool:
    """Whether an error means the file is damaged, not merely busy, full or unwritable."""
    if isinstance(exc, _CorruptError):
        return True
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "corrupt" in text


def _is_full(exc: BaseException) -> bool:
    """Whether an error means the disk (or SQLite's page limit) is full."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if isinstance(code, int):
        return code & 0xFF == _SQLITE_FULL
    return isinstance(exc, sqlite3.Error) and "full" in str(exc).lower()


def _free_space(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the directory's filesystem, if known."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs (Windows), or the directory is gone
        return None
    return st.f_bavail * st.f_frsize


@attrs.define
class _Room:
    """What one write transaction may still use of a nearly full disk (reserve taken off).

    New pages cost disk twice: as WAL frames now, and as growth of the database file when
    the checkpoint copies them in, except where they reuse the file's free pages (which
    evicting in the same transaction adds to).
    """

    free: float
    freelist: float

    def excess(self, incoming: int) -> float:
        """Body bytes to evict so that ``incoming`` body bytes fit on the disk."""
        pages = _PAGE_FACTOR * incoming
        return pages + max(0.0, pages - self.freelist) - self.free

    def fits(self, incoming: int, evictable: int) -> bool:
        """Whether evicting at most ``evictable`` body bytes makes room for ``incoming``."""
        return _PAGE_FACTOR * incoming <= self.free and self.excess(incoming) <= evictable

    def use(self, incoming: int) -> None:
        self.free -= _PAGE_FACTOR * incoming


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (and is not a zombie)."""
    if os.name != "posix":
        # os.kill() would *terminate* the process on Windows; rely on the lease there.
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists and belongs to someone else
        return True
    # A killed worker stays a zombie until its parent reaps it; it will never heartbeat again.
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return True
    state = data[data.rfind(b")") + 2 : data.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file now at ``path``; another process's repair changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _is_empty_file(path: Path) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False


def _make_private_dir(directory: Path) -> None:
    """Create the spool directory with mode 0700 (an existing directory is left as it is)."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory") from None
    else:
        # mkdir's mode is filtered by the umask; chmod is not. Changing the process umask
        # instead would race with every other thread creating files.
        os.chmod(directory, 0o700)


def _make_private_file(path: Path) -> None:
    """Create ``path`` as 0600 before SQLite does, and tighten the modes of its companions.

    SQLite gives the -wal and -shm files the mode of the database file, so creating the
    database 0600 ourselves covers them too; the chmod loop catches files left by older runs.

    Never open() an *existing* database file here: closing any descriptor of a file drops
    every POSIX lock this process holds on it, including the SHARED lock a WAL connection in
    this process keeps for its lifetime. Another process closing its connection would then
    think it was the last one and delete the WAL under us (SQLite's "how to corrupt" 2.2).
    O_EXCL only ever opens a file that did not exist, so no lock of ours can be on it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, flags, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):  # missing, or owned by another user: leave it
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


@contextlib.contextmanager
def _directory_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` while a process opens or repairs the database.

    Without it two workers starting together could both find the file damaged and the second
    would move aside the fresh file the first just made. Waiting is bounded: after 30 s we go
    ahead unlocked rather than hang a worker's startup behind a stuck process.
    """
    if _fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        deadline = time.monotonic() + 30.0
        locked = False
        while not locked:
            try:
                _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    _log.warning("spool lock %s is held for too long; opening without it", path)
                    break
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class _Reporter:
    """Logs each kind of spool problem at most once a minute (``RateLimitedLog``), and once
    when writes succeed again."""

    def __init__(self) -> None:
        self._log = RateLimitedLog(interval=_LOG_INTERVAL)
        self._failing = False

    def problem(
        self, key: str, level: int, msg: str, *args: object, exc: BaseException | None = None
    ) -> None:
        self._failing = True
        self._log.log(level, key, msg, *args, exc_info=exc)

    def success(self, path: Path) -> None:
        if self._failing:  # a stale read in another thread only delays one INFO line
            self._failing = False
            _log.info("spool %s: writes succeed again", path)


# --------------------------------------------------------------------------------------------
# The SQLite side: used by exactly one thread at a time


class _Store:
    """One SQLite connection to the spool and the operations on it.

    Not thread-safe by design: the worker thread owns one instance, ``append_sync`` makes its
    own short-lived one. Methods named like spool operations expect to run inside
    :meth:`transaction`.
    """

    def __init__(self, settings: _Settings, reporter: _Reporter) -> None:
        self.settings = settings
        self.reporter = reporter
        self.path = settings.db_path
        self.conn: sqlite3.Connection | None = None
        self.identity: tuple[int, int] | None = None
        self.dirty = False
        self.last_checkpoint = time.monotonic()
        self.last_heartbeat = -math.inf
        # destinations.id of settings.destination in the open file; None until first needed
        # (and again after a rollback, which may have undone the row it names).
        self.dest_id: int | None = None
        # Set before a write transaction while the disk is nearly full; None: plenty of room.
        self.room: _Room | None = None
        # The last "plenty" reading of free space (less what was written since), and until
        # when it may be reused (see ``tight``).
        self.roomy = 0.0
        self.roomy_until = -math.inf

    # -- opening, repairing, closing

    def open(self) -> None:
        """Open (creating or repairing as needed) and register this owner."""
        _make_private_dir(self.settings.directory)
        with _directory_lock(self.settings.directory / LOCK_NAME):
            try:
                if _is_empty_file(self.path):
                    # Every writer puts the header in before it lets go of the lock, so an
                    # empty file was cut short by something else: moved aside like damage.
                    raise _CorruptError("the file is empty (zero length)")
                conn = self.connect(check=True)
            except _CorruptError as exc:
                conn = self._repair(str(exc))
            self.conn = conn
            self.identity = _file_identity(self.path)
            self.dest_id = None
            self.measure_room(0)
            try:
                self._register()
            except sqlite3.Error as exc:
                if not _is_full(exc):
                    raise
                # Readable but full (something else filled the disk): status still works, and
                # the first write that fits registers this owner (heartbeat_if_due).
                self.reporter.problem(
                    "full-open",
                    logging.ERROR,
                    "spool %s: the disk is full (%s); the spool can be read but takes no new"
                    " records until space is freed",
                    self.path,
                    exc,
                )

    def _register(self) -> None:
        """The open-time transaction: this owner, the totals, orphaned and legacy records."""
        conn = self._conn()
        with self.transaction():
            self.heartbeat()
            # Cheap insurance against drift: one scan per open, like quick_check's.
            conn.execute(
                "UPDATE totals SET records = (SELECT coalesce(sum(count), 0) FROM records),"
                " bytes = (SELECT coalesce(sum(size), 0) FROM records) WHERE id = 0"
            )
            # Records of an owner row that no longer exists (a repair, a bug) would never
            # be claimed again; give them back. A full scan, but only once per open.
            conn.execute(
                "UPDATE records SET owner = NULL, adopted = 1 WHERE owner IS NOT NULL"
                " AND owner NOT IN (SELECT owner FROM owners)"
            )
            dest = self.own_dest()
            if dest is not None:
                # Records without a destination (schema 1, or salvaged without theirs)
                # go to whoever opens the file first with one: the index finds them.
                taken = conn.execute(
                    "UPDATE records SET dest = ? WHERE dest IS NULL", (dest,)
                ).rowcount
                if taken:
                    _log.info(
                        "spool %s: %d record(s) without a destination will be sent to %s",
                        self.path,
                        taken,
                        self.settings.destination,
                    )

    def connect(self, *, check: bool, handed_on: bool = False) -> sqlite3.Connection:
        """Connect to the database file, configure it, and create the schema if it is new.

        ``check`` runs ``PRAGMA quick_check``. Raises :class:`_CorruptError` when the file is
        damaged, :class:`_IncompatibleError` when it is not ours to use. ``handed_on``: opened
        here for use in another thread (the direct writer's, see :meth:`Spool.append_now`).
        """
        _make_private_file(self.path)
        conn = sqlite3.connect(
            str(self.path),
            timeout=_BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=not handed_on,
        )
        try:
            self._configure(conn, check=check)
        except BaseException as exc:
            conn.close()
            if _is_corruption(exc) and not isinstance(exc, _CorruptError):
                raise _CorruptError(str(exc)) from exc
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection, *, check: bool) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT * 1000)}")
        # The first read of the header: "file is not a database" surfaces here. A newer
        # schema is refused before anything (even the journal mode) changes in the file.
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > _SCHEMA_VERSION:
            raise _IncompatibleError(self._incompatible(f"schema version {version}"))
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        sync = "FULL" if self.settings.durability == "always" else "NORMAL"
        conn.execute(f"PRAGMA synchronous = {sync}")
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        # No checkpoint inside a COMMIT: by default the commit that takes the WAL past 1,000
        # pages copies it into the database and fsyncs both, there and then, which made the
        # spool's writes 3-6x slower on a virtual disk and put 20-60 ms pauses into single
        # commits. The worker thread checkpoints instead, about once a second while there are
        # writes (``_Store.checkpoint``), and the last connection to close folds the WAL in.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA temp_store = MEMORY")
        if check:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise _CorruptError("; ".join(str(p) for p in problems[:3]))
        self._ensure_schema(conn)
        _make_private_file(self.path)  # -wal and -shm exist now

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 0:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version == 0:  # nobody created it while we waited for the lock
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    # Ids of a fresh file start at "now" in microseconds: never equal to an
                    # id a process still holds from a file that was moved aside.
                    first_id = int(time.time() * 1_000_000)
                    conn.execute(
                        "INSERT INTO sqlite_sequence (name, seq) SELECT 'records', ?"
                        " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'records')",
                        (first_id,),
                    )
                    conn.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('first_id', ?)",
                        (first_id + 1,),
                    )
                    conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                    version = _SCHEMA_VERSION
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        if version == 1:
            version = self._migrate(conn, 1, ("ALTER TABLE records ADD COLUMN dest INTEGER",))
        if version == 2:
            version = self._migrate(conn, 2, _CHUNK_MIGRATION)
        if version == 3:
            version = self._migrate(conn, 3, _CODEC_MIGRATION)
        if version != _SCHEMA_VERSION:
            raise _IncompatibleError(self._incompatible(f"schema version {version}"))
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(records)"))
        if columns != _RECORD_COLUMNS:
            raise _IncompatibleError(self._incompatible(f"a 'records' table with {columns}"))

    @staticmethod
    def _migrate(conn: sqlite3.Connection, old: int, statements: Sequence[str]) -> int:
        """Schema ``old`` -> ``old + 1``: 1 -> 2 gives records a destination (NULL for the ones
        already there), 2 -> 3 lets a record hold a chunk (the ones there hold one signal),
        3 -> 4 lets a chunk be stored compressed (the ones there are stored as they are)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version == old:  # nobody migrated it while we waited for the lock
                # ADD COLUMN only rewrites the schema, not the rows: instant at any size.
                for statement in statements:
                    conn.execute(statement)
                if old == 1:
                    for statement in _DESTINATION_SCHEMA:
                        conn.execute(statement)
                version = old + 1
                conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return int(version)

    def _incompatible(self, what: str) -> str:
        return (
            f"{self.path} has {what}, but this version of telemetrydeck-async reads schema"
            f" version {_SCHEMA_VERSION}; use another spool_dir, or upgrade"
        )

    def _repair(self, reason: str) -> sqlite3.Connection:
        """Move a damaged database aside, start a fresh one and copy in what can be read."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        # pid and a random tag: two repairs within one second must not overwrite each other.
        tag = f"{stamp}-{os.getpid()}-{secrets.token_hex(2)}"
        aside = self.path.with_name(f"{self.path.name}.corrupt-{tag}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        salvaged = _salvage(aside)
        conn = self.connect(check=False)
        kept = 0
        if salvaged:
            self.conn = conn
            try:
                self.measure_room(sum(len(record.body) for record, _ in salvaged))
                with self.transaction():
                    kept = self._restore(salvaged)
            finally:
                self.conn = None
                self.dest_id = None
        self.reporter.problem(
            "corrupt",
            logging.ERROR,
            "spool database %s was damaged (%s); moved it (with its -wal and -shm) to %s and"
            " started a fresh one, keeping %d record(s) whose checksum matched",
            self.path,
            reason,
            aside,
            kept,
        )
        return conn

    def _restore(self, salvaged: Sequence[tuple[SpoolRecord, Destination | None]]) -> int:
        """Store salvaged records pending, each with its destination; returns how many."""
        kept = 0
        start = 0
        while start < len(salvaged):  # runs of one destination, oldest id first
            destination = salvaged[start][1]
            end = start
            while end < len(salvaged) and salvaged[end][1] == destination:
                end += 1
            key = None if destination is None else self.dest_key(destination)
            batch = [record for record, _ in salvaged[start:end]]
            kept += self.append(batch, None, dest=key).stored
            start = end
        return kept

    def ensure_current(self) -> None:
        """Reopen when another process replaced the database file (it repaired it)."""
        if self.conn is not None and _file_identity(self.path) == self.identity:
            return
        _log.info("spool database %s was replaced or removed; reopening it", self.path)
        self.close()
        self.open()

    def repair_now(self, reason: str) -> None:
        """Called after a query reported damage: check the file again, repair if needed."""
        self.close()
        _make_private_dir(self.settings.directory)
        with _directory_lock(self.settings.directory / LOCK_NAME):
            if _file_identity(self.path) == self.identity:
                try:
                    self.close_connection(self.connect(check=True))
                except _CorruptError:
                    self.close_connection(self._repair(reason))
        self.open()

    @staticmethod
    def close_connection(conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def close(self) -> None:
        if self.conn is not None:
            self.close_connection(self.conn)
            self.conn = None

    # -- transactions and housekeeping

    def _conn(self) -> sqlite3.Connection:
        if self.conn is None:
            raise SpoolError(f"spool {self.path} is not open")
        return self.conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE so the write lock is taken before any read."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            self.last_heartbeat = -math.inf  # a heartbeat in it was rolled back too
            self.dest_id = None  # so may the row that id named
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        self.dirty = True

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[sqlite3.Connection]:
        """One read-only transaction: needs no disk space, so it works on a full disk."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def measure_room(self, incoming: int) -> None:
        """Before a write transaction: how much disk it may use (``room``), made larger by
        moving the WAL into the database when the disk is nearly full.

        ``incoming`` is the body bytes the transaction will add. With plenty of free space
        ``room`` stays None and appends are limited by ``max_bytes`` alone.
        """
        self.room = None
        free = self.tight(incoming)
        if free is None:
            return
        # Nearly full. A WAL that is never checkpointed wedges the spool (its frames need
        # the database to grow, and nothing else may grow): fold it in and give its space
        # back before this transaction adds to it. Its growth was reserved when written.
        if self.truncate_wal():
            free = _free_space(self.settings.directory) or 0
        page_size, free_pages = (
            self._conn().execute(query).fetchone()[0]
            for query in ("PRAGMA page_size", "PRAGMA freelist_count")
        )
        self.room = _Room(free=free - _DISK_RESERVE, freelist=page_size * free_pages)

    def tight(self, incoming: int) -> int | None:
        """The free disk space when it is nearly full for a write of ``incoming`` body bytes;
        None while there is plenty (or it cannot be known).

        With plenty the figure is reused for up to a second, less what was written since:
        ``statvfs`` lets go of the GIL, and beside a busy event loop every time the thread
        takes it back costs up to the switch interval. A write that still finds the disk full
        forgets it (:meth:`forget_room`) and measures again.
        """
        use = 2 * _PAGE_FACTOR * incoming
        need = use + _DISK_RESERVE + _TIGHT_DISK
        now = time.monotonic()
        if now < self.roomy_until and self.roomy >= need:
            self.roomy -= use
            return None
        free = _free_space(self.settings.directory)
        if free is None:
            return None
        if free >= need:
            self.roomy, self.roomy_until = free - use, now + _ROOM_REUSE
            return None
        self.forget_room()
        return free

    def forget_room(self) -> None:
        self.roomy_until = -math.inf

    def truncate_wal(self) -> bool:
        """``wal_checkpoint(TRUNCATE)``: True when the WAL was folded in and emptied."""
        if self.conn is None:
            return False
        try:
            busy, _, _ = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            _log.debug("spool truncating checkpoint failed: %s", exc)
            return False
        self.dirty = False
        return not busy

    def checkpoint(self, *, force: bool = False) -> None:
        """Run a passive WAL checkpoint when writes happened and the interval passed."""
        now = time.monotonic()
        if self.conn is None or not self.dirty:
            return
        if not force and now - self.last_checkpoint < _CHECKPOINT_INTERVAL:
            return
        self.last_checkpoint = now
        self.dirty = False
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # a busy checkpoint is retried next time; nothing is lost
            _log.debug("spool checkpoint skipped: %s", exc)

    # -- operations (inside a transaction)

    def heartbeat(self) -> None:
        """Renew this owner's lease, re-creating the row if another process reaped it."""
        s = self.settings
        now = s.clock()
        conn = self._conn()
        # UPDATE, then INSERT if there was no row: an upsert needs SQLite 3.24, which some
        # long-term-support systems that run Python 3.10 do not have.
        renewed = conn.execute(
            "UPDATE owners SET heartbeat_at = ? WHERE owner = ?", (now, s.owner_id)
        ).rowcount
        if not renewed:
            conn.execute(
                "INSERT INTO owners (owner, pid, hostname, lease, started_at, heartbeat_at, closed)"
                " VALUES (?, ?, ?, ?, ?, ?, 0)",
                (s.owner_id, s.pid, s.hostname, s.lease, now, now),
            )
        self.last_heartbeat = now

    def heartbeat_if_due(self) -> None:
        """Renew the lease in a transaction that runs anyway, at most every ``lease / 10``.

        Another process reaps this owner only after ``lease`` without a heartbeat, so the
        first transaction after such a reap always lands here and re-creates the owner row
        (in the same transaction as any records it stores as claimed).
        """
        now = self.settings.clock()
        if not (0 <= now - self.last_heartbeat < self.settings.lease / 10):
            self.heartbeat()

    def own_dest(self) -> int | None:
        """This spool's key in ``destinations`` (added on first use); None without one."""
        destination = self.settings.destination
        if destination is None:
            return None
        if self.dest_id is None:
            self.dest_id = self.dest_key(destination)
        return self.dest_id

    def dest_key(self, destination: Destination) -> int:
        conn = self._conn()
        key = (destination.url, destination.app_id)
        conn.execute("INSERT OR IGNORE INTO destinations (url, app_id) VALUES (?, ?)", key)
        (found,) = conn.execute(
            "SELECT id FROM destinations WHERE url = ? AND app_id = ?", key
        ).fetchone()
        return int(found)

    @staticmethod
    def _rows(
        records: Iterable[SpoolRecord], owner: str | None, key: int | None
    ) -> list[tuple[Any, ...]]:
        return [
            (
                record.received_at,
                len(record.body),
                checksum(record.body, record.sizes) if record.crc is None else record.crc,
                owner,
                record.body,
                key,
                record.count,
                record.sizes,
                record.codec,
            )
            for record in records
        ]

    @staticmethod
    def _insert(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """INSERT ``rows`` with as few statements as SQLite's variable limit allows.

        Not ``executemany``: it runs one statement per row, and each one gives the GIL back
        and waits to take it again. Beside a busy event loop that wait is the interpreter's
        switch interval (5 ms), which held a burst to under 1,000 rows/s; one statement for
        thousands of rows keeps the same burst at tens of thousands per second. A statement
        binds at most about ``_MAX_STATEMENT_BYTES`` of bodies (see there). Returns the id of
        the last row (the cursor knows it: asking SQLite would be one more hand-off).
        """
        last = 0
        per = max(1, _variable_limit(conn) // 9)
        start = 0
        while start < len(rows):
            end = start
            size = 0
            while end < len(rows) and end - start < per and size < _MAX_STATEMENT_BYTES:
                size += rows[end][1]
                end += 1
            chunk = rows[start:end]
            cursor = conn.execute(
                "INSERT INTO records"
                " (received_at, size, crc, owner, body, dest, count, sizes, codec)"
                " VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                [value for row in chunk for value in row],
            )
            last = cursor.lastrowid or 0
            start = end
        return last

    def _count(self, records: int, nbytes: int) -> None:
        self._conn().execute(
            "UPDATE totals SET records = records + ?, bytes = bytes + ? WHERE id = 0",
            (records, nbytes),
        )

    def _delete(self, ids: Sequence[int]) -> int:
        """Delete records by id (missing ones are ignored); returns how many signals they held."""
        conn = self._conn()
        deleted = 0
        for start in range(0, len(ids), _SQL_VARIABLES_PER_STATEMENT):
            chunk = ids[start : start + _SQL_VARIABLES_PER_STATEMENT]
            marks = ",".join("?" * len(chunk))
            count, size = conn.execute(
                f"SELECT coalesce(sum(count), 0), coalesce(sum(size), 0) FROM records"
                f" WHERE id IN ({marks})",
                chunk,
            ).fetchone()
            if count:
                conn.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk)
                self._count(-count, -size)
                deleted += count
        return deleted

    def append(
        self,
        records: Sequence[SpoolRecord],
        owner: str | None,
        dest: int | Literal["own"] | None = "own",
    ) -> AppendResult:
        """Store ``records`` tagged with ``dest`` ("own": this spool's destination)."""
        conn = self._conn()
        key = self.own_dest() if dest == "own" else dest
        limit = self.settings.max_bytes
        sizes = [len(record.body) for record in records]
        counts = [record.count for record in records]
        incoming = sum(sizes)
        (stored,) = conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()
        room = self.room
        skip = 0
        # The batch alone is too big for max_bytes, or (disk nearly full) for what the disk
        # can take even after evicting everything else: its first (oldest) records go.
        rejected = 0
        while skip < len(sizes) and (
            incoming > limit or (room is not None and not room.fits(incoming, stored))
        ):
            incoming -= sizes[skip]
            rejected += counts[skip]
            skip += 1
        evicted = 0
        excess = stored + incoming - limit
        if room is not None:
            excess = max(excess, room.excess(incoming))
            room.use(incoming)
        if excess > 0:
            evicted += self._evict(excess)
        rows = self._rows(records[skip:], owner, key)
        if not rows:
            return AppendResult((), 0, evicted, rejected)
        last = self._insert(conn, rows)
        signals = sum(counts[skip:])
        self._count(signals, incoming)
        # We hold the write lock and AUTOINCREMENT hands out consecutive ids within it.
        ids = tuple(range(last - len(rows) + 1, last + 1))
        return AppendResult(ids, 0, evicted, rejected, signals)

    def append_many(
        self, batches: Sequence[tuple[Sequence[SpoolRecord], str | None]]
    ) -> list[AppendResult]:
        """Group commit: the appends of many callers in one ``executemany``.

        Statement overhead dominates small appends, so one INSERT for all of them is what
        makes many concurrent single-signal appends cheap. When the spool would overflow, the
        batches go one by one instead, so each evicts exactly what a lone append would.
        """
        if len(batches) == 1:
            return [self.append(*batches[0])]
        conn = self._conn()
        (stored,) = conn.execute("SELECT bytes FROM totals WHERE id = 0").fetchone()
        incoming = sum(len(record.body) for records, _ in batches for record in records)
        if stored + incoming > self.settings.max_bytes or self.room is not None:
            return [self.append(records, owner) for records, owner in batches]
        key = self.own_dest()
        rows = [row for records, owner in batches for row in self._rows(records, owner, key)]
        last = self._insert(conn, rows)
        self._count(sum(row[6] for row in rows), incoming)
        first = last - len(rows) + 1
        results = []
        for records, _ in batches:
            ids = tuple(range(first, first + len(records)))
            results.append(AppendResult(ids, 0, 0, 0, sum(r.count for r in records)))
            first += len(records)
        return results

    def _evict(self, excess: int) -> int:
        """Delete the oldest records, any owner, until ``excess`` bytes are freed."""
        conn = self._conn()
        victims: list[int] = []
        freed = 0
        cursor = conn.execute("SELECT id, size FROM records ORDER BY received_at, id")
        try:
            while freed < excess:
                chunk = cursor.fetchmany(256)
                if not chunk:
                    break
                for record_id, size in chunk:
                    victims.append(record_id)
                    freed += size
                    if freed >= excess:
                        break
        finally:
            cursor.close()
        return self._delete(victims)

    def claim(self, limit: int, max_bytes: int | None, batches: int = 1) -> list[ClaimResult]:
        """Up to ``batches`` claims of ``limit`` records / ``max_bytes`` each, one transaction.

        The first result carries ``expired``; there is always at least one result.
        """
        conn = self._conn()
        now = self.settings.clock()
        self._reap(now)
        # Only this destination's records (any, for a spool opened without one): another
        # app's signals must never go to this app's endpoint, nor expire in its books.
        dest = self.own_dest()
        mine, args = ("", ()) if dest is None else (" AND dest = ?", (dest,))
        cutoff = (now - self.settings.max_age, *args)
        expired, size = conn.execute(
            "SELECT coalesce(sum(count), 0), coalesce(sum(size), 0) FROM records"
            " WHERE received_at < ? AND owner IS NULL" + mine,
            cutoff,
        ).fetchone()
        if expired:
            conn.execute(
                "DELETE FROM records WHERE received_at < ? AND owner IS NULL" + mine, cutoff
            )
            self._count(-expired, -size)
        # Marking records claimed rewrites their pages into the WAL: on a nearly full disk
        # take only what that room holds, over all batches (still at least one record).
        budget = None if self.room is None else max(0, int(self.room.free / _PAGE_FACTOR))
        groups: list[list[tuple[int, bytes, bytes | None]]] = [[]]
        adopted = [0]
        total = overall = signals = 0
        damaged: list[int] = []
        lost = 0
        # ``limit`` counts signals; a record holds at least one, so this many rows is enough.
        # ``body`` and ``sizes`` are read only as the blobs this spool writes: a row that holds
        # TEXT there (written by something else) would make the cursor decode it as UTF-8 and
        # raise, on every claim, for as long as the row is there. Read as NULL and empty, such
        # a row does not decode and is deleted and counted like any other damaged one.
        cursor = conn.execute(
            "SELECT id, size, adopted,"
            " CASE WHEN typeof(body) = 'blob' THEN body END, count,"
            " CASE WHEN sizes IS NULL OR typeof(sizes) = 'blob' THEN sizes ELSE x'' END,"
            " codec, crc FROM records"
            " WHERE owner IS NULL" + mine + " ORDER BY received_at, id LIMIT ?",
            (*args, limit * batches),
        )
        try:
            for record_id, size, was_adopted, stored, count, sizes, codec, crc in cursor:
                body = None if stored is None else decode_body(stored, sizes, codec)
                if body is not None and codec != CODEC_NONE and crc != checksum(stored, sizes):
                    # Deflate does not notice every damaged byte; the CRC of the few stored
                    # bytes does, for about a microsecond.
                    body = None
                if body is None:  # never sendable: deleted below, counted, logged
                    damaged.append(record_id)
                    lost += count
                    continue
                group = groups[-1]
                # Every batch gets at least one record, or one oversized body would block.
                # ``max_bytes`` is about requests: bodies as sent, decompressed.
                if group and (
                    signals + count > limit
                    or (max_bytes is not None and total + len(body) > max_bytes)
                ):
                    if len(groups) == batches:
                        break
                    group = []
                    groups.append(group)
                    adopted.append(0)
                    total = signals = 0
                if budget is not None and overall and overall + size > budget:
                    break
                group.append((record_id, body, sizes))
                total += len(body)
                signals += count
                overall += size
                adopted[-1] += was_adopted
        finally:
            cursor.close()
        if damaged:
            self._delete(damaged)
            self.reporter.problem(
                "undecodable",
                logging.WARNING,
                "spool %s: %d record(s) holding %d signal(s) did not decode (damaged on disk);"
                " deleted them, counted as dropped (spool_error)",
                self.path,
                len(damaged),
                lost,
            )
        self._take([row[0] for group in groups for row in group])
        return [
            ClaimResult(
                tuple((row[0], row[1]) for row in group),
                expired if i == 0 else 0,
                count,
                tuple(row[2] for row in group),
                lost if i == 0 else 0,
            )
            for i, (group, count) in enumerate(zip(groups, adopted, strict=True))
            if group or i == 0
        ]

    def _take(self, ids: Sequence[int]) -> None:
        """Mark records as this owner's, a few hundred per statement (see ``_insert``)."""
        conn = self._conn()
        me = self.settings.owner_id
        for start in range(0, len(ids), _SQL_VARIABLES_PER_STATEMENT):
            chunk = ids[start : start + _SQL_VARIABLES_PER_STATEMENT]
            marks = ",".join("?" * len(chunk))
            conn.execute(
                f"UPDATE records SET owner = ?, adopted = 0 WHERE id IN ({marks})", (me, *chunk)
            )

    def is_dead(
        self, pid: int, hostname: str, lease: float, heartbeat_at: float, closed: int, now: float
    ) -> bool:
        """Whether an owner row belongs to a process that will never ack its records."""
        if closed:
            return True
        if now - heartbeat_at > lease:
            return True
        s = self.settings
        # Same pid: another Spool in this very process; only its lease tells.
        return hostname == s.hostname and pid != s.pid and not _pid_alive(pid)

    def _reap(self, now: float) -> None:
        """Hand the records of dead owners back to the pending pool and forget the owners."""
        conn = self._conn()
        me = self.settings.owner_id
        dead = [
            owner
            for owner, pid, hostname, lease, heartbeat_at, closed in conn.execute(
                "SELECT owner, pid, hostname, lease, heartbeat_at, closed FROM owners"
            ).fetchall()
            if owner != me and self.is_dead(pid, hostname, lease, heartbeat_at, closed, now)
        ]
        for start in range(0, len(dead), _SQL_VARIABLES_PER_STATEMENT):
            chunk = dead[start : start + _SQL_VARIABLES_PER_STATEMENT]
            marks = ",".join("?" * len(chunk))
            conn.execute(
                f"UPDATE records SET owner = NULL, adopted = 1 WHERE owner IN ({marks})", chunk
            )
            conn.execute(f"DELETE FROM owners WHERE owner IN ({marks})", chunk)

    def ack(self, ids: Sequence[int]) -> None:
        self._delete(ids)

    def release(self, ids: Sequence[int]) -> None:
        me = self.settings.owner_id
        self._conn().executemany(
            "UPDATE records SET owner = NULL WHERE id = ? AND owner = ?", [(i, me) for i in ids]
        )

    def close_owner(self) -> None:
        """Mark this owner closed (its records become adoptable at once), or forget it."""
        conn = self._conn()
        me = self.settings.owner_id
        if conn.execute("SELECT 1 FROM records WHERE owner = ? LIMIT 1", (me,)).fetchone():
            conn.execute("UPDATE owners SET closed = 1 WHERE owner = ?", (me,))
        else:
            conn.execute("DELETE FROM owners WHERE owner = ?", (me,))

    def status(self, by_destination: bool = False) -> SpoolStatus:
        conn = self._conn()
        now = self.settings.clock()
        records, nbytes = conn.execute("SELECT records, bytes FROM totals WHERE id = 0").fetchone()
        # Two statements: a lone min() or max() is read off the index; both at once need a scan.
        (oldest,) = conn.execute("SELECT min(received_at) FROM records").fetchone()
        (newest,) = conn.execute("SELECT max(received_at) FROM records").fetchone()
        claimed: dict[str, int] = dict(
            conn.execute(
                "SELECT owner, sum(count) FROM records WHERE owner IS NOT NULL GROUP BY owner"
            ).fetchall()
        )
        owners = []
        for owner, pid, hostname, lease, heartbeat_at, closed in conn.execute(
            "SELECT owner, pid, hostname, lease, heartbeat_at, closed FROM owners"
            " ORDER BY started_at"
        ).fetchall():
            alive = owner == self.settings.owner_id or not self.is_dead(
                pid, hostname, lease, heartbeat_at, closed, now
            )
            owners.append(
                OwnerInfo(
                    owner, pid, hostname, heartbeat_at, claimed.pop(owner, 0), bool(closed), alive
                )
            )
        for owner, count in sorted(claimed.items()):  # rows whose owner row is gone
            owners.append(OwnerInfo(owner, 0, "", 0.0, count, True, False))
        destinations: tuple[DestinationInfo, ...] = ()
        if by_destination:
            destinations = tuple(
                DestinationInfo(
                    None if url is None else Destination(url, app_id), count, int(size or 0)
                )
                for url, app_id, count, size in conn.execute(
                    "SELECT d.url, d.app_id, sum(r.count), sum(r.size) FROM records AS r"
                    " LEFT JOIN destinations AS d ON d.id = r.dest GROUP BY r.dest ORDER BY r.dest"
                )
            )
        return SpoolStatus(
            records,
            nbytes,
            oldest,
            newest,
            tuple(owners),
            str(self.path),
            destinations=destinations,
        )


def _salvage(path: Path) -> list[tuple[SpoolRecord, Destination | None]]:
    """Every record of a damaged database file whose checksum still matches, oldest id first.

    Reads the file's pages directly (SQLite's file format), not through SQLite's b-tree: a
    damaged interior page or header would hide every row below it from a query, while each
    leaf page holds its rows whole. The committed frames of the ``-wal`` file next to it are
    laid over the file's pages first (what a crash left unmerged), and pages on the free list
    are skipped (rows deleted earlier). A row counts only if it has the shape of a
    ``records`` row and its CRC matches its body; its destination is kept when the
    ``destinations`` row it names could be read too, else it has none.
    """
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    try:
        wal = Path(f"{path}-wal").read_bytes()
    except OSError:
        wal = b""
    rows: dict[int, list[list[Any]]] = {}
    # The header's page size may itself be damaged: SQLite's default is tried too (a row
    # only counts if its CRC matches, so a wrong guess adds nothing false).
    for page_size in dict.fromkeys((_page_size(data, wal), 4096)):
        _read_rows(data, wal, page_size, rows)
    destinations: dict[int, Destination] = {}
    for rowid, candidates in rows.items():
        for values in candidates:
            if (
                len(values) == 3
                and values[0] is None
                and isinstance(values[1], str)
                and isinstance(values[2], str)
            ):
                destinations.setdefault(rowid, Destination(values[1], values[2]))
    found: list[tuple[SpoolRecord, Destination | None]] = []
    for rowid in sorted(rows):
        for values in rows[rowid]:
            record = _as_record(values, destinations)
            if record is not None:
                found.append(record)
                break
    return found


def _as_record(
    values: list[Any], destinations: dict[int, Destination]
) -> tuple[SpoolRecord, Destination | None] | None:
    """A ``records`` row (of schema 1 to 4) whose body still matches its CRC and decodes, or
    None."""
    if len(values) not in (7, 8, 10, 11) or values[0] is not None:
        return None
    received_at, size, crc, body = values[1], values[2], values[3], values[6]
    count, sizes = (values[8], values[9]) if len(values) >= 10 else (1, None)
    codec = values[10] if len(values) == 11 else CODEC_NONE
    if not (
        isinstance(body, bytes)
        and isinstance(received_at, (int, float))
        and math.isfinite(received_at)
        and size == len(body)
        and (sizes is None or isinstance(sizes, bytes))
        and isinstance(codec, int)
        and crc == checksum(body, sizes)
        and count == (1 if sizes is None else len(sizes) // 4)
        and decode_body(body, sizes, codec) is not None
    ):
        return None
    dest = values[7] if len(values) >= 8 and isinstance(values[7], int) else None
    record = SpoolRecord(float(received_at), body, sizes, crc, codec)
    return record, None if dest is None else destinations.get(dest)


def _read_rows(data: bytes, wal: bytes, page_size: int, rows: dict[int, list[list[Any]]]) -> None:
    """Add the rows of every table leaf page (as pages of ``page_size``) to ``rows``."""
    pages = {
        number + 1: data[number * page_size : (number + 1) * page_size]
        for number in range(len(data) // page_size)
    }
    pages.update(_wal_pages(wal, page_size))
    reserved = data[20] if len(data) > 20 and data[:16] == _DB_MAGIC else 0
    usable = page_size - (reserved if reserved < page_size // 2 else 0)
    free = _free_pages(pages)
    for number, page in pages.items():
        if number not in free:
            for rowid, values in _leaf_rows(pages, number, page, usable):
                rows.setdefault(rowid, []).append(values)


_DB_MAGIC: Final = b"SQLite format 3\x00"
_WAL_MAGICS: Final = (0x377F0682, 0x377F0683)
_TABLE_LEAF: Final = 0x0D


def _valid_page_size(size: int) -> bool:
    return 512 <= size <= 65536 and size & (size - 1) == 0


def _page_size(data: bytes, wal: bytes) -> int:
    """The page size from the file header, else from the WAL's, else SQLite's default."""
    if len(data) >= 100 and data[:16] == _DB_MAGIC:
        size = int.from_bytes(data[16:18], "big")
        size = 65536 if size == 1 else size
        if _valid_page_size(size):
            return size
    if len(wal) >= 32 and int.from_bytes(wal[:4], "big") in _WAL_MAGICS:
        size = int.from_bytes(wal[8:12], "big")
        if _valid_page_size(size):
            return size
    return 4096


def _wal_pages(wal: bytes, page_size: int) -> dict[int, bytes]:
    """The newest committed version of each page in a WAL file (frames of its current salt)."""
    if len(wal) < 32 or int.from_bytes(wal[:4], "big") not in _WAL_MAGICS:
        return {}
    if int.from_bytes(wal[8:12], "big") != page_size:
        return {}
    salt = wal[16:24]
    committed: dict[int, bytes] = {}
    pending: dict[int, bytes] = {}
    frame = 24 + page_size
    for start in range(32, len(wal) - frame + 1, frame):
        header = wal[start : start + 24]
        if header[8:16] != salt:
            break  # frames of an earlier generation: not part of the database
        pending[int.from_bytes(header[:4], "big")] = wal[start + 24 : start + frame]
        if int.from_bytes(header[4:8], "big"):  # a commit frame ends a transaction
            committed.update(pending)
            pending.clear()
    return committed


def _free_pages(pages: dict[int, bytes]) -> set[int]:
    """Pages on the free list (their old rows were deleted), as far as the list is readable."""
    first = pages.get(1, b"")
    free: set[int] = set()
    if len(first) < 100 or first[:16] != _DB_MAGIC:
        return free
    trunk = int.from_bytes(first[32:36], "big")
    while trunk and trunk not in free and trunk in pages:
        free.add(trunk)
        page = pages[trunk]
        count = min(int.from_bytes(page[4:8], "big"), (len(page) - 8) // 4)
        free.update(int.from_bytes(page[8 + 4 * i : 12 + 4 * i], "big") for i in range(count))
        trunk = int.from_bytes(page[:4], "big")
    # A damaged list could name live pages: trust it only if it adds up to the header's count
    # (otherwise deleted rows may come back: sent twice, never lost).
    return free if len(free) == int.from_bytes(first[36:40], "big") else set()


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """SQLite's big-endian varint at ``pos``: (value, next position)."""
    value = 0
    for i in range(9):
        byte = buf[pos + i]  # IndexError on a cut-off varint: the caller skips the cell
        if i == 8:
            return (value << 8) | byte, pos + 9
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, pos + i + 1
    raise AssertionError("unreachable")  # pragma: no cover


def _leaf_rows(
    pages: dict[int, bytes], number: int, page: bytes, usable: int
) -> Iterator[tuple[int, list[Any]]]:
    """(rowid, column values) of each readable cell of a table leaf page; others yield none."""
    offset = 100 if number == 1 else 0
    if len(page) < offset + 8 or page[offset] != _TABLE_LEAF:
        return
    cells = int.from_bytes(page[offset + 3 : offset + 5], "big")
    for i in range(cells):
        at = offset + 8 + 2 * i
        try:
            pointer = int.from_bytes(page[at : at + 2], "big")
            payload_size, pos = _varint(page, pointer)
            rowid, pos = _varint(page, pos)
            payload = _payload(pages, page, pos, payload_size, usable)
            values = _record(payload)
        except (IndexError, ValueError, OverflowError, struct.error):
            continue  # a damaged cell: its neighbours on the page may still be whole
        if rowid >= 2**63:
            rowid -= 2**64
        yield rowid, values


def _payload(pages: dict[int, bytes], page: bytes, pos: int, size: int, usable: int) -> bytes:
    """A cell's payload: the part on the leaf page, then its overflow chain if it has one."""
    if size > 2**31:
        raise ValueError("payload size out of range")
    most = usable - 35
    if size <= most:
        local = size
    else:
        least = (usable - 12) * 32 // 255 - 23
        local = least + (size - least) % (usable - 4)
        local = local if local <= most else least
    parts = [page[pos : pos + local]]
    have = len(parts[0])
    if have != local:
        raise ValueError("cell runs past its page")
    overflow = int.from_bytes(page[pos + local : pos + local + 4], "big") if local < size else 0
    seen: set[int] = set()
    while have < size:
        if overflow in seen or overflow not in pages:
            raise ValueError("broken overflow chain")
        seen.add(overflow)
        chunk = pages[overflow][4:usable][: size - have]
        parts.append(chunk)
        have += len(chunk)
        overflow = int.from_bytes(pages[overflow][:4], "big")
    return b"".join(parts)


def _record(payload: bytes) -> list[Any]:
    """Decode SQLite's record format into column values."""
    header_size, pos = _varint(payload, 0)
    if header_size > len(payload):
        raise ValueError("record header runs past the payload")
    types = []
    while pos < header_size:
        serial, pos = _varint(payload, pos)
        types.append(serial)
    values: list[Any] = []
    pos = header_size
    for serial in types:
        if serial in (0, 8, 9):
            values.append(None if serial == 0 else serial - 8)
        elif 1 <= serial <= 6:
            width = (0, 1, 2, 3, 4, 6, 8)[serial]
            values.append(int.from_bytes(payload[pos : pos + width], "big", signed=True))
            pos += width
        elif serial == 7:
            values.append(struct.unpack(">d", payload[pos : pos + 8])[0])
            pos += 8
        elif serial >= 12:
            width = (serial - 12) // 2
            raw = payload[pos : pos + width]
            values.append(raw if serial % 2 == 0 else raw.decode("utf-8"))
            pos += width
        else:
            raise ValueError(f"reserved serial type {serial}")
        if pos > len(payload):
            raise ValueError("record runs past the payload")
    return values


# --------------------------------------------------------------------------------------------
# The worker thread


@attrs.define
class _Job(Generic[_T]):
    """One unit of work for the worker thread and where its result goes."""

    run: Callable[[_Store], _T]
    fallback: _T  # the answer when the disk failed or the spool is disabled
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[_T] | None = None
    # Called on the loop with the result when the awaiting task went away (cancelled):
    # claimed records would otherwise stay owned by nobody who knows about them.
    orphaned: Callable[[_T], None] | None = None
    # Set for appends: (records, owner). Consecutive appends are merged into one INSERT.
    append: tuple[Sequence[SpoolRecord], str | None] | None = None
    # Reads only (status): may run in a read transaction, which works on a full disk.
    readonly: bool = False
    # Write-behind work (ack, release) nobody awaits: a failed transaction keeps it to run
    # again later instead of losing it.
    again: bool = False
    # Handed over without an await (Spool.hand_over): until the worker takes it (``taken``),
    # the caller may take it back (``withdrawn``); both under the worker's lock. ``done`` is
    # set, and ``outcome`` holds the result, once the worker has run it: an exit without an
    # event loop reads them directly.
    handover: bool = False
    taken: bool = False
    withdrawn: bool = False
    outcome: _T | None = None
    done: threading.Event | None = None


class _OneByOne(Exception):
    """The disk is nearly full: run this group of jobs one transaction each."""


@attrs.define
class _Stop:
    """Tells the worker thread to finish: mark the owner closed (or not, ``crash``) and exit."""

    crash: bool
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[None] | None


def _appended_bytes(job: _Job[Any] | _Stop) -> int:
    if isinstance(job, _Stop) or job.append is None:
        return 0
    return sum(len(record.body) for record in job.append[0])


def _settle(items: list[tuple[_Job[Any], Any]]) -> None:
    """Runs on the event loop: hand results to the waiting coroutines."""
    for job, value in items:
        future = job.future
        if future is None:
            continue
        if future.done():  # cancelled while the thread worked
            if job.orphaned is not None:
                job.orphaned(value)
        else:
            future.set_result(value)


def _note_writes(store: _Store) -> None:
    """A job: the direct writer wrote; the worker thread checkpoints it like its own writes."""
    store.dirty = True


def _post(
    loop: asyncio.AbstractEventLoop | None, callback: Callable[..., None], *args: Any
) -> None:
    if loop is None:
        return
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, *args)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Worker:
    """The thread that owns the connection and runs queued jobs with group commit."""

    def __init__(self, settings: _Settings, reporter: _Reporter) -> None:
        self.store = _Store(settings, reporter)
        self.reporter = reporter
        self.queue: queue.SimpleQueue[_Job[Any] | _Stop] = queue.SimpleQueue()
        # Jobs taken off the queue that did not fit in the last transaction: they go first.
        self.backlog: collections.deque[_Job[Any] | _Stop] = collections.deque()
        # Write-behind jobs whose transaction failed (a full disk): run again with the next
        # write, at the next idle checkpoint, and at close. Else an ack is lost, a delivered
        # record stays on disk, and the next process to open the spool sends it a second time.
        self.retry: list[_Job[Any]] = []
        self.lock = threading.Lock()
        self.accepting = True
        self.disabled = False
        self.last_error = ""  # why the last transaction failed, for status() to report
        # The direct writer's own connection (Spool.append_now), opened by this thread and
        # used only by the event loop's from then on; None when there is none (any more).
        # The writer holds direct_lock for each write (never waiting for it: busy means "hand
        # it over"); whoever takes the connection away takes the lock first, so it is never
        # closed in the middle of a write, nor the file moved aside under one.
        self.direct: _Store | None = None
        self.direct_lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._main,
            name=f"telemetrydeck-spool-{settings.owner_id[:8]}",
            daemon=True,  # an unclosed spool must not keep the interpreter alive at exit
        )

    def start(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        self._ready = (loop, ready)
        self.thread.start()

    def submit(self, job: _Job[Any]) -> bool:
        """Queue a job; False when the thread is gone or going (the caller uses the fallback)."""
        with self.lock:
            if not self.accepting:
                return False
            self.queue.put(job)
        return True

    def stop(self, stop: _Stop) -> bool:
        with self.lock:
            if not self.accepting:
                return False
            self.accepting = False
            self.queue.put(stop)
        return True

    def _main(self) -> None:
        stop: _Stop | None = None
        try:
            self._open()
            self._open_direct()
            loop, ready = self._ready
            _post(loop, _set_done, ready)
            if self.disabled:
                return
            while stop is None:
                stop = self._run_once()
        except BaseException as exc:
            self.disabled = True
            self.reporter.problem(
                "worker", logging.ERROR, "spool worker thread failed; spool disabled", exc=exc
            )
        finally:
            with self.lock:
                self.accepting = False
            # A close() may have queued its _Stop before `accepting` went false: answer it too.
            stop = self._drain() or stop
            self._shutdown(stop)

    def _open(self) -> None:
        store = self.store
        try:
            store.open()
        except _IncompatibleError as exc:
            store.close()
            self._disable(str(exc), None)
        except Exception as exc:
            store.close()
            self._disable(f"{type(exc).__name__}: {exc}", exc)

    def _open_direct(self) -> None:
        """The direct writer's connection, for durability "spill" (``"always"`` fsyncs each
        commit, which is never done on the event loop). Without it every write runs here."""
        store = self.store
        if self.disabled or store.conn is None or store.settings.durability != "spill":
            return
        direct = _Store(store.settings, self.reporter)
        try:
            direct.conn = direct.connect(check=False, handed_on=True)
            # Never wait for the write lock on the event loop: busy means "hand it over".
            direct.conn.execute("PRAGMA busy_timeout = 0")
        except Exception as exc:  # this thread writes everything instead
            _log.debug("spool %s: no direct writer (%s)", store.path, exc)
            direct.close()
            return
        direct.identity = _file_identity(direct.path)
        self.direct = direct

    def drop_direct(self, why: str) -> None:
        """Close the direct writer's connection; every write runs in this thread from now on.

        Called by the event loop's thread (a failed write, close) and by this one (before a
        repair moves the file aside: its WAL must not stay open beside the damaged file).
        """
        with self.direct_lock:
            direct, self.direct = self.direct, None
        if direct is not None:
            _log.debug("spool %s: direct writes stop (%s)", direct.path, why)
            direct.close()

    def _disable(self, detail: str, exc: BaseException | None) -> None:
        self.disabled = True
        self.last_error = f"the spool is disabled ({detail})"
        # One line that says what to do: a permission or path problem needs no traceback
        # (it is at DEBUG for the unexpected cases).
        self.reporter.problem(
            "disabled",
            logging.WARNING,
            "spool directory %s cannot be used (%s); running memory only, so signals that "
            "cannot be sent are dropped. Fix: make that directory writable by this process, "
            "or set spool_dir to a writable one (in a container: a mounted volume)",
            self.store.settings.directory,
            detail,
        )
        if exc is not None:
            _log.debug("the spool could not open", exc_info=exc)

    def _next_items(self) -> list[_Job[Any] | _Stop]:
        """The queued work for one transaction: bounded in jobs and in appended bytes."""
        store = self.store
        backlog = self.backlog
        items: list[_Job[Any] | _Stop] = []
        incoming = 0
        while len(items) < _MAX_JOBS_PER_TRANSACTION and incoming < _MAX_TRANSACTION_BYTES:
            if backlog:
                item = backlog.popleft()
            elif items:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            else:
                item = self.queue.get(timeout=_CHECKPOINT_INTERVAL if store.dirty else None)
            items.append(item)
            incoming += _appended_bytes(item)
        return items

    def _run_once(self) -> _Stop | None:
        store = self.store
        try:
            items = self._next_items()
        except queue.Empty:
            store.checkpoint(force=True)  # idle: a good moment to move the WAL into the file
            if self.retry:
                self._run_jobs(self._take_retry())
            return None
        # A _Stop is always the last item: stop() refuses new jobs before queueing it.
        last = items[-1]
        stop = last if isinstance(last, _Stop) else None
        jobs = [item for item in items if isinstance(item, _Job)]
        if any(job.handover for job in jobs):
            with self.lock:  # from here on the caller can no longer take them back
                jobs = [job for job in jobs if not job.withdrawn]
                for job in jobs:
                    job.taken = True
        if self.retry and any(not job.readonly for job in jobs):
            jobs[:0] = self._take_retry()  # rides on the next write's transaction
        if jobs:
            self._run_jobs(jobs)
        store.checkpoint()
        return stop

    def _take_retry(self) -> list[_Job[Any]]:
        """The write-behind jobs that failed, to run again (a new failure keeps them again)."""
        jobs, self.retry = self.retry, []
        return jobs

    def _run_jobs(self, jobs: list[_Job[Any]]) -> None:
        # Skip jobs whose caller was already cancelled (a racy read of a bool, harmless both
        # ways: a skipped append was never reported stored, a run one lands in `orphaned`).
        jobs = [job for job in jobs if job.future is None or not job.future.cancelled()]
        if not jobs:
            return
        if self.disabled:
            self._deliver([(job, job.fallback) for job in jobs])
            return
        store = self.store
        incoming = sum(_appended_bytes(job) for job in jobs)
        try:
            identity = store.identity
            store.ensure_current()
            if store.identity != identity:  # another process repaired the file: reopened
                self.drop_direct("the database file was replaced")
                self._open_direct()
            if all(job.readonly for job in jobs):
                with store.read_transaction():
                    results = self._execute(jobs)
            else:
                results = self._write(jobs, incoming)
        except _OneByOne:
            # A nearly full disk: what one transaction may add is what is free, so a large
            # group would refuse its newest appends. One transaction per job instead: each
            # evicts the oldest records to make room for its own, in the order given.
            for job in jobs:
                self._run_jobs([job])
            return
        except Exception as exc:
            self._failed(exc)
            self.retry.extend(job for job in jobs if job.again)
            results = [job.fallback for job in jobs]
            readers = [i for i, job in enumerate(jobs) if job.readonly]
            if readers and store.conn is not None:
                # A write failed (a full disk): what only reads must still see the truth.
                with contextlib.suppress(Exception), store.read_transaction():
                    for i in readers:
                        results[i] = jobs[i].run(store)
            self._deliver(list(zip(jobs, results, strict=True)))
            return
        self.reporter.success(store.path)
        self._deliver(list(zip(jobs, results, strict=True)))

    def _write(self, jobs: list[_Job[Any]], incoming: int) -> list[Any]:
        """Run ``jobs`` in one write transaction, within the room the disk has.

        Should SQLite still find the disk full (another program filled it meanwhile, or the
        estimate was short), the WAL is folded in and the room measured again, once.
        """
        store = self.store
        for attempt in (1, 2):
            store.measure_room(incoming)
            if store.room is not None and incoming and len(jobs) > 1:
                raise _OneByOne
            try:
                with store.transaction():
                    results = self._execute(jobs)
                    store.heartbeat_if_due()  # any transaction is proof of life
                return results
            except sqlite3.Error as exc:
                if attempt == 2 or not _is_full(exc):
                    raise
                store.forget_room()
                _log.debug("spool %s full; making room and trying once more", store.path)
        raise AssertionError("unreachable")  # pragma: no cover

    def _execute(self, jobs: list[_Job[Any]]) -> list[Any]:
        """Run jobs in order, merging each run of consecutive appends into one INSERT."""
        results: list[Any] = []
        start = 0
        while start < len(jobs):
            end = start
            appends: list[tuple[Sequence[SpoolRecord], str | None]] = []
            while end < len(jobs) and (append := jobs[end].append) is not None:
                appends.append(append)
                end += 1
            if appends:
                results.extend(self.store.append_many(appends))
                start = end
            else:
                results.append(jobs[start].run(self.store))
                start += 1
        return results

    def _failed(self, exc: Exception) -> None:
        store = self.store
        self.last_error = f"{type(exc).__name__}: {exc}"
        if _is_corruption(exc):
            self.reporter.problem(
                "corrupt-runtime",
                logging.ERROR,
                "spool database %s is damaged (%s); repairing it",
                store.path,
                exc,
            )
            self.drop_direct("the database is damaged")
            try:
                store.repair_now(str(exc))
            except Exception as again:
                store.close()
                self._disable(f"repair failed: {again}", again)
            else:
                self._open_direct()
        elif isinstance(exc, (sqlite3.Error, OSError, SpoolError)):
            # What happens next is the caller's: signals it wanted to spool are dropped as
            # spool_error, write-ahead copies go on from memory, acks are retried.
            self.reporter.problem(
                f"write:{type(exc).__name__}:{getattr(exc, 'sqlite_errorcode', '')}",
                logging.WARNING,
                "spool %s: a transaction failed (%s)%s; signals that were to be written to"
                " the spool are dropped as spool_error",
                store.path,
                exc,
                " -- the disk is full" if _is_full(exc) else "",
                exc=exc,
            )
            if store.conn is None:  # a failed reopen: try again next batch, or give up
                try:
                    store.open()
                except Exception as again:
                    store.close()
                    self._disable(f"reopen failed: {again}", again)
        else:
            self.reporter.problem(
                "bug", logging.ERROR, "unexpected error in the spool worker thread", exc=exc
            )

    def _deliver(self, outcomes: list[tuple[_Job[Any], Any]]) -> None:
        """One call_soon_threadsafe per event loop for the whole batch, not one per job."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job[Any], Any]]] = {}
        for job, value in outcomes:
            if job.done is not None:
                job.outcome = value
                job.done.set()
            if job.loop is not None:
                by_loop.setdefault(job.loop, []).append((job, value))
        for loop, items in by_loop.items():
            _post(loop, _settle, items)

    def _drain(self) -> _Stop | None:
        """Answer whatever is still queued with its fallback; the thread is leaving."""
        leftovers: list[tuple[_Job[Any], Any]] = []
        stop = None
        while True:
            if self.backlog:
                item = self.backlog.popleft()
            else:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            if isinstance(item, _Job):
                leftovers.append((item, item.fallback))
            else:
                stop = item
        self._deliver(leftovers)
        return stop

    def _shutdown(self, stop: _Stop | None) -> None:
        store = self.store
        try:
            if stop is not None and not stop.crash and store.conn is not None:
                if self.retry:  # the last chance: else the next process sends them again
                    with contextlib.suppress(sqlite3.Error), store.transaction():
                        for job in self._take_retry():
                            job.run(store)
                with store.transaction():
                    store.close_owner()
        except Exception as exc:
            self.reporter.problem(
                "close", logging.WARNING, "spool %s: could not close cleanly (%s)", store.path, exc
            )
        finally:
            self.drop_direct("closed")  # first: the last connection to close checkpoints
            store.close()  # the last connection to close checkpoints and removes the WAL
            if stop is not None and stop.future is not None:
                _post(stop.loop, _set_done, stop.future)


# --------------------------------------------------------------------------------------------
# The public object


class Spool:
    """The on-disk spool of one process. Create it with :func:`open_spool`.

    Every method that touches the disk is a coroutine whose work runs in the spool's own
    thread, except :meth:`append_now`: one short write in the caller's thread that never
    waits. Disk trouble is never raised: results report it (``AppendResult.failed``, empty
    claims) and the log says it once.
    Methods raise :class:`SpoolError` only when called in a forked child of the process that
    opened the spool (open a new spool there). After :meth:`close` they return empty results.

    A plain class rather than ``attrs.define``: it owns a thread and has no value semantics.
    """

    def __init__(self, settings: _Settings) -> None:
        """Private: use :func:`open_spool`, which also opens the database."""
        self._settings = settings
        self._reporter = _Reporter()
        self._worker = _Worker(settings, self._reporter)
        self._pid = settings.pid
        self._closed = False
        self._started = False
        self._failed = 0
        # When the worker thread is next told about direct writes (it checkpoints them).
        self._nudge_at = -math.inf
        # Until when direct writes pause after a slow one (monotonic seconds).
        self._direct_paused_until = -math.inf

    def __repr__(self) -> str:
        state = "closed" if self._closed else "disabled" if self.disabled else "open"
        return f"<Spool {str(self._settings.directory)!r} owner={self.owner_id} {state}>"

    def __del__(self) -> None:
        # Collected without close(): mark the owner closed so others adopt its records at once.
        if getattr(self, "_started", False) and not self._closed and os.getpid() == self._pid:
            self._closed = True
            self._worker.stop(_Stop(crash=False, loop=None, future=None))
            with contextlib.suppress(Exception):  # at interpreter shutdown warnings may be gone
                warnings.warn(f"{self!r} was never closed", ResourceWarning, stacklevel=1)

    # -- properties

    @property
    def owner_id(self) -> str:
        """This process's owner id in the spool (a random token, new for every open)."""
        return self._settings.owner_id

    @property
    def path(self) -> Path:
        """The database file."""
        return self._settings.db_path

    @property
    def durability(self) -> Literal["spill", "always"]:
        """``"spill"`` or ``"always"``, see the module documentation."""
        return self._settings.durability

    @property
    def disabled(self) -> bool:
        """True when the spool could not be used: methods return empty results, never raise."""
        return self._worker.disabled

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def lease(self) -> float:
        """Seconds this owner counts as alive after its last heartbeat."""
        return self._settings.lease

    @property
    def failed(self) -> int:
        """Records that could not be persisted since the spool was opened."""
        return self._failed

    # -- plumbing

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise SpoolError(
                f"this spool was opened by process {self._pid} and cannot be used after fork()"
                f" (now in process {os.getpid()}); open a new spool in the child process"
            )

    async def _call(
        self,
        run: Callable[[_Store], _T],
        fallback: _T,
        orphaned: Callable[[_T], None] | None = None,
        append: tuple[Sequence[SpoolRecord], str | None] | None = None,
    ) -> _T:
        return await self._call_job(_Job(run, fallback, orphaned=orphaned, append=append))

    async def _call_job(self, job: _Job[_T]) -> _T:
        if self._closed or self._worker.disabled:
            return job.fallback
        job.loop = loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        job.future = future
        if not self._worker.submit(job):
            return job.fallback
        return await future

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._started = True
        self._worker.start(loop, ready)
        await ready

    # -- operations

    async def append(
        self, records: Sequence[SpoolRecord], *, claimed: bool = False
    ) -> AppendResult:
        """Store records; see :class:`AppendResult` for what comes back.

        ``claimed=True`` stores them owned by this process (durability "always": the signals
        are also in memory and being sent; if this process dies another one adopts them).
        ``claimed=False`` stores them pending, for any process to claim. Older records (of any
        owner) are evicted to keep the body total within ``max_bytes``.
        """
        self._check_process()
        batch = tuple(records)
        for record in batch:
            if not isinstance(record.body, bytes):
                raise TypeError(f"SpoolRecord.body must be bytes, not {type(record.body).__name__}")
            if not math.isfinite(record.received_at):
                raise ValueError(
                    f"SpoolRecord.received_at must be finite, not {record.received_at}"
                )
            if decode_body(record.body, record.sizes, record.codec) is None:
                raise ValueError(
                    "SpoolRecord.sizes must give each signal's length in body, and a"
                    " compressed body must decompress to them (build chunks with"
                    " SpoolRecord.chunk)"
                )
        if not batch:
            return AppendResult((), 0, 0)
        owner = self._settings.owner_id if claimed else None
        result = await self._call(
            lambda store: store.append(batch, owner),
            AppendResult((), sum(record.count for record in batch), 0),
            append=(batch, owner),
        )
        self._failed += result.failed
        return result

    def hand_over(
        self, record: SpoolRecord, loop: asyncio.AbstractEventLoop
    ) -> _Job[AppendResult] | None:
        """Queue ``record`` to be stored pending, without awaiting anything.

        For signals that overflow a caller that does not yield: the worker thread writes them
        while the caller keeps running, no turn of the event loop needed. The returned ticket's
        ``future`` gets the :class:`AppendResult` on ``loop``; until the worker takes the
        record, :meth:`withdraw` takes it back. None when the spool cannot take it (closed,
        disabled). The record is trusted: the caller built it with :meth:`SpoolRecord.chunk`.
        """
        if self._closed or self._worker.disabled:
            return None
        future: asyncio.Future[AppendResult] = loop.create_future()
        batch = (record,)
        job: _Job[AppendResult] = _Job(
            lambda store: store.append(batch, None),
            AppendResult((), record.count, 0),
            loop,
            future,
            append=(batch, None),
            handover=True,
            done=threading.Event(),
        )
        if not self._worker.submit(job):
            return None
        return job

    def append_now(self, record: SpoolRecord) -> AppendResult | None:
        """:meth:`append_many_now` of one record: its result, or None."""
        results = self.append_many_now((record,))
        return None if results is None else results[0]

    def append_many_now(self, records: Sequence[SpoolRecord]) -> list[AppendResult] | None:
        """Store ``records`` pending at once, in the calling thread (the event loop's): one
        :class:`AppendResult` per record, in order; or None.

        For the overflow of a caller that does not yield. One short transaction for all of
        them, on a connection of its own (measured on a loaded VM: 0.1-0.2 ms for one
        compressed chunk of 100 signals, most of it the commit, which several chunks share),
        with no hand-off to the worker thread: beside a loop that runs Python without a break,
        each of that thread's SQLite calls waits up to the interpreter's switch interval
        (5 ms) to take the GIL back, and the loop waits in turn while the thread runs. Nothing
        here waits: None, and the caller hands the records over (:meth:`hand_over`), when
        another connection holds the write lock, the disk is nearly full, the durability is
        ``"always"`` (each commit is fsynced), the spool is closed, disabled or another
        process's (fork), or there is no direct connection. The checkpoints (the fsyncs) stay
        on the worker thread. The disk can still make a write wait (a journal commit another
        fsync started): after a write slower than 2 ms, direct writes pause for a second and
        the worker thread takes them. After a failed write the worker thread does every write
        (it repairs, measures and retries); the records are then handed over too. The records
        are trusted: the caller built them with :meth:`SpoolRecord.chunk`.
        """
        worker = self._worker
        if not records or self._closed or worker.disabled or os.getpid() != self._pid:
            return None
        start = time.monotonic()
        if start < self._direct_paused_until:
            return None
        lock = worker.direct_lock
        if not lock.acquire(blocking=False):
            return None  # being closed or replaced by the worker thread this very moment
        try:
            direct = worker.direct
            if direct is None:
                return None
            results, trouble = self._append_direct(direct, records)
        finally:
            lock.release()
        if trouble is not None:
            worker.drop_direct(trouble)
        if results is not None:
            now = time.monotonic()
            if now - start > _DIRECT_SLOW:
                self._direct_paused_until = now + _DIRECT_PAUSE
            if now >= self._nudge_at:
                # The worker checkpoints what it knows was written: tell it, once a second.
                self._nudge_at = now + _CHECKPOINT_INTERVAL
                worker.submit(_Job(_note_writes, None, readonly=True))
        return results

    @staticmethod
    def _append_direct(
        direct: _Store, records: Sequence[SpoolRecord]
    ) -> tuple[list[AppendResult] | None, str | None]:
        """:meth:`append_many_now`'s transaction: (its results or None, why to stop writing
        directly)."""
        conn = direct.conn
        # Another process repaired the file (moved it aside): the worker thread reopens both.
        if conn is None or _file_identity(direct.path) != direct.identity:
            return None, "the database file was replaced"
        if direct.tight(sum(len(record.body) for record in records)) is not None:
            return None, None  # the worker thread makes room (a truncating checkpoint) first
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:  # busy: another connection writes; the worker thread will wait
            return None, None
        try:
            # Each record as its own append (its own result), all in one INSERT when they fit.
            results = direct.append_many([((record,), None) for record in records])
            conn.execute("COMMIT")
        except Exception as exc:
            direct.dest_id = None
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return None, f"{type(exc).__name__}: {exc}"
        return results, None

    def withdraw(self, job: _Job[AppendResult]) -> bool:
        """Take back a record given to :meth:`hand_over`: True when the worker had not begun
        writing it (it never will; its future is cancelled), False when it is being or has
        been written (its future will tell)."""
        with self._worker.lock:
            if job.taken:
                return False
            job.withdrawn = True
        if job.future is not None:
            with contextlib.suppress(RuntimeError):  # an exit without a loop: it is closed
                job.future.cancel()
        return True

    async def claim(self, limit: int, max_bytes: int | None = None) -> ClaimResult:
        """Take up to ``limit`` pending records (at most ``max_bytes`` of body, but at least one).

        One ``BEGIN IMMEDIATE`` transaction: first adopt dead owners' records, then delete
        pending records older than ``max_age``, then take the oldest pending records.
        """
        self._check_process()
        if limit <= 0:
            return ClaimResult((), 0, 0)
        (result,) = await self.claim_batches(1, limit, max_bytes)
        return result

    async def claim_batches(
        self, batches: int, limit: int, max_bytes: int | None = None
    ) -> tuple[ClaimResult, ...]:
        """Up to ``batches`` claims like :meth:`claim`, oldest first, in one transaction.

        For recovery at full speed: one commit hands out the records for several requests at
        once. Each result holds up to ``limit`` records (``max_bytes`` of body, at least
        one); fewer results come back when the spool has less. The first carries
        ``expired``; there is always at least one result.
        """
        self._check_process()
        if limit <= 0 or batches <= 0:
            return (ClaimResult((), 0, 0),)
        return await self._call(
            lambda store: tuple(store.claim(limit, max_bytes, batches)),
            (ClaimResult((), 0, 0),),
            self._give_back,
        )

    def _give_back(self, results: tuple[ClaimResult, ...]) -> None:
        """The claimer was cancelled after the thread took the records: release them again."""
        ids = [record_id for result in results for record_id, _ in result.records]
        if ids:
            self._worker.submit(_Job(lambda store: store.release(ids), None))

    async def ack(self, ids: Iterable[int]) -> None:
        """Delete records: they were delivered, or finally dropped. Unknown ids are ignored.

        Write-behind: returns once the work is queued, without waiting for the thread. The
        spool applies it before any later operation of this :class:`Spool` (so a following
        ``claim`` or ``status`` sees it) and :meth:`close` waits for it; it usually shares the
        next operation's transaction, which halves the commits of a claim/send/ack loop. If the
        process dies before it is written, the records are delivered again (at least once).
        """
        self._check_process()
        batch = list(ids)
        if batch:
            self._queue(lambda store: store.ack(batch))

    async def release(self, ids: Iterable[int]) -> None:
        """Give records back (pending again). Ids this process does not own are ignored.

        Write-behind like :meth:`ack`.
        """
        self._check_process()
        batch = list(ids)
        if batch:
            self._queue(lambda store: store.release(batch))

    def _queue(self, run: Callable[[_Store], None]) -> None:
        """Queue work nobody waits for: a failure is logged by the thread, like any other,
        and the work is run again later (see ``_Worker.retry``)."""
        if not self._closed and not self._worker.disabled:
            self._worker.submit(_Job(run, None, again=True))

    async def barrier(self) -> None:
        """Wait until the work queued before this call (``ack``, ``release``) is committed."""
        self._check_process()
        # Jobs run in order, and a write transaction commits before results are handed back.
        await self._call(lambda store: None, None)

    async def heartbeat(self) -> None:
        """Renew this owner's lease; call it every ``lease / 3`` seconds.

        Every write transaction renews it too, so a busy process needs no extra calls.
        """
        self._check_process()
        await self._call(lambda store: store.heartbeat(), None)

    async def status(self, *, by_destination: bool = False) -> SpoolStatus:
        """Counts, ages and owners of the spool; per destination too when asked.

        When the spool cannot be read, ``error`` says why (the counts are then unknown, not
        zero). Reads need no disk space: this works on a full disk.
        """
        self._check_process()
        empty = SpoolStatus(0, 0, None, None, (), str(self.path), disabled=self.disabled)
        if self._closed:
            return attrs.evolve(empty, error="the spool is closed")
        result = await self._call_job(
            _Job(lambda store: store.status(by_destination), empty, readonly=True)
        )
        if result is empty:
            reason = self._worker.last_error or "the spool could not be read"
            return attrs.evolve(result, disabled=self.disabled, error=reason)
        return attrs.evolve(result, disabled=True) if self.disabled else result

    async def close(self) -> None:
        """Finish queued work, mark this owner closed and stop the thread.

        Records this process still has claimed stay in the spool, owned by a *closed* owner:
        the next claim by any process adopts them at once (and reports them as ``adopted``).
        They are not released, so ``status`` can show what a process left behind in flight.
        Idempotent. In a forked child it only forgets the object: the owner is the parent's.
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid or not self._started:
            return
        # First, so the worker's connection is the last one: its close folds the WAL in.
        self._worker.drop_direct("closed")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if self._worker.stop(_Stop(crash=False, loop=loop, future=done)):
            await done

    async def _crash(self) -> None:
        """Test hook: stop as if the process died (the owner stays registered, not closed)."""
        self._closed = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if self._worker.stop(_Stop(crash=True, loop=loop, future=done)):
            await done

    def append_sync(self, records: Sequence[SpoolRecord]) -> AppendResult:
        """Store records pending, blocking, on a short connection of its own.

        For an ``atexit`` handler when the event loop is already gone; never call it on a
        running loop. Works after :meth:`close` too (it does not need the worker thread).
        """
        self._check_process()
        batch = tuple(records)
        if not batch:
            return AppendResult((), 0, 0)
        if self.disabled:
            self._failed += len(batch)
            return AppendResult((), len(batch), 0)
        store = _Store(self._settings, self._reporter)
        try:
            _make_private_dir(self._settings.directory)
            # Under the lock: a file this creates must get its header before an opening
            # process could see it empty (and move it aside as damaged).
            with _directory_lock(self._settings.directory / LOCK_NAME):
                store.conn = store.connect(check=False)
            store.measure_room(sum(len(record.body) for record in batch))
            with store.transaction():
                result = store.append(batch, None)
        except Exception as exc:
            self._reporter.problem(
                "append_sync",
                logging.WARNING,
                "spool %s: could not write %d signals at exit (%s)",
                store.path,
                len(batch),
                exc,
                exc=exc,
            )
            result = AppendResult((), len(batch), 0)
        finally:
            store.close()
        self._failed += result.failed
        return result


async def open_spool(
    directory: str | os.PathLike[str],
    *,
    max_bytes: int = 64 * 2**20,
    max_age: float = 7 * 86400,
    durability: Literal["spill", "always"] = "spill",
    lease: float = DEFAULT_LEASE,
    clock: Callable[[], float] = time.time,
    destination: Destination | None = None,
) -> Spool:
    """Open (create, or repair) the spool in ``directory`` for this process.

    ``max_bytes`` bounds the total body size (oldest records are evicted beyond it),
    ``max_age`` the age in seconds after which unsent records expire, ``durability`` is
    ``"spill"`` or ``"always"`` (see the module documentation), ``lease`` how long (seconds)
    this process counts as alive after its last heartbeat. ``clock`` gives unix time; tests
    pass a fake one to move time forward. ``destination`` (the client's endpoint URL and app
    ID) tags every record stored and limits claims and expiry to records of that destination;
    without one the spool claims records of any destination (for tools, not for clients).

    Never raises for disk problems: a directory that cannot be used gives a ``disabled`` spool.
    Raises :class:`ConfigurationError` for invalid options.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ConfigurationError("max_bytes", f"must be a positive int, got {max_bytes!r}")
    if not (max_age > 0 and math.isfinite(max_age)):
        raise ConfigurationError("max_age", f"must be positive seconds, got {max_age!r}")
    if durability not in ("spill", "always"):
        raise ConfigurationError("durability", f'must be "spill" or "always", got {durability!r}')
    if not (lease > 0 and math.isfinite(lease)):
        raise ConfigurationError("lease", f"must be positive seconds, got {lease!r}")
    settings = _Settings(
        # Absolute now, so a later chdir() cannot move the spool; getcwd() is one cheap syscall.
        directory=Path(os.getcwd(), os.fspath(directory)),
        max_bytes=max_bytes,
        max_age=float(max_age),
        durability=durability,
        lease=float(lease),
        clock=clock,
        owner_id=secrets.token_hex(8),
        pid=os.getpid(),
        hostname=socket.gethostname(),
        destination=destination,
    )
    spool = Spool(settings)
    try:
        await spool._start()
    except BaseException:
        # Cancelled while opening: the thread finishes the open, then closes the owner again.
        spool._closed = True
        spool._worker.stop(_Stop(crash=False, loop=None, future=None))
        raise
    _log.debug("spool %s opened (owner %s, %s)", settings.db_path, settings.owner_id, durability)
    return spool


def append_pending_blocking(
    directory: str | os.PathLike[str],
    records: Sequence[SpoolRecord],
    *,
    max_bytes: int,
    max_age: float,
    durability: Literal["spill", "always"],
    destination: Destination | None = None,
) -> AppendResult:
    """Open the spool in ``directory``, store ``records`` pending, close it: all blocking.

    For an exit hook in a process that has no spool open: the same open (repair, owner
    registration), append and close as :func:`open_spool`, :meth:`Spool.append` and
    :meth:`Spool.close`, run in the calling thread with no worker thread and no event loop.
    Never raises for disk problems: what could not be stored is counted ``failed``.
    """
    settings = _Settings(
        directory=Path(os.getcwd(), os.fspath(directory)),
        max_bytes=max_bytes,
        max_age=float(max_age),
        durability=durability,
        lease=30.0,
        clock=time.time,
        owner_id=secrets.token_hex(8),
        pid=os.getpid(),
        hostname=socket.gethostname(),
        destination=destination,
    )
    batch = tuple(records)
    job = _Job(
        lambda store: store.append(batch, None),
        AppendResult((), len(batch), 0),
        append=(batch, None),
    )
    result = job.fallback
    # The worker's own open, write and close, run here: its thread is never started.
    worker = _Worker(settings, _Reporter())
    worker._open()
    if not worker.disabled and batch:
        try:
            (result,) = worker._write([job], sum(len(r.body) for r in batch))
        except Exception as exc:
            worker._failed(exc)
        else:
            worker.reporter.success(worker.store.path)
    worker._shutdown(_Stop(crash=False, loop=None, future=None))
    return result
