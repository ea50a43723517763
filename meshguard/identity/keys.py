"""The Ed25519 identity key and the WireGuard (X25519) key derived from it (DESIGN.md §5).

A node keeps one secret, the 32-byte Ed25519 seed. Its X25519 key pair is derived the standard
way (as libsodium's ``crypto_sign_ed25519_sk_to_curve25519`` / ``_pk_to_curve25519``):

- X25519 private key: the first 32 bytes of SHA-512(seed), clamped (RFC 7748 §5);
- X25519 public key: the Montgomery form u = (1 + y) / (1 - y) mod p of the Ed25519 public key,
  which equals the X25519 public key of that private key.

So anyone who knows a node's Ed25519 public key knows its WireGuard public key too.

Pure functions of bytes: no files, no clock, no global randomness (entropy is passed in).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

_ExtendedPoint = tuple[int, int, int, int]


def _decode_point(public_key: bytes) -> _ExtendedPoint | None:
    """Decode an Ed25519 point (RFC 8032 §5.1.3) strictly; None if it is not a canonical point.

    Rejects y >= p and "negative zero" (x = 0 with the sign bit set): both are second encodings
    of a point that has a canonical one.
    """
    if len(public_key) != PUBLIC_KEY_SIZE:
        return None
    encoded = int.from_bytes(public_key, "little")
    sign = encoded >> 255
    y = encoded & ((1 << 255) - 1)
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        if (v * x * x + u) % _P != 0:
            return None
        x = x * _SQRT_M1 % _P
    if x == 0 and sign == 1:
        return None
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def _double(point: _ExtendedPoint) -> _ExtendedPoint:
    """P + P in extended twisted Edwards coordinates (the addition law of RFC 8032 §5.1.4)."""
    x, y, z, t = point
    a = (y - x) * (y - x) % _P
    b = (y + x) * (y + x) % _P
    c = 2 * t * t * _D % _P
    d = 2 * z * z % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _has_small_order(point: _ExtendedPoint) -> bool:
    """True if 8·P is the neutral element, i.e. P is one of the 8 torsion points."""
    for _ in range(3):
        point = _double(point)
    x, y, z, _t = point
    return x % _P == 0 and (y - z) % _P == 0


def is_valid_ed25519_public_key(public_key: bytes) -> bool:
    """Whether ``public_key`` is a usable Ed25519 public key.

    Accepted: exactly 32 bytes, the canonical encoding of a point on the curve. Rejected:
    y >= p, a sign bit set on x = 0 (non-canonical encodings), y with no matching x, and the
    8 small-order points (the neutral element and the other torsion points). A small-order key
    gives an all-zero or guessable X25519 shared secret and lets anyone forge signatures that a
    lenient verifier accepts, and no honest key generator ever produces one.

    Points of mixed order (a prime-order point plus a torsion component) are accepted: keys
    from any honest implementation never have one, the X25519 clamping (a multiple of 8) removes
    the torsion component from every shared secret, and excluding them would need a full scalar
    multiplication by the group order on every check.

    Never raises: anything but 32 bytes (bytes-like objects are accepted) is simply invalid.
    """
    if isinstance(public_key, bytearray | memoryview):
        public_key = bytes(public_key)
    if not isinstance(public_key, bytes):
        return False
    return _is_valid_encoding(public_key)


@functools.lru_cache(maxsize=4096)
def _is_valid_encoding(public_key: bytes) -> bool:
    """The check itself, memoized: it costs about 0.2 ms of big-integer arithmetic and the same
    few keys are checked again and again."""
    point = _decode_point(public_key)
    return point is not None and not _has_small_order(point)


def ed25519_public_to_x25519(public_key: bytes) -> bytes:
    """The X25519 public key (Montgomery u-coordinate) of an Ed25519 public key.

    Raises ValueError if ``public_key`` is not valid (see ``is_valid_ed25519_public_key``).
    """
    if not is_valid_ed25519_public_key(public_key):
        raise ValueError("not a valid Ed25519 public key")
    y = int.from_bytes(public_key, "little") & ((1 << 255) - 1)
    u = (1 + y) * pow(1 - y, -1, _P) % _P
    return u.to_bytes(32, "little")


def public_key_to_base64(public_key: bytes) -> str:
    """The text form of a public key: standard base64 of its 32 bytes (44 characters)."""
    return base64.b64encode(public_key).decode("ascii")


def public_key_from_base64(text: str) -> bytes:
    """Parse the text form of an Ed25519 public key, surrounding whitespace allowed.

    Raises ValueError saying what is wrong: not base64 (strict alphabet, canonical padding),
    not 32 bytes, or not a valid Ed25519 public key.
    """
    text = text.strip()
    try:
        public_key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if base64.b64encode(public_key).decode("ascii") != text:
        raise ValueError("not canonical base64") from None
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"decodes to {len(public_key)} bytes, an Ed25519 public key is 32")
    if not is_valid_ed25519_public_key(public_key):
        raise ValueError("not a valid Ed25519 public key (not a point of the curve, or weak)")
    return public_key


def x25519_private_from_seed(seed: bytes) -> bytes:
    """The clamped first half of SHA-512(seed): the X25519 private key of an Ed25519 seed."""
    scalar = bytearray(hashlib.sha512(seed).digest()[:32])
    scalar[0] &= 248
    scalar[31] &= 127
    scalar[31] |= 64
    return bytes(scalar)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``.

    Never raises: a key that is not valid, or inputs of the wrong type or size, give False.
    """
    if not (
        isinstance(public_key, bytes)
        and isinstance(signature, bytes)
        and isinstance(message, bytes)
        and len(signature) == SIGNATURE_SIZE
        and is_valid_ed25519_public_key(public_key)
    ):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Identity:
    """A node's key pair: the Ed25519 seed and everything derived from it.

    Build one with ``Identity.from_seed`` or ``Identity.generate``; the other fields are derived
    so they can never disagree with the seed. The seed and the X25519 private key never appear
    in ``repr``; equality compares seeds in constant time.
    """

    seed: bytes
    public_key: bytes = field(init=False)
    x25519_private: bytes = field(init=False)
    x25519_public: bytes = field(init=False)
    _signing_key: Ed25519PrivateKey = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes")
        signing_key = Ed25519PrivateKey.from_private_bytes(self.seed)
        x25519_private = x25519_private_from_seed(self.seed)
        x25519_public = (
            X25519PrivateKey.from_private_bytes(x25519_private).public_key().public_bytes_raw()
        )
        object.__setattr__(self, "_signing_key", signing_key)
        object.__setattr__(self, "public_key", signing_key.public_key().public_bytes_raw())
        object.__setattr__(self, "x25519_private", x25519_private)
        object.__setattr__(self, "x25519_public", x25519_public)

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity whose Ed25519 private seed is ``seed`` (32 bytes; ValueError otherwise)."""
        return cls(seed)

    @classmethod
    def generate(cls, entropy: Callable[[int], bytes]) -> Identity:
        """A new identity from 32 bytes of ``entropy`` (``os.urandom`` in production)."""
        return cls(entropy(SEED_SIZE))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._signing_key.sign(message)

    def __reduce__(self) -> tuple[type[Identity], tuple[bytes]]:
        """Pickle and copy by seed (the cached signing key object cannot be pickled)."""
        return (Identity, (self.seed,))

    def __repr__(self) -> str:
        return f"Identity(public_key={base64.b64encode(self.public_key).decode()})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return hmac.compare_digest(self.seed, other.seed)

    def __hash__(self) -> int:
        return hash(self.public_key)
