"""The trust store: the ``authorized_keys/`` directory of peers allowed into this node's mesh.

Layout: one file ``<name>.pub`` per trusted peer, holding the peer's Ed25519 public key as
standard base64 on one line. ``<name>`` is 1 to 64 characters of ``A-Z a-z 0-9 . _ -`` and does
not start with a dot. Files not ending in ``.pub`` and hidden files (such as the temporary files
of an interrupted write) are ignored, so an admin can keep notes there.

Loading never stops at a bad file: every ``.pub`` file that cannot be used (bad name, unreadable,
not a valid key, same key as another file) is reported as a ``TrustProblem`` with the reason,
and every good file is still loaded. Changes are written atomically (``atomicfile``).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from meshguard.errors import UserError
from meshguard.identity.atomicfile import remove_durably, write_atomically
from meshguard.identity.keyfile import HEADER as PRIVATE_KEY_HEADER
from meshguard.identity.keys import (
    is_valid_ed25519_public_key,
    public_key_from_base64,
    public_key_to_base64,
)

PUBLIC_KEY_SUFFIX = ".pub"
PUBLIC_KEY_FILE_MODE = 0o644
MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_MAX_PUBLIC_KEY_FILE_SIZE = 1024


class TrustStoreError(UserError):
    """A trust store change was refused (bad name or key, duplicate, unknown peer, I/O error)."""


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A peer this node trusts: the file name it is stored under and its Ed25519 public key."""

    name: str
    public_key: bytes


@dataclass(frozen=True, slots=True)
class TrustProblem:
    """A ``.pub`` file that was not loaded, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path.name}: {self.reason}"


@dataclass(frozen=True, slots=True)
class TrustLoadResult:
    """What loading the directory found: usable keys (sorted by name) and problem files."""

    keys: tuple[TrustedKey, ...]
    problems: tuple[TrustProblem, ...]

    def by_public_key(self) -> dict[bytes, TrustedKey]:
        """The trusted keys indexed by public key (each key appears once after loading)."""
        return {trusted.public_key: trusted for trusted in self.keys}


def is_valid_name(name: str) -> bool:
    """Whether ``name`` can name a trusted peer (and so a file in the directory)."""
    return _NAME.fullmatch(name) is not None


def check_name(name: str) -> None:
    """Raise TrustStoreError unless ``name`` is a valid peer name."""
    if not is_valid_name(name):
        raise TrustStoreError(
            f"invalid name {name!r}: use 1 to {MAX_NAME_LENGTH} characters from "
            "A-Z a-z 0-9 . _ - not starting with '.'"
        )


def read_public_key_file(path: Path) -> bytes:
    """The public key in a ``.pub`` file; ValueError (with the reason) if it is not usable."""
    try:
        # O_NONBLOCK: a FIFO left here by mistake must not hang the caller.
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise ValueError(f"cannot read: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("not a regular file")
        data = os.read(descriptor, _MAX_PUBLIC_KEY_FILE_SIZE + 1)
    except OSError as error:
        raise ValueError(f"cannot read: {error.strerror}") from None
    finally:
        os.close(descriptor)
    if len(data) > _MAX_PUBLIC_KEY_FILE_SIZE:
        raise ValueError("too large for a public key file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("not ASCII text") from None
    if not text.strip():
        raise ValueError("empty")
    if text.startswith(PRIVATE_KEY_HEADER):
        raise ValueError("this is a private key file: give the peer's public key instead")
    return public_key_from_base64(text)


def public_key_from_argument(key_or_file: str) -> bytes:
    """A public key given on the command line: base64 text, or the path of a ``.pub`` file.

    Base64 wins when the text decodes to 32 bytes (a real path never looks like that by chance);
    otherwise an existing file is read. Raises TrustStoreError saying what is wrong.
    """
    try:
        return public_key_from_base64(key_or_file)
    except ValueError as error:
        key_error = error
    if not os.path.lexists(key_or_file):
        if key_or_file.endswith(PUBLIC_KEY_SUFFIX) or os.sep in key_or_file:
            raise TrustStoreError(f"no such file: {key_or_file}")
        raise TrustStoreError(f"{key_or_file!r} is not a public key: {key_error}")
    try:
        return read_public_key_file(Path(key_or_file))
    except ValueError as error:
        raise TrustStoreError(f"{key_or_file}: {error}") from None


@dataclass(frozen=True, slots=True)
class _Entry:
    """One ``.pub`` file as found on disk: a key, or the reason it has none."""

    name: str
    path: Path
    public_key: bytes | None
    reason: str


class TrustStore:
    """The ``authorized_keys/`` directory. A missing directory is an empty store."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    @property
    def directory(self) -> Path:
        return self._directory

    def path_for(self, name: str) -> Path:
        """The file that holds (or would hold) the key of peer ``name``."""
        return self._directory / f"{name}{PUBLIC_KEY_SUFFIX}"

    def load(self) -> TrustLoadResult:
        """Every usable trusted key and every problem file (raises TrustStoreError only if the
        directory itself cannot be read).

        When two files hold the same key, the first by name is trusted and the other reported.
        """
        keys: list[TrustedKey] = []
        problems: list[TrustProblem] = []
        first_name: dict[bytes, str] = {}
        for entry in self._scan():
            if entry.public_key is None:
                problems.append(TrustProblem(entry.path, entry.reason))
            elif entry.public_key in first_name:
                earlier = first_name[entry.public_key]
                problems.append(
                    TrustProblem(entry.path, f"same key as {earlier}{PUBLIC_KEY_SUFFIX}, ignored")
                )
            else:
                first_name[entry.public_key] = entry.name
                keys.append(TrustedKey(entry.name, entry.public_key))
        return TrustLoadResult(tuple(keys), tuple(problems))

    def list(self) -> tuple[TrustedKey, ...]:
        """The usable trusted keys, sorted by name (problems are left to ``load``)."""
        return self.load().keys

    def add(self, name: str, public_key: bytes) -> TrustedKey:
        """Trust ``public_key`` under ``name``; creates the directory if needed.

        Refuses (TrustStoreError, nothing changed) a bad name, an invalid key, a name already
        in use (even by a corrupt file) and a key already trusted under another name.
        """
        check_name(name)
        if not is_valid_ed25519_public_key(public_key):
            raise TrustStoreError("not a valid Ed25519 public key")
        path = self.path_for(name)
        taken = f"a key named {name!r} is already trusted ({path}); remove it first"
        if os.path.lexists(path):
            raise TrustStoreError(taken)
        for entry in self._scan():
            if entry.public_key == public_key:
                raise TrustStoreError(f"this key is already trusted as {entry.name!r}")
        try:
            self._directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as error:
            raise TrustStoreError(f"cannot create {self._directory}: {error.strerror}") from None
        try:
            content = f"{public_key_to_base64(public_key)}\n".encode("ascii")
            write_atomically(path, content, mode=PUBLIC_KEY_FILE_MODE, overwrite=False)
        except FileExistsError:
            raise TrustStoreError(taken) from None
        except OSError as error:
            raise TrustStoreError(f"cannot write {path}: {error.strerror}") from None
        return TrustedKey(name, public_key)

    def remove(self, name_or_key: str) -> tuple[str, ...]:
        """Stop trusting a peer, given its name or its base64 public key; returns removed names.

        By name, the file goes even if its content is corrupt. By key, every file holding that
        key goes. Raises TrustStoreError if nothing matches.
        """
        if is_valid_name(name_or_key):
            path = self.path_for(name_or_key)
            if not os.path.lexists(path):
                raise TrustStoreError(f"no trusted key named {name_or_key!r}")
            self._remove(path)
            return (name_or_key,)
        try:
            public_key = public_key_from_base64(name_or_key)
        except ValueError as error:
            raise TrustStoreError(
                f"{name_or_key!r} is neither a peer name nor a public key ({error})"
            ) from None
        matching = [entry for entry in self._scan() if entry.public_key == public_key]
        if not matching:
            raise TrustStoreError(f"the key {name_or_key} is not trusted")
        for entry in matching:
            self._remove(entry.path)
        return tuple(entry.name for entry in matching)

    def _remove(self, path: Path) -> None:
        try:
            remove_durably(path)
        except OSError as error:
            raise TrustStoreError(f"cannot remove {path}: {error.strerror}") from None

    def _scan(self) -> tuple[_Entry, ...]:
        """Every ``.pub`` file in the directory, sorted by peer name."""
        try:
            file_names = sorted(
                os.listdir(self._directory),
                key=lambda file_name: file_name.removesuffix(PUBLIC_KEY_SUFFIX),
            )
        except FileNotFoundError:
            return ()
        except OSError as error:
            raise TrustStoreError(f"cannot read {self._directory}: {error.strerror}") from None
        entries: list[_Entry] = []
        for file_name in file_names:
            if file_name.startswith(".") or not file_name.endswith(PUBLIC_KEY_SUFFIX):
                continue
            name = file_name[: -len(PUBLIC_KEY_SUFFIX)]
            path = self._directory / file_name
            if not is_valid_name(name):
                entries.append(_Entry(name, path, None, "invalid peer name, ignored"))
                continue
            try:
                entries.append(_Entry(name, path, read_public_key_file(path), ""))
            except ValueError as error:
                entries.append(_Entry(name, path, None, str(error)))
        return tuple(entries)
