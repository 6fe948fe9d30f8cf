"""The default user: a random id made once per installation and kept in a small file.

When a signal names no user and the client has no ``default_user``, TelemetryDeck's SDKs use
an id that stays the same across restarts (the Kotlin SDK keeps a UUID in a file). We do the
same: a UUID4 is generated on first use and written to

* ``{spool_dir}/default-user-<app>.id`` when the client has a ``spool_dir`` (so every worker
  process sharing that spool also shares the id), else
* ``{user data dir}/telemetrydeck-async/default-user-<app>.id``, where the user data dir is
  ``$XDG_DATA_HOME`` or ``~/.local/share`` on Linux and other Unixes,
  ``~/Library/Application Support`` on macOS and ``%LOCALAPPDATA%`` on Windows, or
* the path given as ``default_user_file=``.

``<app>`` is the first 12 hex digits of the SHA-256 of the app ID, so two apps on one machine
get unrelated ids (no linking of users across apps) and the file name stays safe whatever the
app ID contains. The id is random: never derived from the hostname, a MAC address or the login
name. Like every user id it is hashed with the salt before it leaves the process.

The file is written atomically (a 0600 temporary file, then a hard link that fails if another
process won the race, so concurrent first starts agree on one id). If the file cannot be read
or written (a read-only home, a container without one), the client logs one warning and uses a
random id kept in memory for the rest of the process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Final

__all__ = ["default_user_path", "load_or_create_default_user", "user_data_dir"]

log = logging.getLogger("telemetrydeck_async")

_DIR_NAME: Final = "telemetrydeck-async"
# What we accept back from the file: a UUID (ours), or any similar opaque token someone put
# there on purpose. Anything else (empty, binary, huge) is treated as damaged and replaced.
_VALID_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")

# Paths whose file could not be used, with the in-memory id that stands in for it: one warning
# per path and one stable id per process, however many clients are created.
_memory_ids: dict[str, str] = {}


def user_data_dir() -> Path:
    """This platform's per-user data directory for the SDK (created on first write only)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = str(Path.home() / "Library" / "Application Support")
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / _DIR_NAME


def default_user_path(
    app_id: str, spool_dir: str | None = None, override: str | None = None
) -> Path:
    """Where the default user of ``app_id`` is kept: ``override``, else the spool, else data dir."""
    if override is not None:
        return Path(override)
    name = f"default-user-{hashlib.sha256(app_id.encode()).hexdigest()[:12]}.id"
    directory = Path(spool_dir) if spool_dir is not None else user_data_dir()
    return directory / name


def load_or_create_default_user(path: Path) -> tuple[str, bool]:
    """Return ``(id, created)``: the id kept at ``path``, made and written there if missing.

    ``created`` is True only when this call wrote a new file (a new installation). Never
    raises for file-system trouble: it logs a warning once and falls back to an id in memory.
    """
    key = str(path)
    remembered = _memory_ids.get(key)
    if remembered is not None:
        return remembered, False
    try:
        existing = _read(path)
        if existing is not None and _VALID_ID.fullmatch(existing):
            return existing, False
        if existing is not None:
            log.warning("the default user file %s is damaged; writing a new id", path)
        return _create(path)
    except OSError as exc:
        fallback = str(uuid.uuid4())
        _memory_ids[key] = fallback
        log.warning(
            "cannot keep the default user id in %s (%s: %s); using a random id in memory "
            "for this process (pass default_user= or default_user_file= to choose)",
            path,
            type(exc).__name__,
            exc.strerror or exc,
        )
        return fallback, False


def _read(path: Path) -> str | None:
    """The file's stripped text, or None when there is no file."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None


def _create(path: Path) -> tuple[str, bool]:
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    new_id = str(uuid.uuid4())
    tmp = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, (new_id + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # A hard link appears atomically and fails if the name exists: when two processes
            # start for the first time together, exactly one id wins and both use it.
            os.link(tmp, path)
        except FileExistsError:
            winner = _read(path)
            if winner is not None and _VALID_ID.fullmatch(winner):
                return winner, False
            os.replace(tmp, path)  # the existing file is damaged: replace it
        except OSError:
            # No hard links here (some network or FAT file systems): rename instead, which is
            # still atomic but lets a concurrent first start overwrite; both ids are random.
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return new_id, True
