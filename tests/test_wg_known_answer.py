"""The device's handshake bytes against an independent, line-by-line reading of the whitepaper.

The reference below uses only hashlib, hmac and the raw X25519/ChaCha20-Poly1305 primitives
(nothing from meshguard), following §5.4.2-5.4.6 of the WireGuard whitepaper and keeping its
function names (HASH, MAC, KDF, AEAD, DH, ...). The device runs on recorded entropy, so the
reference can replay the same ephemeral keys and indices and must produce the very same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import struct

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from wg_helpers import A_ADDR, B_ADDR

from meshguard.sansio.wireguard import WireGuardDevice


def HASH(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def MAC(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=16).digest()


def HMAC(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def KDF(n: int, key: bytes, data: bytes) -> list[bytes]:
    t0 = HMAC(key, data)
    out = [HMAC(t0, b"\x01")]
    for i in range(2, n + 1):
        out.append(HMAC(t0, out[-1] + bytes([i])))
    return out


def AEAD(key: bytes, counter: int, plain: bytes, auth: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(bytes(4) + struct.pack("<Q", counter), plain, auth)


def DH(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def DH_PUBKEY(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def TAI64N(seconds: float) -> bytes:
    whole = int(seconds)
    nanos = int((seconds - whole) * 1e9) & ~0xFFFFFF
    return struct.pack(">QI", 2**62 + 10 + whole, nanos)


class RecordingEntropy:
    def __init__(self, seed: int) -> None:
        self.stream = random.Random(seed)
        self.drawn: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        self.drawn.append(self.stream.randbytes(n))
        return self.drawn[-1]


def test_initiation_response_and_first_transport_match_the_whitepaper() -> None:
    psk = bytes(range(100, 132))
    wall = 1_700_000_123.25
    si, sr = b"\x11" * 32, b"\x22" * 32
    si_pub, sr_pub = DH_PUBKEY(si), DH_PUBKEY(sr)
    entropy_i, entropy_r = RecordingEntropy(1), RecordingEntropy(2)
    initiator = WireGuardDevice(si, entropy=entropy_i, rng=random.Random(1),
                                wallclock=lambda: wall)
    responder = WireGuardDevice(sr, entropy=entropy_r, rng=random.Random(2),
                                wallclock=lambda: wall)
    initiator.add_peer(sr_pub, endpoint=B_ADDR, preshared_key=psk, now=0.0)
    responder.add_peer(
        si_pub,
        allowed_ips=[ipaddress.ip_network("10.0.0.1/32")],
        endpoint=A_ADDR,
        preshared_key=psk,
        now=0.0,
    )

    initiator.initiate_handshake(sr_pub, 0.0)
    (initiation, _), = initiator.datagrams_to_send()
    sender_index_raw, ei = entropy_i.drawn

    # §5.4.2 First message: initiator to responder
    ci = HASH(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    hi = HASH(ci + b"WireGuard v1 zx2c4 Jason@zx2c4.com")
    hi = HASH(hi + sr_pub)
    ei_pub = DH_PUBKEY(ei)
    (ci,) = KDF(1, ci, ei_pub)
    hi = HASH(hi + ei_pub)
    ci, k = KDF(2, ci, DH(ei, sr_pub))
    msg_static = AEAD(k, 0, si_pub, hi)
    hi = HASH(hi + msg_static)
    ci, k = KDF(2, ci, DH(si, sr_pub))
    msg_timestamp = AEAD(k, 0, TAI64N(wall), hi)
    hi = HASH(hi + msg_timestamp)
    body = b"\x01\x00\x00\x00" + sender_index_raw + ei_pub + msg_static + msg_timestamp
    mac1 = MAC(HASH(b"mac1----" + sr_pub), body)
    assert initiation == body + mac1 + bytes(16)

    responder.receive_datagram(initiation, A_ADDR, 0.0)
    (response, _), = responder.datagrams_to_send()
    responder_index_raw, er = entropy_r.drawn

    # §5.4.3 Second message: responder to initiator
    er_pub = DH_PUBKEY(er)
    cr = KDF(1, ci, er_pub)[0]
    hr = HASH(hi + er_pub)
    (cr,) = KDF(1, cr, DH(er, ei_pub))
    (cr,) = KDF(1, cr, DH(er, si_pub))
    cr, tau, k = KDF(3, cr, psk)
    hr = HASH(hr + tau)
    msg_empty = AEAD(k, 0, b"", hr)
    body = b"\x02\x00\x00\x00" + responder_index_raw + sender_index_raw + er_pub + msg_empty
    mac1 = MAC(HASH(b"mac1----" + si_pub), body)
    assert response == body + mac1 + bytes(16)

    # §5.4.5 Transport data key derivation, §5.4.6 the confirming keepalive (counter 0)
    initiator.receive_datagram(response, B_ADDR, 0.0)
    (keepalive, _), = initiator.datagrams_to_send()
    t_send_i, t_recv_i = KDF(2, cr, b"")
    assert keepalive == b"\x04\x00\x00\x00" + responder_index_raw + bytes(8) + AEAD(
        t_send_i, 0, b"", b""
    )
    responder.receive_datagram(keepalive, A_ADDR, 0.0)
    packet = bytes.fromhex("4500001c000000004011000a0a0000020a000001") + b"8 bytes!"
    responder.send_packets([packet], 0.0)
    (datagram, _), = responder.datagrams_to_send()
    padded = packet + bytes(4)
    assert datagram == b"\x04\x00\x00\x00" + sender_index_raw + bytes(8) + AEAD(
        t_recv_i, 0, padded, b""
    )
