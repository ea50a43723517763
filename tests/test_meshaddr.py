"""Mesh addresses from public keys (DESIGN.md §5): known answers, edge rules, collisions."""

from __future__ import annotations

import ipaddress

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshguard.identity.keys import Identity
from meshguard.identity.meshaddr import (
    MESH_IPV4_NETWORK,
    MESH_IPV6_NETWORK,
    find_collisions,
    mesh_ipv4,
    mesh_ipv4_from_digest,
    mesh_ipv6,
    mesh_ipv6_from_digest,
)

keys = st.binary(min_size=32, max_size=32)


def counter_key(number: int) -> bytes:
    return number.to_bytes(32, "little")


# Hand-pinned vectors: (public key, BLAKE3 prefix, IPv4, IPv6). The counter keys were picked to
# hit each substitution rule; the last two are the RFC 8032 TEST 1 and libsodium public keys.
PINNED = [
    (counter_key(36), "57ff1f1a7b7ea9a6", "10.99.87.254", "fd99:6d67::57ff:1f1a:7b7e:a9a6"),
    (counter_key(42), "ff1ec43baf88bb7f", "10.99.255.30", "fd99:6d67::ff1e:c43b:af88:bb7f"),
    (counter_key(271), "00a41c43db5a33b5", "10.99.1.164", "fd99:6d67::a4:1c43:db5a:33b5"),
    (counter_key(777), "56008decfc8d2990", "10.99.86.1", "fd99:6d67::5600:8dec:fc8d:2990"),
    (
        bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"),
        "6c31041268f47160",
        "10.99.108.49",
        "fd99:6d67::6c31:412:68f4:7160",
    ),
    (
        bytes.fromhex("b5076a8474a832daee4dd5b4040983b6623b5f344aca57d4d6ee4baf3f259e6e"),
        "646ca7bdc9251010",
        "10.99.100.108",
        "fd99:6d67::646c:a7bd:c925:1010",
    ),
]


@pytest.mark.parametrize(("public_key", "digest_prefix", "ipv4", "ipv6"), PINNED)
def test_pinned_vectors(public_key: bytes, digest_prefix: str, ipv4: str, ipv6: str) -> None:
    assert blake3.blake3(public_key).hexdigest()[:16] == digest_prefix
    assert mesh_ipv4(public_key) == ipaddress.IPv4Address(ipv4)
    assert mesh_ipv6(public_key) == ipaddress.IPv6Address(ipv6)


def test_pinned_vectors_cover_every_ipv4_rule() -> None:
    prefixes = [bytes.fromhex(prefix) for _, prefix, _, _ in PINNED]
    assert any(prefix[0] == 0 for prefix in prefixes)
    assert any(prefix[1] == 0 for prefix in prefixes)
    assert any(prefix[1] == 255 for prefix in prefixes)


@given(keys)
def test_matches_an_independent_calculation(public_key: bytes) -> None:
    h = blake3.blake3(public_key).digest()
    third = 1 if h[0] == 0 else h[0]
    fourth = {0: 1, 255: 254}.get(h[1], h[1])
    assert str(mesh_ipv4(public_key)) == f"10.99.{third}.{fourth}"
    groups = ":".join(f"{h[i]:02x}{h[i + 1]:02x}" for i in range(0, 8, 2))
    expected_ipv6 = ipaddress.IPv6Address(f"fd99:6d67:0:0:{groups}")
    assert mesh_ipv6(public_key) == expected_ipv6


@given(keys)
def test_addresses_stay_inside_the_mesh_networks_and_avoid_edges(public_key: bytes) -> None:
    ipv4 = mesh_ipv4(public_key)
    assert ipv4 in MESH_IPV4_NETWORK
    third, fourth = ipv4.packed[2], ipv4.packed[3]
    assert third != 0
    assert fourth not in (0, 255)
    ipv6 = mesh_ipv6(public_key)
    assert ipv6 in MESH_IPV6_NETWORK
    assert ipv6 != MESH_IPV6_NETWORK.network_address


@pytest.mark.parametrize(
    ("head", "ipv4"),
    [
        (b"\x00\x00", "10.99.1.1"),
        (b"\x00\xff", "10.99.1.254"),
        (b"\xff\x00", "10.99.255.1"),
        (b"\xff\xff", "10.99.255.254"),
        (b"\x07\xfe", "10.99.7.254"),
        (b"\x01\x01", "10.99.1.1"),
    ],
)
def test_ipv4_substitution_rules(head: bytes, ipv4: str) -> None:
    assert mesh_ipv4_from_digest(head + bytes(30)) == ipaddress.IPv4Address(ipv4)


def test_ipv6_all_zero_interface_id_becomes_one() -> None:
    assert mesh_ipv6_from_digest(bytes(32)) == ipaddress.IPv6Address("fd99:6d67::1")
    assert mesh_ipv6_from_digest(bytes(8) + b"\xff" * 24) == ipaddress.IPv6Address("fd99:6d67::1")
    assert mesh_ipv6_from_digest(bytes(7) + b"\x02" + bytes(24)) == ipaddress.IPv6Address(
        "fd99:6d67::2"
    )


@pytest.mark.parametrize("length", [0, 31, 33])
def test_public_key_must_be_32_bytes(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        mesh_ipv4(bytes(length))
    with pytest.raises(ValueError, match="32 bytes"):
        mesh_ipv6(bytes(length))


# Identity.from_seed(counter_key(81)) and (418) are real key pairs whose IPv4 addresses collide.
COLLIDING_A = Identity.from_seed(counter_key(81)).public_key
COLLIDING_B = Identity.from_seed(counter_key(418)).public_key


def test_find_collisions_reports_a_real_ipv4_collision() -> None:
    assert mesh_ipv4(COLLIDING_A) == mesh_ipv4(COLLIDING_B) == ipaddress.IPv4Address("10.99.4.245")
    others = [Identity.from_seed(counter_key(n)).public_key for n in range(5)]
    collisions = find_collisions([*others, COLLIDING_B, COLLIDING_A])
    assert collisions == [
        (ipaddress.IPv4Address("10.99.4.245"), sorted([COLLIDING_A, COLLIDING_B]))
    ]


def test_find_collisions_is_order_independent_and_ignores_repeats() -> None:
    group = [COLLIDING_A, COLLIDING_B, counter_key(1)]
    assert find_collisions(group) == find_collisions(list(reversed(group)))
    assert find_collisions([COLLIDING_A, COLLIDING_A]) == []
    assert find_collisions([]) == []


def test_find_collisions_sorts_ipv4_before_ipv6_and_by_address() -> None:
    # Collisions among the counter keys, found by brute force, give several groups to sort.
    seen: dict[ipaddress.IPv4Address, bytes] = {}
    colliding: list[bytes] = []
    number = 0
    while len(colliding) < 6:
        public_key = counter_key(number)
        ipv4 = mesh_ipv4(public_key)
        if ipv4 in seen:
            colliding += [seen[ipv4], public_key]
        seen[ipv4] = public_key
        number += 1
    collisions = find_collisions(colliding)
    assert len(collisions) >= 3
    addresses = [address for address, _ in collisions]
    assert addresses == sorted(addresses, key=lambda address: (address.version, address))
    for colliding_address, group in collisions:
        assert len(group) >= 2
        assert group == sorted(group)
        assert {mesh_ipv4(key) for key in group} == {colliding_address}


@given(st.lists(keys | st.sampled_from([COLLIDING_A, COLLIDING_B, counter_key(1)]), max_size=20))
def test_find_collisions_agrees_with_grouping(public_keys: list[bytes]) -> None:
    reported = {address: group for address, group in find_collisions(public_keys)}
    by_address: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, set[bytes]] = {}
    for public_key in public_keys:
        by_address.setdefault(mesh_ipv4(public_key), set()).add(public_key)
        by_address.setdefault(mesh_ipv6(public_key), set()).add(public_key)
    expected = {address: sorted(group) for address, group in by_address.items() if len(group) > 1}
    assert reported == expected
