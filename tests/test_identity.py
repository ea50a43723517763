"""The Ed25519 identity, the derived X25519 key, public-key validation and the key file."""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import os
import pickle
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.identity import atomicfile
from meshguard.identity.keyfile import (
    HEADER,
    KeyFileError,
    format_identity,
    load_identity,
    parse_identity,
    save_identity,
)
from meshguard.identity.keys import (
    Identity,
    ed25519_public_to_x25519,
    is_valid_ed25519_public_key,
    public_key_from_base64,
    public_key_to_base64,
    verify_signature,
)

P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P

seeds = st.binary(min_size=32, max_size=32)

# RFC 8032 §7.1, TEST 1.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_EMPTY_MESSAGE_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555"
    "fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)
# libsodium test/default/ed25519_convert.c and .exp.
SODIUM_SEED = bytes.fromhex("421151a459faeade3d247115f94aedae42318124095afabe4d1451a559faedee")
SODIUM_PUBLIC = bytes.fromhex("b5076a8474a832daee4dd5b4040983b6623b5f344aca57d4d6ee4baf3f259e6e")
SODIUM_X25519_PRIVATE = bytes.fromhex(
    "8052030376d47112be7f73ed7a019293dd12ad910b654455798b4667d73de166"
)
SODIUM_X25519_PUBLIC = bytes.fromhex(
    "f1814f0e8ff1043d8a44d25babff3cedcae6c22c3edaa48f857ae70de2baae50"
)

# The 8 points of small order, canonically encoded: the neutral element (order 1), order 2,
# the two of order 4 (x = ±sqrt(-1), y = 0) and the four of order 8.
SMALL_ORDER_POINTS = [
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    )
]


def encode(y: int, sign: int) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


def expected_validity(public_key: bytes) -> bool:
    """An independent statement of what a valid key is: y < p, x² = (y²-1)/(dy²+1) is a
    square (Euler's criterion), no sign bit on x = 0 (x = 0 exactly when y = ±1), and not one
    of the 8 small-order points."""
    encoded = int.from_bytes(public_key, "little")
    y, sign = encoded & ((1 << 255) - 1), encoded >> 255
    if y >= P:
        return False
    x_squared = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if x_squared != 0 and pow(x_squared, (P - 1) // 2, P) != 1:
        return False
    if x_squared == 0 and sign == 1:
        return False
    return public_key not in SMALL_ORDER_POINTS


# --- known answers ---------------------------------------------------------------------------


def test_rfc8032_test_1() -> None:
    identity = Identity.from_seed(RFC8032_SEED)
    assert identity.public_key == RFC8032_PUBLIC
    assert identity.sign(b"") == RFC8032_EMPTY_MESSAGE_SIGNATURE
    assert verify_signature(RFC8032_PUBLIC, RFC8032_EMPTY_MESSAGE_SIGNATURE, b"")


def test_libsodium_x25519_conversion_vector() -> None:
    identity = Identity.from_seed(SODIUM_SEED)
    assert identity.public_key == SODIUM_PUBLIC
    assert identity.x25519_private == SODIUM_X25519_PRIVATE
    assert identity.x25519_public == SODIUM_X25519_PUBLIC
    assert ed25519_public_to_x25519(SODIUM_PUBLIC) == SODIUM_X25519_PUBLIC


# --- X25519 derivation -----------------------------------------------------------------------


@settings(max_examples=300)
@given(seeds)
def test_derived_x25519_public_key_matches_both_derivations(seed: bytes) -> None:
    identity = Identity.from_seed(seed)
    from_private = (
        X25519PrivateKey.from_private_bytes(identity.x25519_private).public_key().public_bytes_raw()
    )
    assert identity.x25519_public == from_private
    assert identity.x25519_public == ed25519_public_to_x25519(identity.public_key)


@given(seeds)
def test_x25519_private_key_is_clamped_sha512_half(seed: bytes) -> None:
    import hashlib

    expected = bytearray(hashlib.sha512(seed).digest()[:32])
    expected[0] &= 0b1111_1000
    expected[31] = (expected[31] & 0b0111_1111) | 0b0100_0000
    assert Identity.from_seed(seed).x25519_private == bytes(expected)


@settings(max_examples=50)
@given(seeds, seeds)
def test_derived_keys_agree_on_a_shared_secret(seed_a: bytes, seed_b: bytes) -> None:
    a, b = Identity.from_seed(seed_a), Identity.from_seed(seed_b)
    secret_ab = X25519PrivateKey.from_private_bytes(a.x25519_private).exchange(
        X25519PublicKey.from_public_bytes(ed25519_public_to_x25519(b.public_key))
    )
    secret_ba = X25519PrivateKey.from_private_bytes(b.x25519_private).exchange(
        X25519PublicKey.from_public_bytes(ed25519_public_to_x25519(a.public_key))
    )
    assert secret_ab == secret_ba
    assert secret_ab != bytes(32)


def test_wireguard_tools_derive_the_same_public_key() -> None:
    wg = shutil.which("wg")
    if wg is None:
        pytest.skip("wireguard-tools (wg) is not installed")
    for seed in (SODIUM_SEED, RFC8032_SEED, bytes(range(32))):
        identity = Identity.from_seed(seed)
        result = subprocess.run(
            [wg, "pubkey"],
            input=base64.b64encode(identity.x25519_private).decode() + "\n",
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        assert result.stdout.strip() == base64.b64encode(identity.x25519_public).decode()


def test_conversion_of_invalid_key_raises_value_error() -> None:
    for bad in [*SMALL_ORDER_POINTS, b"", bytes(31), encode(P, 0)]:
        with pytest.raises(ValueError):
            ed25519_public_to_x25519(bad)


# --- public key validation -------------------------------------------------------------------


@given(seeds)
def test_every_generated_public_key_is_valid(seed: bytes) -> None:
    assert is_valid_ed25519_public_key(Identity.from_seed(seed).public_key)


@settings(max_examples=500)
@given(st.binary(min_size=32, max_size=32))
def test_validity_of_arbitrary_bytes_matches_independent_definition(candidate: bytes) -> None:
    assert is_valid_ed25519_public_key(candidate) == expected_validity(candidate)


@given(st.integers(min_value=P - 20, max_value=2**255 - 1), st.integers(0, 1))
def test_validity_near_p_matches_independent_definition(y: int, sign: int) -> None:
    candidate = encode(y, sign)
    assert is_valid_ed25519_public_key(candidate) == expected_validity(candidate)


def test_non_canonical_encodings_are_rejected() -> None:
    for y in range(P, 2**255):
        for sign in (0, 1):
            assert not is_valid_ed25519_public_key(encode(y, sign))
    assert not is_valid_ed25519_public_key(encode(1, 1))
    assert not is_valid_ed25519_public_key(encode(P - 1, 1))


def test_strict_decoding_rejects_negative_zero_on_its_own() -> None:
    # Only y = ±1 give x = 0, and both are small-order points, so the public check would reject
    # them anyway; the decoder itself must still refuse the second encoding.
    from meshguard.identity.keys import _decode_point

    assert _decode_point(encode(1, 0)) is not None
    assert _decode_point(encode(1, 1)) is None
    assert _decode_point(encode(P - 1, 1)) is None


def test_small_order_points_are_on_the_curve_but_rejected() -> None:
    for point in SMALL_ORDER_POINTS:
        encoded = int.from_bytes(point, "little") & ((1 << 255) - 1)
        x_squared = (encoded * encoded - 1) * pow(D * encoded * encoded + 1, -1, P) % P
        assert x_squared == 0 or pow(x_squared, (P - 1) // 2, P) == 1
        assert not is_valid_ed25519_public_key(point)


def test_y_without_an_x_is_rejected() -> None:
    y = next(
        y
        for y in range(2, 100)
        if pow((y * y - 1) * pow(D * y * y + 1, -1, P) % P, (P - 1) // 2, P) == P - 1
    )
    assert not is_valid_ed25519_public_key(encode(y, 0))


def test_wrong_lengths_and_types_are_invalid() -> None:
    for length in (0, 31, 33, 64):
        assert not is_valid_ed25519_public_key(RFC8032_PUBLIC[:length].ljust(length, b"\x01"))
    assert not is_valid_ed25519_public_key(RFC8032_PUBLIC.hex())  # type: ignore[arg-type]
    assert not is_valid_ed25519_public_key(None)  # type: ignore[arg-type]


def test_bytes_like_keys_are_checked_like_bytes() -> None:
    assert is_valid_ed25519_public_key(bytearray(RFC8032_PUBLIC))  # type: ignore[arg-type]
    assert is_valid_ed25519_public_key(memoryview(RFC8032_PUBLIC))  # type: ignore[arg-type]
    assert not is_valid_ed25519_public_key(bytearray(SMALL_ORDER_POINTS[0]))  # type: ignore[arg-type]


# --- base64 text form ------------------------------------------------------------------------


def test_public_key_text_round_trip_tolerates_surrounding_whitespace() -> None:
    text = public_key_to_base64(RFC8032_PUBLIC)
    assert len(text) == 44
    assert public_key_from_base64(f"  {text}\n") == RFC8032_PUBLIC


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not base64!", "not valid base64"),
        (base64.b64encode(bytes(31)).decode(), "31 bytes"),
        (base64.b64encode(SMALL_ORDER_POINTS[0]).decode(), "not a valid Ed25519 public key"),
        (base64.urlsafe_b64encode(b"\xff" * 32).decode(), "not valid base64"),
        (base64.b64encode(RFC8032_PUBLIC).decode()[:-2] + "B=", "not canonical base64"),
    ],
)
def test_public_key_text_errors_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        public_key_from_base64(text)


# --- signatures ------------------------------------------------------------------------------


@settings(max_examples=50)
@given(seeds, st.binary(max_size=200))
def test_signatures_verify_and_tampering_is_detected(seed: bytes, message: bytes) -> None:
    identity = Identity.from_seed(seed)
    signature = identity.sign(message)
    assert len(signature) == 64
    assert verify_signature(identity.public_key, signature, message)
    assert not verify_signature(identity.public_key, signature, message + b"x")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify_signature(identity.public_key, flipped, message)
    other = Identity.from_seed(bytes(b ^ 0xFF for b in seed))
    assert not verify_signature(other.public_key, signature, message)


@given(st.binary(max_size=40), st.binary(max_size=80), st.binary(max_size=40))
def test_verify_signature_never_raises(public_key: bytes, signature: bytes, message: bytes) -> None:
    assert verify_signature(public_key, signature, message) in (True, False)


def test_verify_signature_rejects_wrong_types_and_small_order_keys() -> None:
    signature = Identity.from_seed(RFC8032_SEED).sign(b"m")
    assert not verify_signature("key", signature, b"m")  # type: ignore[arg-type]
    assert not verify_signature(RFC8032_PUBLIC, None, b"m")  # type: ignore[arg-type]
    # With the neutral element as public key, R = neutral and S = 0 satisfy the lenient
    # verification equation for every message.
    forged = SMALL_ORDER_POINTS[0] + bytes(32)
    assert not verify_signature(SMALL_ORDER_POINTS[0], forged, b"anything")


# --- the Identity value ----------------------------------------------------------------------


def test_identity_never_shows_secrets() -> None:
    identity = Identity.from_seed(SODIUM_SEED)
    shown = repr(identity) + str(identity)
    for secret in (identity.seed, identity.x25519_private):
        assert secret.hex() not in shown
        assert base64.b64encode(secret).decode() not in shown
        assert repr(secret) not in shown
    assert public_key_to_base64(identity.public_key) in shown


def test_identity_is_immutable_and_compares_by_seed() -> None:
    identity = Identity.from_seed(SODIUM_SEED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        identity.seed = bytes(32)  # type: ignore[misc]
    assert identity == Identity.from_seed(SODIUM_SEED)
    assert hash(identity) == hash(Identity.from_seed(SODIUM_SEED))
    assert identity != Identity.from_seed(RFC8032_SEED)


def test_identity_survives_pickle_and_deepcopy() -> None:
    identity = Identity.from_seed(SODIUM_SEED)
    for copied in (pickle.loads(pickle.dumps(identity)), copy.deepcopy(identity)):
        assert copied == identity
        assert copied.public_key == identity.public_key
        assert verify_signature(identity.public_key, copied.sign(b"m"), b"m")


def test_generate_takes_32_bytes_of_entropy() -> None:
    requests: list[int] = []

    def entropy(size: int) -> bytes:
        requests.append(size)
        return SODIUM_SEED

    assert Identity.generate(entropy) == Identity.from_seed(SODIUM_SEED)
    assert requests == [32]
    assert Identity.generate(os.urandom) != Identity.generate(os.urandom)


@pytest.mark.parametrize("seed", [b"", bytes(31), bytes(33)])
def test_seed_must_be_32_bytes(seed: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.from_seed(seed)
    with pytest.raises(ValueError, match="32 bytes"):
        Identity.generate(lambda size: seed)


# --- the key file ----------------------------------------------------------------------------


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_key_file_round_trip_format_and_mode(tmp_path: Path) -> None:
    identity = Identity.from_seed(SODIUM_SEED)
    path = tmp_path / "private.key"
    old_umask = os.umask(0)
    try:
        save_identity(path, identity)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == f"{HEADER}\n{base64.b64encode(SODIUM_SEED).decode()}\n".encode()
    assert load_identity(path) == identity
    assert files_in(tmp_path) == ["private.key"]


def test_existing_key_is_never_overwritten_without_force(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    save_identity(path, Identity.from_seed(SODIUM_SEED))
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="--force"):
        save_identity(path, Identity.from_seed(RFC8032_SEED))
    assert path.read_bytes() == before
    save_identity(path, Identity.from_seed(RFC8032_SEED), force=True)
    assert load_identity(path) == Identity.from_seed(RFC8032_SEED)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert files_in(tmp_path) == ["private.key"]


def test_no_clobber_holds_even_if_the_file_appears_after_the_check(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    path.write_bytes(b"appeared meanwhile")
    with pytest.raises(FileExistsError):
        atomicfile.write_atomically(path, b"new", mode=0o600, overwrite=False)
    assert path.read_bytes() == b"appeared meanwhile"
    assert files_in(tmp_path) == ["private.key"]


def test_failed_replace_leaves_old_key_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "private.key"
    save_identity(path, Identity.from_seed(SODIUM_SEED))
    before = path.read_bytes()

    def crash(source: object, destination: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyFileError, match="No space left on device"):
        save_identity(path, Identity.from_seed(RFC8032_SEED), force=True)
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["private.key"]


def test_save_into_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot write the key file"):
        save_identity(tmp_path / "absent" / "private.key", Identity.from_seed(SODIUM_SEED))
    assert files_in(tmp_path) == []


def test_loading_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    save_identity(path, Identity.from_seed(SODIUM_SEED))
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod 600"):
            load_identity(path)
    path.chmod(0o400)
    assert load_identity(path) == Identity.from_seed(SODIUM_SEED)


def test_loading_a_missing_key_suggests_keygen(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"no key file at .*meshguard keygen"):
        load_identity(tmp_path / "private.key")


def test_loading_a_directory_or_fifo_fails_cleanly(tmp_path: Path) -> None:
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_identity(directory)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_identity(fifo)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "first line must be"),
        (base64.b64encode(SODIUM_SEED) + b"\n", "first line must be"),
        (f"{HEADER}\n".encode(), "exactly two lines"),
        (f"{HEADER}\nAAAA\nAAAA\n".encode(), "exactly two lines"),
        (f"{HEADER}\n!!!!\n".encode(), "not valid base64"),
        (f"{HEADER}\n{base64.b64encode(bytes(16)).decode()}\n".encode(), "16 bytes"),
        (b"\xff\xfe\n", "not ASCII"),
        (b"A" * 2000, "too large"),
    ],
)
def test_malformed_key_files_are_refused_with_the_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "private.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match=reason):
        load_identity(path)


@given(seeds)
def test_key_file_format_round_trips(seed: bytes) -> None:
    identity = Identity.from_seed(seed)
    assert parse_identity(format_identity(identity)) == identity


@given(st.binary(max_size=200))
def test_parsing_arbitrary_bytes_gives_identity_or_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_identity(data)
