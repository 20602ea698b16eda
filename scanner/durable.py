"""Files that survive power loss whole: the old version or the new one, never a part.

The gate runs on SD cards with bad power; a file it relies on after a restart (the seq mark,
lists an operator replaced, the command replay record) is written beside its target, synced,
renamed over it, and the rename made durable by syncing the directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path


def write_temp(target: Path, data: bytes) -> Path:
    """A synced temp file (0600) beside ``target`` holding exactly ``data``; raises OSError,
    leaving none behind."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent)
    tmp = Path(name)
    try:
        try:
            view = memoryview(data)
            while view:
                # On a nearly full file system a write stores part and reports no error; only the
                # next one fails (ENOSPC). Stopping at the first would install a cut-off deny list.
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, f"{target.name}: the write stored nothing")
                view = view[written:]
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        # A truncated text list still parses, so a check after this could not notice one.
        if size != len(data) or tmp.read_bytes() != data:
            raise OSError(errno.EIO, f"{target.name}: {size} of {len(data)} bytes on disk, or not those sent")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def replace_file(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data`` (mode 0600) so that a crash leaves the old or the new file."""
    tmp = write_temp(target, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames and creations in ``directory`` durable: until its entry is on disk, power
    loss right after an "ok" can bring the old file back."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
