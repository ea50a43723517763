"""Cryptokey routing: longest-prefix match from an IP address to the peer that owns it.

One table serves both directions: outbound, a packet goes to the owner of its destination;
inbound, a decrypted packet is accepted only if its source is owned by the peer that sent it.
Lookups of exact addresses are cached in a plain dict (the hot path is one ``dict.get``);
any change to the table clears the cache.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Generic, TypeVar

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Owner = TypeVar("Owner")


class AllowedIPs(Generic[Owner]):
    """Prefixes to owners; a prefix has at most one owner (re-adding it moves it)."""

    __slots__ = ("_by_length", "_cache_limit", "_owners", "_prefix_lengths", "cache")

    def __init__(self, cache_limit: int) -> None:
        self._owners: dict[Network, Owner] = {}
        self._by_length: dict[tuple[int, int], dict[int, Owner]] = {}
        """(address length in bytes, prefix length) → network bits → owner."""
        self._prefix_lengths: dict[int, list[int]] = {4: [], 16: []}
        """Address length in bytes → prefix lengths present, longest first."""
        self._cache_limit = cache_limit
        self.cache: dict[bytes, Owner] = {}
        """Packed address → owner, for addresses already looked up."""

    def assign(self, owner: Owner, networks: Sequence[Network]) -> None:
        """Make ``networks`` exactly the prefixes of ``owner``, taking them from other owners."""
        for network in [n for n, o in self._owners.items() if o is owner]:
            del self._owners[network]
        for network in networks:
            self._owners[network] = owner
        self._rebuild()

    def networks_of(self, owner: Owner) -> list[Network]:
        return [n for n, o in self._owners.items() if o is owner]

    def lookup(self, address: bytes) -> Owner | None:
        """The owner of the longest prefix containing ``address`` (4 or 16 packed bytes)."""
        owner = self.cache.get(address)
        if owner is not None:
            return owner
        size = len(address)
        lengths = self._prefix_lengths.get(size)
        if not lengths:
            return None
        value = int.from_bytes(address, "big")
        bits = size * 8
        by_length = self._by_length
        for length in lengths:
            owner = by_length[(size, length)].get(value >> (bits - length))
            if owner is not None:
                cache = self.cache
                if len(cache) >= self._cache_limit:
                    cache.clear()
                cache[address] = owner
                return owner
        return None

    def _rebuild(self) -> None:
        by_length: dict[tuple[int, int], dict[int, Owner]] = {}
        for network, owner in self._owners.items():
            size = 4 if network.version == 4 else 16
            key = int(network.network_address) >> (size * 8 - network.prefixlen)
            by_length.setdefault((size, network.prefixlen), {})[key] = owner
        self._by_length = by_length
        self._prefix_lengths = {
            size: sorted((length for s, length in by_length if s == size), reverse=True)
            for size in (4, 16)
        }
        self.cache.clear()
