"""The private key file: the node's one secret, on disk.

Format (ASCII, two lines, each ending in a newline)::

    meshguard-ed25519-private-key-v1
    <standard base64 of the 32-byte Ed25519 seed>

The first line names the format so that a public key, a WireGuard key or some other file given
by mistake is refused with a clear message rather than misread. The X25519 key and both mesh
addresses are derived from the seed, so nothing else is stored.

The file is written atomically with mode 0600 (see ``atomicfile``) and never replaced unless
``force`` is given. Like ssh, loading refuses a key file that group or others may access.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from meshguard.errors import UserError
from meshguard.identity.atomicfile import write_atomically
from meshguard.identity.keys import SEED_SIZE, Identity

HEADER = "meshguard-ed25519-private-key-v1"
KEY_FILE_MODE = 0o600
_MAX_KEY_FILE_SIZE = 1024


class KeyFileError(UserError):
    """The private key file is missing, malformed, exposed, or cannot be written."""


def format_identity(identity: Identity) -> bytes:
    """The key file content for ``identity``."""
    seed = base64.b64encode(identity.seed).decode("ascii")
    return f"{HEADER}\n{seed}\n".encode("ascii")


def parse_identity(data: bytes) -> Identity:
    """The identity stored in key file content ``data``; ValueError says what is wrong."""
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise ValueError("not a meshguard private key file (not ASCII text)") from None
    if not lines or lines[0].strip() != HEADER:
        raise ValueError(f"not a meshguard private key file (the first line must be {HEADER!r})")
    if len(lines) != 2:
        raise ValueError("malformed key file (expected exactly two lines)")
    encoded = lines[1].strip()
    try:
        seed = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("malformed key file (the key is not valid base64)") from None
    if len(seed) != SEED_SIZE:
        raise ValueError(f"malformed key file (the key is {len(seed)} bytes, not {SEED_SIZE})")
    return Identity.from_seed(seed)


def save_identity(path: Path, identity: Identity, *, force: bool = False) -> None:
    """Write ``identity`` to ``path`` atomically with mode 0600.

    Refuses (KeyFileError) if ``path`` exists unless ``force``; the old file is then replaced in
    one step, never left half-written. The directory must exist.
    """
    refusal = f"refusing to overwrite the existing key file {path} (use --force to replace it)"
    if not force and os.path.lexists(path):
        raise KeyFileError(refusal)
    try:
        write_atomically(path, format_identity(identity), mode=KEY_FILE_MODE, overwrite=force)
    except FileExistsError:
        raise KeyFileError(refusal) from None
    except OSError as error:
        raise KeyFileError(f"cannot write the key file {path}: {error.strerror}") from None


def load_identity(path: Path) -> Identity:
    """Read the identity stored at ``path``.

    Raises KeyFileError if the file is missing, not a regular file, accessible by group or
    others, or not in the format above.
    """
    try:
        # O_NONBLOCK: a FIFO put there by mistake must not hang the caller.
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(
            f"no key file at {path} (run 'meshguard keygen' to create one)"
        ) from None
    except OSError as error:
        raise KeyFileError(f"cannot read the key file {path}: {error.strerror}") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise KeyFileError(f"the key file {path} is not a regular file")
        if status.st_mode & 0o077:
            raise KeyFileError(
                f"the key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {path}"
            )
        data = os.read(descriptor, _MAX_KEY_FILE_SIZE + 1)
    except OSError as error:
        raise KeyFileError(f"cannot read the key file {path}: {error.strerror}") from None
    finally:
        os.close(descriptor)
    if len(data) > _MAX_KEY_FILE_SIZE:
        raise KeyFileError(f"{path}: not a meshguard private key file (too large)")
    try:
        return parse_identity(data)
    except ValueError as error:
        raise KeyFileError(f"{path}: {error}") from None
