"""The state file: atomic private writes, validation on load, and the throttled saver."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from meshguard.identity.keys import Identity, public_key_to_base64
from meshguard.sansio.messages import Endpoint
from meshguard.statefile import (
    DEFAULT_MAX_AGE,
    KnownMember,
    SavedState,
    StateSaver,
    encode_state,
    load_state,
    save_state,
    state_path,
)

T0 = 1_700_000_000.0


def _key() -> bytes:
    return Identity.generate(os.urandom).public_key


A, B, C = sorted(_key() for _ in range(3))
EP_A = (Endpoint("192.0.2.1", 51821), Endpoint("2001:db8::1", 51821))
EP_B = (Endpoint("198.51.100.2", 40000),)


def test_round_trip_and_file_mode(tmp_path: Path) -> None:
    state = SavedState((KnownMember(A, EP_A, T0 - 5), KnownMember(B, EP_B, T0 - 1)), saved_at=T0)
    path = state_path(tmp_path)
    assert path == tmp_path / "state.json"
    save_state(path, state)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    loaded = load_state(path)
    assert loaded.problem is None
    assert loaded.state == state
    document = json.loads(path.read_text())
    assert document["members"][0]["endpoints"] == ["192.0.2.1:51821", "[2001:db8::1]:51821"]
    assert document["members"][0]["public_key"] == public_key_to_base64(A)


def test_overwrite_replaces_the_whole_file(tmp_path: Path) -> None:
    path = state_path(tmp_path)
    save_state(path, SavedState((KnownMember(A, EP_A, T0), KnownMember(B, EP_B, T0)), T0))
    save_state(path, SavedState((KnownMember(C, EP_B, T0),), T0 + 1))
    assert load_state(path).state == SavedState((KnownMember(C, EP_B, T0),), T0 + 1)


def test_missing_file_is_an_empty_state_without_complaint(tmp_path: Path) -> None:
    loaded = load_state(tmp_path / "state.json")
    assert loaded.state == SavedState()
    assert loaded.problem is None


def _valid_document() -> dict[str, object]:
    return json.loads(encode_state(SavedState((KnownMember(A, EP_A, T0),), T0)))  # type: ignore[no-any-return]


def _corrupt(document: dict[str, object], change: str) -> bytes:
    member = document["members"][0]  # type: ignore[index]
    if change == "version":
        document["version"] = 2
    elif change == "members":
        document["members"] = {"a": 1}
    elif change == "saved_at":
        document["saved_at"] = "yesterday"
    elif change == "key":
        member["public_key"] = "AAAA"
    elif change == "endpoint":
        member["endpoints"] = ["2001:db8::1:51821"]
    elif change == "hostname":
        member["endpoints"] = ["seed.example.com:51821"]
    elif change == "last_seen":
        member["last_seen"] = float("nan")
    elif change == "duplicate":
        document["members"] = [member, member]
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ("version", "version 2 is not 1"),
        ("members", "members is not a list"),
        ("saved_at", "saved_at is not a time"),
        ("key", "member 0: public_key: decodes to 3 bytes"),
        ("endpoint", "put an IPv6 address in brackets"),
        ("hostname", "member 0: endpoint 'seed.example.com:51821' is not an IP address"),
        ("last_seen", "member 0 last_seen is not a time"),
        ("duplicate", "a member appears twice"),
    ],
)
def test_invalid_content_is_reported_in_one_line_and_ignored(
    tmp_path: Path, change: str, complaint: str
) -> None:
    path = state_path(tmp_path)
    path.write_bytes(_corrupt(_valid_document(), change))
    loaded = load_state(path)
    assert loaded.state == SavedState()
    assert loaded.problem is not None
    assert loaded.problem.startswith(f"ignoring corrupt state file {path}: ")
    assert complaint in loaded.problem
    assert "\n" not in loaded.problem


@pytest.mark.parametrize(
    "data", [b"", b"{", b"\xff\xfe", b"[]", b"null", b"[" * 100_000, b"1" * 10_000]
)
def test_garbage_never_raises(tmp_path: Path, data: bytes) -> None:
    path = state_path(tmp_path)
    path.write_bytes(data)
    loaded = load_state(path)
    assert loaded.state == SavedState()
    assert loaded.problem is not None
    assert "\n" not in loaded.problem


def test_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    path = state_path(tmp_path)
    path.mkdir()
    loaded = load_state(path)
    assert loaded.state == SavedState()
    assert loaded.problem == f"cannot read state file {path}: Is a directory"


def test_members_gone_long_before_the_save_are_forgotten(tmp_path: Path) -> None:
    path = state_path(tmp_path)
    old = KnownMember(A, EP_A, T0 - DEFAULT_MAX_AGE - 1)
    recent = KnownMember(B, EP_B, T0 - DEFAULT_MAX_AGE)
    save_state(path, SavedState((old, recent), T0))
    assert load_state(path).state.members == (recent,)
    assert load_state(path, max_age=10).state.members == ()


def test_seed_addresses_most_recent_first_without_self_or_duplicates() -> None:
    state = SavedState(
        (
            KnownMember(A, EP_A, T0 - 10),
            KnownMember(B, (*EP_B, EP_A[0]), T0),
            KnownMember(C, (Endpoint("203.0.113.3", 1),), T0 - 5),
        ),
        T0,
    )
    assert state.seed_addresses() == [
        ("198.51.100.2", 40000),
        ("192.0.2.1", 51821),
        ("203.0.113.3", 1),
        ("2001:db8::1", 51821),
    ]
    assert state.seed_addresses(exclude=B) == [
        ("203.0.113.3", 1),
        ("192.0.2.1", 51821),
        ("2001:db8::1", 51821),
    ]


def test_saver_writes_changes_at_most_once_per_interval(tmp_path: Path) -> None:
    path = state_path(tmp_path)
    saver = StateSaver(path, min_interval=10.0)
    assert saver.next_deadline() is None

    saver.update({A: EP_A}, now=100.0, wall_time=T0)
    assert load_state(path).state == SavedState((KnownMember(A, EP_A, T0),), T0)
    assert saver.next_deadline() is None

    saver.update({A: EP_A}, now=101.0, wall_time=T0 + 1)
    assert saver.next_deadline() is None, "same members and endpoints: nothing to write"

    saver.update({A: EP_A, B: EP_B}, now=102.0, wall_time=T0 + 2)
    assert saver.next_deadline() == 110.0
    assert len(load_state(path).state.members) == 1
    saver.on_timer(109.9)
    assert len(load_state(path).state.members) == 1
    saver.on_timer(110.0)
    assert load_state(path).state.members == (
        KnownMember(A, EP_A, T0 + 2),
        KnownMember(B, EP_B, T0 + 2),
    )
    assert saver.next_deadline() is None


def test_saver_keeps_members_that_went_away_until_max_age(tmp_path: Path) -> None:
    path = state_path(tmp_path)
    saver = StateSaver(path, min_interval=0.0, max_age=100.0)
    saver.update({A: EP_A, B: EP_B}, now=0.0, wall_time=T0)
    saver.update({B: EP_B}, now=1.0, wall_time=T0 + 50)
    assert saver.next_deadline() is None
    saver.update({B: (Endpoint("198.51.100.9", 1),)}, now=2.0, wall_time=T0 + 60)
    members = {m.public_key: m for m in load_state(path).state.members}
    assert members[A] == KnownMember(A, EP_A, T0)
    assert members[B].endpoints == (Endpoint("198.51.100.9", 1),)
    saver.update({B: (Endpoint("198.51.100.9", 1),)}, now=3.0, wall_time=T0 + 101)
    assert [m.public_key for m in load_state(path).state.members] == [B]


def test_saver_starts_from_the_loaded_state_and_flushes_on_exit(tmp_path: Path) -> None:
    path = state_path(tmp_path)
    save_state(path, SavedState((KnownMember(A, EP_A, T0),), T0))
    saver = StateSaver(path, initial=load_state(path).state, min_interval=60.0)
    saver.update({A: EP_A}, now=0.0, wall_time=T0 + 5)
    assert saver.next_deadline() is None, "the loaded file already says this"
    saver.update({C: EP_B}, now=1.0, wall_time=T0 + 6)
    saver.update({C: EP_B, B: EP_B}, now=2.0, wall_time=T0 + 7)
    assert saver.next_deadline() == 61.0
    saver.flush(2.5)
    assert [m.public_key for m in load_state(path).state.members] == [A, B, C]
    assert saver.next_deadline() is None
