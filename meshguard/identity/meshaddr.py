"""Mesh addresses derived from a node's Ed25519 public key (DESIGN.md §5).

With h = BLAKE3(public key) (32-byte digest):

- IPv4: 10.99.h[0].h[1] in 10.99.0.0/16, where h[0] = 0 becomes 1, h[1] = 0 becomes 1 and
  h[1] = 255 becomes 254 (so the address never ends in .0 or .255 and never lies in 10.99.0.0/24);
- IPv6: fd99:6d67::/64 followed by h[0..8] as the interface identifier; if those 8 bytes are all
  zero the last one becomes 1 (so the address is never the subnet-router anycast address).

The IPv4 space holds about 64,000 addresses, so two keys can collide (a birthday collision is
likely from a few hundred nodes on). ``find_collisions`` reports them; callers must never let one
key's address silently replace another's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import blake3

MESH_IPV4_NETWORK = ipaddress.IPv4Network("10.99.0.0/16")
MESH_IPV6_NETWORK = ipaddress.IPv6Network("fd99:6d67::/64")

MeshAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def address_digest(public_key: bytes) -> bytes:
    """BLAKE3 of the 32-byte Ed25519 public key: the source of both mesh addresses."""
    if len(public_key) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(public_key)}")
    return blake3.blake3(public_key).digest()


def mesh_ipv4_from_digest(digest: bytes) -> ipaddress.IPv4Address:
    """10.99.h[0].h[1] with the substitutions of §5 (split out so edge cases can be tested)."""
    third = digest[0] or 1
    fourth = min(digest[1] or 1, 254)
    return ipaddress.IPv4Address(bytes((10, 99, third, fourth)))


def mesh_ipv6_from_digest(digest: bytes) -> ipaddress.IPv6Address:
    """fd99:6d67::/64 + h[0..8], the last byte forced to 1 if all 8 are zero."""
    interface_id = digest[:8]
    if not any(interface_id):
        interface_id = bytes(7) + b"\x01"
    return ipaddress.IPv6Address(MESH_IPV6_NETWORK.network_address.packed[:8] + interface_id)


def mesh_ipv4(public_key: bytes) -> ipaddress.IPv4Address:
    """The mesh IPv4 address of the node with this Ed25519 public key."""
    return mesh_ipv4_from_digest(address_digest(public_key))


def mesh_ipv6(public_key: bytes) -> ipaddress.IPv6Address:
    """The mesh IPv6 address of the node with this Ed25519 public key."""
    return mesh_ipv6_from_digest(address_digest(public_key))


def find_collisions(public_keys: Iterable[bytes]) -> list[tuple[MeshAddress, list[bytes]]]:
    """Every mesh address (IPv4 or IPv6) that two or more distinct keys map to.

    Returns (address, keys) pairs, IPv4 addresses first, each group sorted by address and its
    keys sorted by bytes, so the report does not depend on input order. A key given twice counts
    once.
    """
    claimants: dict[MeshAddress, set[bytes]] = {}
    for public_key in public_keys:
        digest = address_digest(public_key)
        for address in (mesh_ipv4_from_digest(digest), mesh_ipv6_from_digest(digest)):
            claimants.setdefault(address, set()).add(public_key)
    collisions = [(address, sorted(keys)) for address, keys in claimants.items() if len(keys) > 1]
    collisions.sort(key=lambda item: (item[0].version, item[0]))
    return collisions
