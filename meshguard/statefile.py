"""The last known members and their endpoints, kept on disk so a restarted node rejoins alone.

``<config dir>/state.json``, mode 0600, replaced atomically (temporary file, fsync, rename), so
a crash leaves either the previous or the new file, never a torn one. Its content::

    {"version": 1, "saved_at": 1700000000.0,
     "members": [{"public_key": "<base64>", "endpoints": ["192.0.2.1:51821", "[2001:db8::1]:51821"],
                  "last_seen": 1699999990.0}, ...]}

It is a hint, not a source of truth: the addresses only seed SWIM's join, whose authentication
decides who is a member. So a file that cannot be read or does not validate is reported in one
line and ignored (the node starts as if it had none), and members that had been gone for
``max_age`` when the file was written are forgotten (however long the node itself was off,
the addresses it last knew are its best hint).
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshguard.discovery import Seed, SeedError, parse_host_port
from meshguard.identity.atomicfile import write_atomically
from meshguard.identity.keys import public_key_from_base64, public_key_to_base64
from meshguard.sansio.messages import Endpoint
from meshguard.sansio.types import Address

STATE_FILE_NAME = "state.json"
STATE_VERSION = 1
DEFAULT_MAX_AGE = 7 * 86400.0
"""Members unseen for a week are forgotten: their addresses are likely someone else's by now."""
MAX_MEMBERS = 100_000
MAX_ENDPOINTS = 16


@dataclass(frozen=True, slots=True)
class KnownMember:
    public_key: bytes
    endpoints: tuple[Endpoint, ...]
    last_seen: float
    """Unix time this node last believed the member alive."""


@dataclass(frozen=True, slots=True)
class SavedState:
    members: tuple[KnownMember, ...] = ()
    saved_at: float = 0.0

    def seed_addresses(self, exclude: bytes | None = None) -> list[Address]:
        """Every endpoint, most recently seen member first, without duplicates or ``exclude``."""
        addresses: dict[Address, None] = {}
        for member in sorted(self.members, key=lambda m: -m.last_seen):
            if member.public_key != exclude:
                addresses.update(dict.fromkeys((e.host, e.port) for e in member.endpoints))
        return list(addresses)


@dataclass(frozen=True, slots=True)
class LoadedState:
    state: SavedState
    problem: str | None
    """One line saying why the file was ignored, or None."""


class StateFileError(ValueError):
    """The state file's content does not validate."""


def state_path(config_dir: Path) -> Path:
    return config_dir / STATE_FILE_NAME


def encode_state(state: SavedState) -> bytes:
    document = {
        "version": STATE_VERSION,
        "saved_at": state.saved_at,
        "members": [
            {
                "public_key": public_key_to_base64(member.public_key),
                "endpoints": [str(Seed(e.host, e.port)) for e in member.endpoints],
                "last_seen": member.last_seen,
            }
            for member in sorted(state.members, key=lambda m: m.public_key)
        ],
    }
    return json.dumps(document, indent=1).encode() + b"\n"


def _time(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StateFileError(f"{what} is not a time")
    return float(value)


def _member(entry: Any, index: int) -> KnownMember:
    what = f"member {index}"
    if not isinstance(entry, dict):
        raise StateFileError(f"{what} is not an object")
    key_text, endpoints = entry.get("public_key"), entry.get("endpoints")
    if not isinstance(key_text, str):
        raise StateFileError(f"{what} has no public_key")
    try:
        public_key = public_key_from_base64(key_text)
    except ValueError as error:
        raise StateFileError(f"{what}: public_key: {error}") from None
    if not isinstance(endpoints, list) or len(endpoints) > MAX_ENDPOINTS:
        raise StateFileError(f"{what}: endpoints is not a list of at most {MAX_ENDPOINTS}")
    parsed = []
    for text in endpoints:
        if not isinstance(text, str):
            raise StateFileError(f"{what}: an endpoint is not a string")
        try:
            seed = parse_host_port(text, what=f"{what} endpoint")
        except SeedError as error:
            raise StateFileError(str(error)) from None
        try:
            ipaddress.ip_address(seed.host)
        except ValueError:
            raise StateFileError(f"{what}: endpoint {text!r} is not an IP address") from None
        parsed.append(Endpoint(seed.host, seed.port))
    return KnownMember(
        public_key, tuple(parsed), _time(entry.get("last_seen"), f"{what} last_seen")
    )


def decode_state(data: bytes) -> SavedState:
    """Parse and validate a state file; raises StateFileError saying what is wrong."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise StateFileError(f"not JSON ({error})") from None
    if not isinstance(document, dict):
        raise StateFileError("not a JSON object")
    if document.get("version") != STATE_VERSION:
        raise StateFileError(f"version {document.get('version')!r} is not {STATE_VERSION}")
    members = document.get("members")
    if not isinstance(members, list) or len(members) > MAX_MEMBERS:
        raise StateFileError(f"members is not a list of at most {MAX_MEMBERS}")
    decoded = [_member(entry, index) for index, entry in enumerate(members)]
    if len({m.public_key for m in decoded}) != len(decoded):
        raise StateFileError("a member appears twice")
    return SavedState(tuple(decoded), _time(document.get("saved_at"), "saved_at"))


def load_state(path: Path, *, max_age: float = DEFAULT_MAX_AGE) -> LoadedState:
    """Read the state file; never raises. A missing file is an empty state without a problem.

    Members that had not been seen for ``max_age`` when the file was saved are left out.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return LoadedState(SavedState(), None)
    except OSError as error:
        return LoadedState(SavedState(), f"cannot read state file {path}: {error.strerror}")
    try:
        state = decode_state(data)
    except StateFileError as error:
        return LoadedState(SavedState(), f"ignoring corrupt state file {path}: {error}")
    fresh = tuple(m for m in state.members if state.saved_at - m.last_seen <= max_age)
    return LoadedState(SavedState(fresh, state.saved_at), None)


def save_state(path: Path, state: SavedState) -> None:
    """Replace the state file atomically with mode 0600; raises OSError on failure."""
    write_atomically(path, encode_state(state), mode=0o600, overwrite=True)


class StateSaver:
    """Keeps the state file in step with membership, writing at most once per ``min_interval``.

    The daemon calls ``update`` with the members it believes alive whenever membership changes
    (and ``on_timer`` at ``next_deadline()``; ``flush`` on exit). Members that are no longer
    alive stay in the file with their last ``last_seen`` until ``max_age`` has passed, so a
    node that restarts after its peers went down still knows where they were. A write happens
    only when the set of members or their endpoints changed.
    """

    def __init__(
        self,
        path: Path,
        *,
        initial: SavedState | None = None,
        min_interval: float = 10.0,
        max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        self.path = path
        self.min_interval = min_interval
        self.max_age = max_age
        self._known = {m.public_key: m for m in (initial or SavedState()).members}
        self._written = _layout(self._known.values())
        self._pending: SavedState | None = None
        self._last_write = -math.inf

    def update(
        self, alive: Mapping[bytes, Sequence[Endpoint]], *, now: float, wall_time: float
    ) -> None:
        """Record the members believed alive now; writes at once or schedules a write."""
        for public_key, endpoints in alive.items():
            if endpoints:
                self._known[public_key] = KnownMember(public_key, tuple(endpoints), wall_time)
        for public_key, member in list(self._known.items()):
            if wall_time - member.last_seen > self.max_age:
                del self._known[public_key]
        members = tuple(sorted(self._known.values(), key=lambda m: m.public_key))
        if _layout(members) == self._written:
            self._pending = None
            return
        self._pending = SavedState(members, wall_time)
        self.on_timer(now)

    def next_deadline(self) -> float | None:
        return None if self._pending is None else self._last_write + self.min_interval

    def on_timer(self, now: float) -> None:
        if self._pending is not None and now >= self._last_write + self.min_interval:
            self.flush(now)

    def flush(self, now: float) -> None:
        """Write the pending state now; raises OSError (and the state stays pending)."""
        if self._pending is None:
            return
        save_state(self.path, self._pending)
        self._written = _layout(self._pending.members)
        self._pending, self._last_write = None, now


def _layout(members: Iterable[KnownMember]) -> dict[bytes, tuple[Endpoint, ...]]:
    """What a write would change: members and endpoints, not the times."""
    return {m.public_key: m.endpoints for m in members}
