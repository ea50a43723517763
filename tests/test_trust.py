"""The trust store: authorized_keys/ with one <name>.pub per trusted peer."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshguard.identity.keyfile import format_identity
from meshguard.identity.keys import Identity, public_key_to_base64
from meshguard.identity.trust import (
    TrustedKey,
    TrustStore,
    TrustStoreError,
    is_valid_name,
    public_key_from_argument,
)

ALICE = Identity.from_seed(b"a" * 32).public_key
BOB = Identity.from_seed(b"b" * 32).public_key
CAROL = Identity.from_seed(b"c" * 32).public_key
NEUTRAL_POINT = bytes([1]) + bytes(31)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``directory`` with its mode and content."""
    return {
        str(path.relative_to(directory)): (
            path.stat().st_mode,
            path.read_bytes() if path.is_file() else b"",
        )
        for path in sorted(directory.rglob("*"))
    }


@pytest.fixture
def store(tmp_path: Path) -> TrustStore:
    return TrustStore(tmp_path / "authorized_keys")


def test_missing_directory_is_an_empty_store(store: TrustStore) -> None:
    loaded = store.load()
    assert loaded.keys == ()
    assert loaded.problems == ()


def test_add_writes_one_pub_file_per_peer(store: TrustStore) -> None:
    assert store.add("alice", ALICE) == TrustedKey("alice", ALICE)
    store.add("bob", BOB)
    path = store.directory / "alice.pub"
    assert path.read_text() == b64(ALICE) + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(os.listdir(store.directory)) == ["alice.pub", "bob.pub"]
    assert store.list() == (TrustedKey("alice", ALICE), TrustedKey("bob", BOB))
    assert store.load().by_public_key() == {
        ALICE: TrustedKey("alice", ALICE),
        BOB: TrustedKey("bob", BOB),
    }


def test_hand_written_files_load_too(store: TrustStore) -> None:
    store.directory.mkdir()
    (store.directory / "carol.pub").write_text(f"  {b64(CAROL)}\r\n\n")
    assert store.list() == (TrustedKey("carol", CAROL),)


def test_duplicate_name_is_refused_and_nothing_changes(store: TrustStore) -> None:
    store.add("alice", ALICE)
    before = snapshot(store.directory)
    with pytest.raises(TrustStoreError, match="named 'alice' is already trusted"):
        store.add("alice", BOB)
    assert snapshot(store.directory) == before


def test_duplicate_key_is_refused_and_nothing_changes(store: TrustStore) -> None:
    store.add("alice", ALICE)
    before = snapshot(store.directory)
    with pytest.raises(TrustStoreError, match="already trusted as 'alice'"):
        store.add("alice2", ALICE)
    assert snapshot(store.directory) == before


def test_a_corrupt_file_still_holds_its_name(store: TrustStore) -> None:
    store.directory.mkdir()
    (store.directory / "alice.pub").write_text("garbage\n")
    with pytest.raises(TrustStoreError, match="already trusted"):
        store.add("alice", ALICE)
    assert (store.directory / "alice.pub").read_text() == "garbage\n"


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "..", "a/b", "../x", "a b", "x" * 65, "caf\u00e9", "a\n", "a:b", "tab\t"],
)
def test_unsafe_names_are_refused(store: TrustStore, name: str) -> None:
    with pytest.raises(TrustStoreError, match="invalid name"):
        store.add(name, ALICE)
    assert not store.directory.exists()


@pytest.mark.parametrize("name", ["a", "x" * 64, "bob-1.laptop_2", "0", "-dash", "UPPER.lower"])
def test_safe_names_are_accepted(store: TrustStore, name: str) -> None:
    store.add(name, ALICE)
    assert store.list() == (TrustedKey(name, ALICE),)


@given(st.text(max_size=70))
def test_name_rule(name: str) -> None:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
    expected = 1 <= len(name) <= 64 and set(name) <= allowed and not name.startswith(".")
    assert is_valid_name(name) == expected


def test_invalid_keys_are_refused(store: TrustStore) -> None:
    for key in (NEUTRAL_POINT, bytes(31), ALICE + b"\x00"):
        with pytest.raises(TrustStoreError, match="not a valid Ed25519 public key"):
            store.add("x", key)
    assert not store.directory.exists()


def test_one_corrupt_file_is_reported_and_the_good_ones_load(store: TrustStore) -> None:
    store.add("alice", ALICE)
    store.add("carol", CAROL)
    (store.directory / "broken.pub").write_text("this is not a key\n")
    loaded = store.load()
    assert loaded.keys == (TrustedKey("alice", ALICE), TrustedKey("carol", CAROL))
    assert len(loaded.problems) == 1
    problem = loaded.problems[0]
    assert problem.path == store.directory / "broken.pub"
    assert str(problem) == "broken.pub: not valid base64"


def test_every_kind_of_bad_file_is_reported_with_its_reason(store: TrustStore) -> None:
    store.add("good", ALICE)
    directory = store.directory
    (directory / "short.pub").write_text(b64(bytes(31)) + "\n")
    (directory / "weak.pub").write_text(b64(NEUTRAL_POINT) + "\n")
    (directory / "empty.pub").write_text("")
    (directory / "binary.pub").write_bytes(b"\xff\xfe\x00")
    (directory / "huge.pub").write_text("A" * 5000)
    (directory / "two keys.pub").write_text(b64(BOB) + "\n")
    (directory / "subdir.pub").mkdir()
    os.mkfifo(directory / "fifo.pub")
    (directory / "same-as-good.pub").write_text(b64(ALICE) + "\n")
    reasons = {problem.path.name: problem.reason for problem in store.load().problems}
    assert reasons == {
        "binary.pub": "not ASCII text",
        "empty.pub": "empty",
        "fifo.pub": "not a regular file",
        "huge.pub": "too large for a public key file",
        "same-as-good.pub": "same key as good.pub, ignored",
        "short.pub": "decodes to 31 bytes, an Ed25519 public key is 32",
        "subdir.pub": "not a regular file",
        "two keys.pub": "invalid peer name, ignored",
        "weak.pub": "not a valid Ed25519 public key (not a point of the curve, or weak)",
    }
    assert store.list() == (TrustedKey("good", ALICE),)


def test_duplicate_key_under_two_names_keeps_the_first_and_reports_the_second(
    store: TrustStore,
) -> None:
    store.directory.mkdir()
    (store.directory / "zed.pub").write_text(b64(BOB) + "\n")
    (store.directory / "bob.pub").write_text(b64(BOB) + "\n")
    loaded = store.load()
    assert loaded.keys == (TrustedKey("bob", BOB),)
    problems = [str(problem) for problem in loaded.problems]
    assert problems == ["zed.pub: same key as bob.pub, ignored"]


def test_other_files_and_leftover_temporary_files_are_ignored(store: TrustStore) -> None:
    store.add("alice", ALICE)
    (store.directory / "README").write_text("notes\n")
    (store.directory / ".bob.pub.0123456789abcdef.tmp").write_text("half")
    (store.directory / ".hidden.pub").write_text("whatever")
    loaded = store.load()
    assert loaded.keys == (TrustedKey("alice", ALICE),)
    assert loaded.problems == ()


def test_remove_by_name(store: TrustStore) -> None:
    store.add("alice", ALICE)
    store.add("bob", BOB)
    assert store.remove("alice") == ("alice",)
    assert store.list() == (TrustedKey("bob", BOB),)


def test_remove_by_key_removes_every_file_holding_it(store: TrustStore) -> None:
    store.add("bob", BOB)
    (store.directory / "bob-again.pub").write_text(b64(BOB) + "\n")
    store.add("carol", CAROL)
    assert store.remove(b64(BOB)) == ("bob", "bob-again")
    assert store.list() == (TrustedKey("carol", CAROL),)
    assert store.load().problems == ()


def test_a_corrupt_file_can_be_removed_by_name(store: TrustStore) -> None:
    store.directory.mkdir()
    (store.directory / "broken.pub").write_text("junk")
    assert store.remove("broken") == ("broken",)
    assert os.listdir(store.directory) == []


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("nobody", "no trusted key named 'nobody'"),
        (b64(CAROL), "is not trusted"),
        ("not/a name", "neither a peer name nor a public key"),
    ],
)
def test_remove_of_unknown_peer_is_refused(store: TrustStore, argument: str, message: str) -> None:
    store.add("alice", ALICE)
    before = snapshot(store.directory)
    with pytest.raises(TrustStoreError, match=message):
        store.remove(argument)
    assert snapshot(store.directory) == before


def test_unreadable_directory_is_an_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "authorized_keys"
    not_a_directory.write_text("")
    with pytest.raises(TrustStoreError, match="cannot read"):
        TrustStore(not_a_directory).load()


def test_unwritable_directory_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TrustStoreError, match="authorized_keys: Not a directory"):
        TrustStore(blocker / "authorized_keys").add("alice", ALICE)


def test_no_temporary_files_are_left_behind(store: TrustStore) -> None:
    for name, key in (("alice", ALICE), ("bob", BOB), ("carol", CAROL)):
        store.add(name, key)
    store.remove("bob")
    assert sorted(os.listdir(store.directory)) == ["alice.pub", "carol.pub"]


# --- keys given on the command line ----------------------------------------------------------


def test_key_argument_as_base64() -> None:
    assert public_key_from_argument(b64(ALICE)) == ALICE


def test_key_argument_as_pub_file(tmp_path: Path) -> None:
    path = tmp_path / "friend.pub"
    path.write_text(public_key_to_base64(BOB) + "\n")
    assert public_key_from_argument(str(path)) == BOB


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("junk!\n", "not valid base64"),
        (format_identity(Identity.from_seed(b"s" * 32)).decode(), "this is a private key file"),
        (b64(NEUTRAL_POINT), "not a valid Ed25519 public key"),
    ],
)
def test_key_argument_file_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "friend.pub"
    path.write_text(content)
    with pytest.raises(TrustStoreError, match=message) as raised:
        public_key_from_argument(str(path))
    assert str(path) in str(raised.value)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("/nonexistent/friend.pub", "no such file: /nonexistent/friend.pub"),
        ("friend.pub", "no such file: friend.pub"),
        ("hello", "'hello' is not a public key: not valid base64"),
        (b64(bytes(16)), "decodes to 16 bytes"),
        (b64(NEUTRAL_POINT), "not a valid Ed25519 public key"),
    ],
)
def test_key_argument_errors(argument: str, message: str) -> None:
    with pytest.raises(TrustStoreError, match=message):
        public_key_from_argument(argument)
