"""The TUN device, with the kernel's offloads when it has them.

Opened with ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` (checksum + TSO for IPv4 and IPv6), every
read and write carries a virtio-net header and reads may be TCP super-packets up to 64 KiB, so
one system call moves dozens of MTU-sized packets. If the kernel refuses the offloads the device
is reopened plain (one IP packet per read, no header).
"""

from __future__ import annotations

import fcntl
import os
import struct

from meshguard.drivers import offload

_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_TUNSETVNETHDRSZ = 0x400454D8
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUN_F_CSUM = 0x01
_TUN_F_TSO4 = 0x02
_TUN_F_TSO6 = 0x04

MAX_READ = 65535 + offload.VNET_HDR_LEN


class TunDevice:
    """An open TUN interface; the interface disappears when it is closed."""

    def __init__(self, name: str, *, offloads: bool = True) -> None:
        self.fd = -1
        self.vnet_hdr = False
        if offloads:
            try:
                self._open(name, vnet_hdr=True)
            except OSError:
                self.close()
            else:
                self.vnet_hdr = True
        if not self.vnet_hdr:
            self._open(name, vnet_hdr=False)

    def _open(self, name: str, *, vnet_hdr: bool) -> None:
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
        ifreq = fcntl.ioctl(self.fd, _TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        self.name = ifreq[:16].rstrip(b"\0").decode()
        if vnet_hdr:
            fcntl.ioctl(self.fd, _TUNSETVNETHDRSZ, struct.pack("i", offload.VNET_HDR_LEN))
            fcntl.ioctl(self.fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
