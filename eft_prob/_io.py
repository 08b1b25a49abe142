"""Atomic file output: write to a temporary file in the target's directory, then rename it into place.

A crash or an error leaves either the previous file or the complete new one, never a partial file.
Files get the permissions of a plain ``open(path, "w")`` (0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp: str, path: str) -> None:
    """Give ``tmp`` ordinary file permissions and rename it to ``path`` (atomic on one file system)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def temporary(path: str) -> str:
    """An empty temporary file next to ``path`` (hidden, removed by :func:`atomic_write` on failure)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    return tmp


def atomic_write(path: str, write, *, fsync: bool = False) -> None:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then :func:`publish` it as ``path``."""
    tmp = temporary(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
