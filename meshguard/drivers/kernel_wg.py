"""The kernel's WireGuard interface, configured over netlink (pyroute2): ``meshguard run --kernel``.

The kernel owns the interface and the crypto; meshguard proxies its datagrams through the mesh
port exactly as for wireguard-go (``meshguard.drivers.wgproxy``), so only the control plane
runs in Python. Kernels without the WireGuard module (no ``CONFIG_WIREGUARD``, or a container
that cannot load it) refuse to create the link: that is reported as one line, with the
alternatives.
"""

from __future__ import annotations

import base64
import errno
import shutil
import subprocess
from collections.abc import Sequence

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from meshguard.drivers.uapi import ExternalPeerStats
from meshguard.drivers.wgproxy import Network
from meshguard.errors import UserError
from meshguard.sansio.types import Address

NO_MODULE = (
    "this kernel has no WireGuard module (modprobe wireguard failed or is unavailable); "
    "run without --kernel for the userspace data plane, or use --uapi with wireguard-go"
)
_NO_MODULE_ERRNOS = (errno.EOPNOTSUPP, errno.ENOENT, errno.EAFNOSUPPORT)


def _load_module() -> bool:
    """Try ``modprobe wireguard``; whether it succeeded."""
    modprobe = shutil.which("modprobe")
    if modprobe is None:
        return False
    try:
        result = subprocess.run(
            [modprobe, "wireguard"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _add_link(name: str) -> None:
    with IPRoute() as ipr:
        if ipr.link_lookup(ifname=name):
            raise UserError(f"interface {name} already exists; set another 'interface'")
        ipr.link("add", ifname=name, kind="wireguard")


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class KernelWireGuard:
    """A kernel WireGuard interface this process created (``close`` deletes it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            _add_link(name)
        except NetlinkError as error:
            if error.code not in _NO_MODULE_ERRNOS or not _load_module():
                raise UserError(
                    NO_MODULE
                    if error.code in _NO_MODULE_ERRNOS
                    else f"cannot create WireGuard interface {name}: {error}"
                ) from None
            try:
                _add_link(name)
            except NetlinkError:
                raise UserError(NO_MODULE) from None
        try:
            self.netlink = WireGuard()
        except NetlinkError:
            self._delete_link()
            raise UserError(NO_MODULE) from None

    def configure(self, private_key: bytes) -> int:
        """Set the private key and an ephemeral listen port; returns the port."""
        try:
            self.netlink.set(self.name, private_key=_b64(private_key), listen_port=0)
            info = self.netlink.info(self.name)
        except NetlinkError as error:
            raise UserError(f"cannot configure WireGuard interface {self.name}: {error}") from None
        port = info[0].get_attr("WGDEVICE_A_LISTEN_PORT")
        if not isinstance(port, int):
            raise UserError(f"WireGuard interface {self.name} reports no listen port")
        return port

    def set_peer(
        self,
        public_key: bytes,
        *,
        endpoint: Address | None,
        allowed_ips: Sequence[Network],
        persistent_keepalive: int | None,
        preshared_key: bytes | None = None,
    ) -> None:
        peer: dict[str, object] = {
            "public_key": _b64(public_key),
            "persistent_keepalive": persistent_keepalive or 0,
            "replace_allowed_ips": True,
            "allowed_ips": [str(network) for network in allowed_ips],
        }
        if endpoint is not None:
            peer["endpoint_addr"], peer["endpoint_port"] = endpoint
        if preshared_key is not None:
            peer["preshared_key"] = _b64(preshared_key)
        self._set(peer)

    def remove_peer(self, public_key: bytes) -> None:
        self._set({"public_key": _b64(public_key), "remove": True})

    def _set(self, peer: dict[str, object]) -> None:
        try:
            self.netlink.set(self.name, peer=peer)
        except NetlinkError as error:
            raise UserError(f"WireGuard interface {self.name} refused a peer: {error}") from None

    def peer_stats(self) -> dict[bytes, ExternalPeerStats]:
        """Not read back from the kernel yet: ``meshguard status`` shows no byte counts."""
        return {}

    def _delete_link(self) -> None:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.name)
            if found:
                ipr.link("del", index=found[0])

    def close(self) -> None:
        self.netlink.close()
        self._delete_link()
