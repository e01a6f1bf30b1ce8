"""The content hash of each image file (MD5 of its bytes), for the run's dataset digest: read once per version of a
file and remembered beside what verifying it found (pipeline.data.verified), so a second run on an unchanged folder
reads no file's bytes. A file whose size or modification time changed, or a new one, is read and hashed again.

The hash is of the bytes alone (no path, no time): the same files give the same hashes on any machine, with or
without a cache. Files are read on a thread per CPU (reading and hashing release the GIL), a bounded number in flight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from pipeline.data.scan import REMEMBER_EVERY, bounded_map
from pipeline.data.verified import Key, VerifiedFiles
from pipeline.data.workers import available_cpus


def md5(path: str | Path) -> bytes:
    """The MD5 of the file's bytes (16 bytes), read in blocks."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, lambda: hashlib.md5(usedforsecurity=False)).digest()


def _hashed(path: str) -> tuple[Key, bytes]:
    # The key is taken before the file is read: a file changed while it is read is hashed again next time.
    return Key.of(Path(path)), md5(path)


class FileHashes:
    """Content hashes of files, remembered in the verified-files database under `cache_dir` (None: nothing is
    remembered, every file is read). Use as a context manager, or close() it."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache = VerifiedFiles.open(cache_dir) if cache_dir is not None else None
        self.read = 0  # files read and hashed (not taken from the cache), for the benchmark and the tests

    def __call__(self, paths: Sequence[str]) -> list[bytes]:
        """The hash of each file, in order. A file that cannot be read raises the file system's error."""
        if self.cache is None:
            found: list[bytes | None] = [None] * len(paths)
        else:
            found = list(self.cache.hashes([Key.of(Path(path)) for path in paths]))
        missing = [index for index, known in enumerate(found) if known is None]
        fresh: list[tuple[Key, bytes]] = []
        for index, (key, digest) in zip(
            missing, bounded_map(lambda index: _hashed(paths[index]), missing, available_cpus()), strict=True
        ):
            found[index] = digest
            fresh.append((key, digest))
            if self.cache is not None and len(fresh) >= REMEMBER_EVERY:
                self.cache.remember_hashes(fresh)
                fresh = []
        if self.cache is not None:
            self.cache.remember_hashes(fresh)
        self.read += len(missing)
        return [digest for digest in found if digest is not None]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> FileHashes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
