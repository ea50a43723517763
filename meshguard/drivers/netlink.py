"""Interface configuration over netlink (pyroute2): MTU, link up, addresses, routes.

The TUN device is not persistent, so closing it removes the interface together with every
address and route configured here: teardown needs no netlink calls.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

_IFA_F_NODAD = 0x02
_EEXIST = 17

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def configure_interface(
    name: str, *, mtu: int, addresses: Iterable[Interface], routes: Iterable[Network]
) -> None:
    """Set the MTU, assign ``addresses``, bring the link up and route ``routes`` into it.

    A route that the kernel already has (e.g. the prefix route of an address) is left as is.
    """
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            raise OSError(f"interface {name} does not exist")
        index = found[0]
        ipr.link("set", index=index, mtu=mtu)
        for address in addresses:
            ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                **({"flags": _IFA_F_NODAD} if address.version == 6 else {}),
            )
        ipr.link("set", index=index, state="up")
        for network in routes:
            try:
                ipr.route("add", dst=str(network), oif=index)
            except NetlinkError as error:
                if error.code != _EEXIST:
                    raise
