"""What verifying each image file found, remembered between runs, so a folder is checked once and not at every start.

One SQLite database (`<data.cache_dir>/verified.sqlite3`) holds a row per file, keyed by its absolute path, size and
modification time (to the nanosecond): a file whose size or time changed, or a new file, has no row that matches, and
is checked again. A row keeps the facts a check found rather than a verdict — the width and height, how far the file
was verified (its size read, its header verified, or its pixels decoded), or the error — so changing data.min_size or
data.max_image_pixels needs no new check, and a file verified only by its header is decoded when data.verify=full
asks for more.

A second table holds each file's content hash (MD5 of its bytes) under the same key, so the run's dataset digest
(pipeline.tracking.datasets) reads a file once, not at every start: a changed file has no matching row and is read
and hashed again.

SQLite's write-ahead log lets runs started together (sweep trials, data-parallel ranks, several trainings) read and
write the same database: each writes its rows in short transactions, and a run that finds the database locked waits
for it. It must be on a local disk (the log needs shared memory, which network filesystems do not give); a database
that cannot be opened is said in a warning, and the run checks every file as if there were no cache.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
DATABASE = "verified.sqlite3"
SCHEMA_VERSION = 3  # SQLite's user_version: a database of another layout is started afresh
LOOKUP_BATCH = 900  # paths per query: below SQLite's limit of host parameters on older builds (999)
BUSY_TIMEOUT_MS = 60_000  # how long a run waits for another's write to finish

# How far a file was verified; a remembered result answers any request up to its level.
SIZE_READ, HEADER, DECODED = 0, 1, 2


@dataclass(frozen=True)
class Key:
    """What identifies one version of a file: it is checked again when any of these changes."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Key:
        stat = os.stat(path)
        return cls(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class Facts:
    """What checking a file found: `level` (SIZE_READ, HEADER or DECODED) it was verified to, its size in pixels
    (0 when unknown), or the error that stopped the check there."""

    level: int
    width: int = 0
    height: int = 0
    error: str | None = None


def _printable(error: str | None) -> str | None:
    """An error message as UTF-8 text (it may quote a file name that is not UTF-8)."""
    return None if error is None else error.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class VerifiedFiles:
    """The database of checked files under one cache folder."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self.connection = connection
        self.path = path

    @classmethod
    def open(cls, folder: str | Path) -> VerifiedFiles | None:
        """The database in `folder` (created with its folder when missing), or None, with a warning saying why, when
        it cannot be used: the scan then checks every file."""
        path = Path(folder).expanduser() / DATABASE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")  # with WAL: a power cut loses the last rows, never all
            if connection.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                with _transaction(connection):
                    connection.execute("DROP TABLE IF EXISTS files")
                    connection.execute("DROP TABLE IF EXISTS contents")
                    connection.execute(
                        "CREATE TABLE files (path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                        " level INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, error TEXT)"
                        " WITHOUT ROWID"
                    )
                    connection.execute(
                        "CREATE TABLE contents (path BLOB PRIMARY KEY, size INTEGER NOT NULL,"
                        " mtime_ns INTEGER NOT NULL, md5 BLOB NOT NULL) WITHOUT ROWID"
                    )
                    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as error:
            log.warning(
                "Not remembering verified image files: %s cannot be used (%s). Every file is checked at every start; "
                "point data.cache_dir at a writable folder on a local disk, or data.cache_dir=null to silence this.",
                path,
                error,
            )
            return None
        return cls(connection, path)

    def _rows(self, table: str, columns: str, keys: Sequence[Key]) -> Iterator[tuple | None]:
        """The `columns` of `table` remembered for each key, in order; None for a file not seen in this version."""
        for start in range(0, len(keys), LOOKUP_BATCH):
            batch = keys[start : start + LOOKUP_BATCH]
            marks = ",".join("?" * len(batch))
            rows = self.connection.execute(
                f"SELECT path, size, mtime_ns, {columns} FROM {table} WHERE path IN ({marks})",
                [os.fsencode(key.path) for key in batch],
            ).fetchall()
            found = {row[0]: row for row in rows}
            for key in batch:
                row = found.get(os.fsencode(key.path))
                matches = row is not None and row[1] == key.size and row[2] == key.mtime_ns
                yield row[3:] if matches else None

    def _store(self, table: str, rows: list[tuple], what: str) -> None:
        if not rows:
            return
        marks = ",".join("?" * len(rows[0]))
        try:
            with _transaction(self.connection):
                self.connection.executemany(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", rows)
        except sqlite3.Error as error:  # a full disk, say: the files were checked all the same
            log.warning("Could not remember the %s of %d image files in %s: %s", what, len(rows), self.path, error)

    def lookup(self, keys: Sequence[Key]) -> Iterator[Facts | None]:
        """The remembered facts of each key, in order; None for a file never checked in this version."""
        for row in self._rows("files", "level, width, height, error", keys):
            yield None if row is None else Facts(*row)

    def remember(self, results: Iterable[tuple[Key, Facts]]) -> None:
        """Store the facts of checked files, replacing what an older version of each file left."""
        # Paths as the file system's bytes: a name that is not UTF-8 (kept by Python as surrogates) is a valid key.
        rows = [
            (os.fsencode(k.path), k.size, k.mtime_ns, f.level, f.width, f.height, _printable(f.error))
            for k, f in results
        ]
        self._store("files", rows, "checks")

    def hashes(self, keys: Sequence[Key]) -> Iterator[bytes | None]:
        """The remembered content hash of each key, in order; None for a file not hashed in this version."""
        for row in self._rows("contents", "md5", keys):
            yield None if row is None else bytes(row[0])

    def remember_hashes(self, hashed: Iterable[tuple[Key, bytes]]) -> None:
        """Store the content hashes of files, replacing what an older version of each file left."""
        self._store("contents", [(os.fsencode(k.path), k.size, k.mtime_ns, md5) for k, md5 in hashed], "hashes")

    def close(self) -> None:
        self.connection.close()


class _transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on an error): the write lock is taken first, so two runs writing at once
    wait for each other instead of failing when one upgrades a read to a write."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self.connection.execute("COMMIT" if kind is None else "ROLLBACK")
