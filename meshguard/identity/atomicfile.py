"""Crash-safe file writes: a file is either absent, its old content or its complete new content."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with permissions ``mode``, all or nothing.

    The data goes to a temporary file in the same directory, created with ``mode`` (so a secret
    is never readable by others, not even briefly), fsynced, then moved into place and the
    directory fsynced. Without ``overwrite`` the move is a hard link, which fails with
    FileExistsError if ``path`` exists, even if it appeared after the caller checked. The
    temporary file is removed on every path out. Other failures raise OSError.
    """
    directory = path.parent
    temporary = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, mode)
    try:
        try:
            os.fchmod(descriptor, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    fsync_directory(directory)


def remove_durably(path: Path) -> None:
    """Unlink ``path`` and fsync its directory so the removal survives a crash."""
    os.unlink(path)
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Persist the directory entry changes (create, rename, unlink) made in ``directory``."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
