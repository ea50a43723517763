"""WireGuard's primitives: BLAKE2s hash/MAC/HMAC, the HKDF-style KDFs, TAI64N, AEADs.

Everything here is a pure function of its arguments. ChaCha20-Poly1305 and X25519 come from
``cryptography``; XChaCha20-Poly1305 (only the cookie reply needs it) is HChaCha20, written
here, in front of ``cryptography``'s ChaCha20-Poly1305.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "ZERO_NONCE",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "hash_",
    "hchacha20",
    "hmac_",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "private_key_from_bytes",
    "public_key_of",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

ZERO_NONCE = bytes(12)
_TAI64_BASE = 0x400000000000000A
_WHITENER_MASK = 0xFFFFFF
"""wireguard-go rounds the nanoseconds down to ~16 ms so the timestamp leaks less."""


def hash_(*parts: bytes) -> bytes:
    """HASH: BLAKE2s-256 of the concatenation of ``parts``."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC: keyed BLAKE2s with a 16-byte output (mac1, mac2, the cookie)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256, the PRF under the KDFs."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac_(key, data)
    return hmac_(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    return t1, hmac_(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2, hmac_(t0, t2 + b"\x03")


def tai64n(unix_seconds: float) -> bytes:
    """The 12-byte TAI64N label of a wall-clock time, whitened like wireguard-go's."""
    seconds = int(unix_seconds // 1)
    nanos = int((unix_seconds - seconds) * 1e9) & ~_WHITENER_MASK & 0xFFFFFFFF
    return struct.pack(">QI", _TAI64_BASE + seconds, nanos)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    nonce = b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or ``None`` when the tag does not verify."""
    nonce = b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        return None


def private_key_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def public_key_of(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


def dh(private_key: X25519PrivateKey, public_key: bytes) -> bytes | None:
    """X25519; ``None`` for a low-order peer point (an all-zero shared secret)."""
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError:
        return None


_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
_M32 = 0xFFFFFFFF
_ZERO_BLOCK = bytes(64)
_WORDS = struct.Struct("<16I")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2): a 32-byte subkey from a key and 16 nonce bytes.

    HChaCha20 is the ChaCha20 block function without the final addition of the input state,
    keeping words 0-3 and 12-15. The first ChaCha20 keystream block for the same key, with
    ``nonce16`` in the counter-and-nonce words, is exactly those rounds plus the input, so
    subtracting the (known) input words recovers HChaCha20 at C speed; a pure-Python round
    function would cost hundreds of microseconds per cookie reply, a gift to a flooder.
    """
    encryptor = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor()
    block = _WORDS.unpack(encryptor.update(_ZERO_BLOCK))
    tail = struct.unpack("<4I", nonce16)
    return struct.pack(
        "<8I",
        *((block[i] - _SIGMA[i]) & _M32 for i in range(4)),
        *((block[12 + i] - tail[i]) & _M32 for i in range(4)),
    )


def _xchacha(key: bytes, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    return ChaCha20Poly1305(hchacha20(key, nonce24[:16])), b"\x00\x00\x00\x00" + nonce24[16:]


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305 seal (draft-irtf-cfrg-xchacha §2.3)."""
    aead, nonce = _xchacha(key, nonce24)
    return aead.encrypt(nonce, plaintext, aad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    """XChaCha20-Poly1305 open; ``None`` when the tag does not verify."""
    aead, nonce = _xchacha(key, nonce24)
    try:
        return aead.decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        return None
