"""WireGuard primitives against published vectors and the protocol's fixed strings."""

from __future__ import annotations

import hashlib
import hmac
import struct

from hypothesis import given
from hypothesis import strategies as st

from meshguard.sansio.wireguard.crypto import (
    hchacha20,
    kdf1,
    kdf2,
    kdf3,
    mac,
    tai64n,
    xaead_decrypt,
    xaead_encrypt,
)
from meshguard.sansio.wireguard.noise import INITIAL_CHAIN_KEY, INITIAL_HASH

XCHACHA_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)


def test_hchacha20_matches_the_xchacha_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 §2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert hchacha20(key, nonce).hex() == (
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    )


def test_xchacha20_poly1305_matches_the_draft_aead_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 §A.3.1
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    sealed = xaead_encrypt(key, nonce, XCHACHA_PLAINTEXT, aad)
    assert sealed[:16].hex() == "bd6d179d3e83d43b9576579493c0e939"
    assert sealed[-16:].hex() == "c0875924c1c7987947deafd8780acf49"
    assert xaead_decrypt(key, nonce, sealed, aad) == XCHACHA_PLAINTEXT
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert xaead_decrypt(key, nonce, tampered, aad) is None
    assert xaead_decrypt(key, nonce, sealed, b"other aad") is None


def test_initial_chain_key_and_hash_come_from_the_protocol_strings() -> None:
    construction = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    identifier = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    assert hashlib.blake2s(construction).digest() == INITIAL_CHAIN_KEY
    assert hashlib.blake2s(INITIAL_CHAIN_KEY + identifier).digest() == INITIAL_HASH


def test_kdfs_are_hmac_blake2s_chains_sharing_their_prefix() -> None:
    key, data = b"k" * 32, b"input"
    t0 = hmac.new(key, data, hashlib.blake2s).digest()
    t1 = hmac.new(t0, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(t0, t1 + b"\x02", hashlib.blake2s).digest()
    t3 = hmac.new(t0, t2 + b"\x03", hashlib.blake2s).digest()
    assert kdf1(key, data) == t1
    assert kdf2(key, data) == (t1, t2)
    assert kdf3(key, data) == (t1, t2, t3)


def test_mac_is_keyed_blake2s_with_16_bytes() -> None:
    assert mac(b"k" * 32, b"m") == hashlib.blake2s(b"m", key=b"k" * 32, digest_size=16).digest()
    assert len(mac(b"k" * 16, b"")) == 16


def test_tai64n_is_big_endian_seconds_plus_2_62_and_whitened_nanoseconds() -> None:
    stamp = tai64n(1_700_000_000.5)
    assert len(stamp) == 12
    assert int.from_bytes(stamp[:8], "big") == 0x400000000000000A + 1_700_000_000
    nanos = int.from_bytes(stamp[8:], "big")
    assert nanos & 0xFFFFFF == 0
    assert 500_000_000 - 0x1000000 < nanos <= 500_000_000
    assert tai64n(1_700_000_001.0) > tai64n(1_700_000_000.9) > tai64n(1_700_000_000.0)


def reference_hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 by its definition: 20 ChaCha rounds, no feed-forward, words 0-3 and 12-15."""
    mask = 0xFFFFFFFF
    s = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    s += list(struct.unpack("<8I", key)) + list(struct.unpack("<4I", nonce16))

    def rotl(x: int, n: int) -> int:
        return ((x << n) | (x >> (32 - n))) & mask

    def quarter(a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & mask
        s[d] = rotl(s[d] ^ s[a], 16)
        s[c] = (s[c] + s[d]) & mask
        s[b] = rotl(s[b] ^ s[c], 12)
        s[a] = (s[a] + s[b]) & mask
        s[d] = rotl(s[d] ^ s[a], 8)
        s[c] = (s[c] + s[d]) & mask
        s[b] = rotl(s[b] ^ s[c], 7)

    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)):
            quarter(a, b, c, d)
        for a, b, c, d in ((0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):
            quarter(a, b, c, d)
    return struct.pack("<8I", *s[0:4], *s[12:16])


def test_reference_rounds_reproduce_the_draft_vector() -> None:
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert reference_hchacha20(bytes(range(32)), nonce) == hchacha20(bytes(range(32)), nonce)
    assert reference_hchacha20(bytes(range(32)), nonce).hex().startswith("82413b42")


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16))
def test_fast_hchacha20_equals_the_round_function_for_any_input(key: bytes, nonce: bytes) -> None:
    assert hchacha20(key, nonce) == reference_hchacha20(key, nonce)
