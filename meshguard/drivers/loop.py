"""The event loop: moves packets between the TUN device, the UDP socket and a core.

Everything is done in batches: read the TUN until it is empty (bounded), cut TSO
super-packets into MTU-sized packets, hand them to the core in one ``send_packets`` call,
then send what the core produced grouped by destination with UDP GSO. The other way: read
UDP (GRO runs) until empty (bounded), one ``receive_datagrams`` call per sender run, then
write the decrypted packets to the TUN with adjacent TCP segments coalesced into TSO writes.
One timer, re-armed from ``next_deadline`` after every round.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from meshguard.drivers import offload
from meshguard.drivers.core import Core, SplitCore
from meshguard.drivers.pollloop import PollLoop
from meshguard.drivers.tun import MAX_READ, TunDevice
from meshguard.drivers.udp import UdpSocket

log = logging.getLogger("meshguard.dataplane")

# Round sizes: big enough that system calls and per-call overhead are amortized (a TUN read
# or a GRO receive carries up to ~45 packets), small enough that one daemon hands packets on
# while the next stage (the peer daemon, the kernel's TCP) is still busy with the previous ones.
TUN_READS_PER_ROUND = 32
PACKETS_PER_ROUND = 128
UDP_READS_PER_ROUND = 16


@dataclass
class DataPlaneCounters:
    """What the loop dropped or worked around, for logs and tests."""

    tun_reads: int = 0
    tun_read_drops: int = 0
    tun_writes: int = 0
    tun_write_errors: int = 0
    udp_batches: int = 0


class DataPlane(PollLoop):
    """Drives one core with one TUN device and one UDP socket until stopped."""

    def __init__(
        self,
        core: Core,
        tun: TunDevice,
        udp: UdpSocket,
        *,
        mtu: int,
        on_event: Callable[[object], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(core, clock)
        self.core = core
        self.split: SplitCore | None = core if isinstance(core, SplitCore) else None
        """The core again when it hands out TTL-limited datagrams (sent with their TTL)."""
        self.tun = tun
        self.udp = udp
        self.mtu = mtu
        self.on_event = on_event
        self.counters = DataPlaneCounters()
        self._tun_fd = tun.fileno()
        self._udp_fd = udp.fileno()
        for fd in (self._tun_fd, self._udp_fd):
            self._poller.register(fd, select.EPOLLIN)

    def _ready(self, fd: int) -> None:
        if fd == self._udp_fd:
            self._from_network()
        elif fd == self._tun_fd:
            self._from_tun()

    def _from_tun(self) -> None:
        read = os.read
        fd = self.tun.fileno()
        packets: list[bytes] = []
        vnet = self.tun.vnet_hdr
        mtu = self.mtu
        for _ in range(TUN_READS_PER_ROUND):
            try:
                buf = read(fd, MAX_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.counters.tun_read_drops += 1
                break
            self.counters.tun_reads += 1
            if not vnet:
                packets.append(buf)
            elif buf[1] == offload.GSO_NONE and not buf[0] & offload.F_NEEDS_CSUM:
                packets.append(buf[offload.VNET_HDR_LEN :])
            else:
                try:
                    packets.extend(offload.segment(buf, mtu))
                except offload.OffloadError:
                    self.counters.tun_read_drops += 1
            if len(packets) >= PACKETS_PER_ROUND:
                break
        if packets:
            self.core.send_packets(packets, self.clock())
            self._flush()

    def _from_network(self) -> None:
        runs = self.udp.receive(UDP_READS_PER_ROUND)
        if not runs:
            return
        now = self.clock()
        receive = self.core.receive_datagrams
        for datagrams, address in runs:
            receive(datagrams, address, now)
        self.counters.udp_batches += len(runs)
        self._flush()

    def _flush(self) -> None:
        core = self.core
        if self.split is None:
            datagrams = core.datagrams_to_send()
        else:
            datagrams, limited = self.split.split_datagrams_to_send()
            if limited:
                self.udp.send_limited(limited)
        if datagrams:
            self.udp.send(datagrams)
        if self.side is not None:
            self.side.flush()
        packets = core.tun_packets()
        if packets:
            self._write_tun(packets)
        events = core.events()
        if events and self.on_event is not None:
            for event in events:
                self.on_event(event)

    def _write_tun(self, packets: list[bytes]) -> None:
        fd = self.tun.fileno()
        if self.tun.vnet_hdr:
            writev = os.writev
            writes = offload.coalesce(packets)
            for buffers in writes:
                try:
                    writev(fd, buffers)
                except OSError as error:
                    self._tun_write_failed(error)
            self.counters.tun_writes += len(writes)
        else:
            write = os.write
            for packet in packets:
                try:
                    write(fd, packet)
                except OSError as error:
                    self._tun_write_failed(error)
            self.counters.tun_writes += len(packets)

    def _tun_write_failed(self, error: OSError) -> None:
        """EIO (interface down) and EINVAL (a packet the kernel refuses) are counted only."""
        self.counters.tun_write_errors += 1
        if error.errno not in (errno.EIO, errno.EINVAL, errno.EAGAIN, errno.ENOBUFS):
            log.warning("event=tun_write_failed error=%s", error.strerror)


def describe(event: object) -> str:
    """An event as ``Name field=value ...`` (bytes as base64), for one log line."""
    parts = [type(event).__name__]
    try:
        names = [field.name for field in fields(event)]  # type: ignore[arg-type]
    except TypeError:
        return parts[0]
    for name in names:
        value = getattr(event, name)
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        parts.append(f"{name}={value}")
    return " ".join(parts)
