"""Files written whole or not at all: the one way dfine writes a checkpoint, config, metrics file or plot."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", newline: str | None = None) -> Iterator[IO]:
    """An open file whose content replaces ``path`` when the block ends without an exception: written to a
    temporary file in the same folder, fsynced, renamed over ``path`` (so a reader, or a crash, sees the old
    complete file or the new complete one, never a part), then the folder fsynced so the rename lasts. On an
    exception the temporary file is removed and ``path`` is left as it was. The file gets the permissions the
    umask gives any new file (``mkstemp`` alone would make it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened and synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it
    os.umask(mask)
    return mask
