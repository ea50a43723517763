"""STUN (RFC 8489/5389, with RFC 5780 behaviour-discovery attributes): codec, client, responder.

STUN shares the mesh port with WireGuard and meshguard's own messages; a datagram is STUN when
bytes 4..7 hold the magic cookie (DESIGN.md §4). Three pieces live here:

- the codec: ``decode`` turns bytes into a ``StunMessage`` or raises ``DecodeError`` (and
  nothing else); ``encode`` turns a message back into bytes, FINGERPRINT last when asked for;
- ``StunClient``: a sans-IO machine that sends Binding requests, retransmits them on the RFC
  schedule, matches responses to outstanding transactions and reports results as events;
  servers it *monitors* are asked again every refresh interval so a changed public address
  is noticed;
- ``StunResponder``: answers Binding requests, so every node with a public address can serve
  as a STUN server for its mesh and no outside server is needed.
"""

from __future__ import annotations

import binascii
import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from meshguard.sansio.errors import DecodeError, LocalProtocolError
from meshguard.sansio.types import Address, Entropy

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LENGTH = 20
TRANSACTION_ID_LENGTH = 12
FINGERPRINT_XOR = 0x5354554E

BINDING = 0x001
"""The only method meshguard uses."""

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_CHANGE_REQUEST = 0x0003
ATTR_ERROR_CODE = 0x0009
ATTR_UNKNOWN_ATTRIBUTES = 0x000A
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_RESPONSE_ORIGIN = 0x802B
ATTR_OTHER_ADDRESS = 0x802C

CHANGE_IP_FLAG = 0x04
CHANGE_PORT_FLAG = 0x02

_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02
_MAX_SOFTWARE_BYTES = 763
_MAX_REASON_BYTES = 763


class MessageClass(IntEnum):
    """The two class bits of the message type (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """ERROR-CODE: a 300..699 code and a reason phrase."""

    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StunMessage:
    """A decoded STUN message.

    The attributes meshguard understands are typed fields; every other attribute is kept raw in
    ``other_attributes`` (type, value) in arrival order. Of a repeated attribute only the first
    counts (RFC 8489 §14). ``fingerprint`` says a FINGERPRINT was present (and verified) when
    decoding, and asks for one when encoding. ``change_ip``/``change_port`` are the
    CHANGE-REQUEST flags (RFC 5780 §7.2); ``change_request`` says the attribute is present.
    """

    message_class: MessageClass
    transaction_id: bytes
    method: int = BINDING
    xor_mapped_address: Address | None = None
    mapped_address: Address | None = None
    response_origin: Address | None = None
    other_address: Address | None = None
    change_request: bool = False
    change_ip: bool = False
    change_port: bool = False
    error: ErrorCode | None = None
    unknown_attributes: tuple[int, ...] = ()
    software: str | None = None
    other_attributes: tuple[tuple[int, bytes], ...] = ()
    fingerprint: bool = True


def is_stun(data: bytes) -> bool:
    """Cheap check for the demultiplexer: header-sized, top two bits zero, magic cookie."""
    return len(data) >= HEADER_LENGTH and data[0] & 0xC0 == 0 and data[4:8] == MAGIC_COOKIE_BYTES


def transaction_id_of(data: bytes) -> bytes | None:
    """The transaction ID of something that looks like STUN, without a full decode."""
    return data[8:HEADER_LENGTH] if is_stun(data) else None


def fingerprint_of(data: bytes) -> int:
    """FINGERPRINT value over ``data`` (the message up to, not including, the attribute)."""
    return (binascii.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _message_type(method: int, message_class: MessageClass) -> int:
    c = int(message_class)
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
    )


def _split_message_type(message_type: int) -> tuple[int, MessageClass]:
    method = (
        (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    )
    c = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, MessageClass(c)


def _pad(value: bytes) -> bytes:
    return value + b"\x00" * (-len(value) % 4)


def _normalize_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse ``host``; an IPv4-mapped IPv6 address (a dual-stack socket's view) becomes IPv4."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise LocalProtocolError(f"not an IP address: {host!r}") from exc
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _encode_address(address: Address, xor_with: bytes | None) -> bytes:
    host, port = address
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {port}")
    ip = _normalize_ip(host)
    family = _FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6
    packed = ip.packed
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        packed = bytes(a ^ b for a, b in zip(packed, xor_with, strict=False))
    return struct.pack("!BBH", 0, family, port) + packed


def _decode_address(value: bytes, xor_with: bytes | None) -> Address:
    if len(value) < 4:
        raise DecodeError("address attribute too short")
    _, family, port = struct.unpack_from("!BBH", value)
    if family == _FAMILY_IPV4 and len(value) == 8:
        packed = value[4:8]
    elif family == _FAMILY_IPV6 and len(value) == 20:
        packed = value[4:20]
    else:
        raise DecodeError(f"bad address family {family} or length {len(value)}")
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        packed = bytes(a ^ b for a, b in zip(packed, xor_with, strict=False))
    return str(ipaddress.ip_address(packed)), port


def _decode_text(value: bytes, what: str, limit: int) -> str:
    if len(value) > limit:
        raise DecodeError(f"{what} too long")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{what} is not UTF-8") from exc


def _encode_text(text: str, what: str, limit: int) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise LocalProtocolError(f"{what} longer than {limit} bytes")
    return raw


_TYPED_ATTRIBUTES = frozenset(
    {
        ATTR_MAPPED_ADDRESS,
        ATTR_CHANGE_REQUEST,
        ATTR_ERROR_CODE,
        ATTR_UNKNOWN_ATTRIBUTES,
        ATTR_XOR_MAPPED_ADDRESS,
        ATTR_SOFTWARE,
        ATTR_FINGERPRINT,
        ATTR_RESPONSE_ORIGIN,
        ATTR_OTHER_ADDRESS,
    }
)


def encode(message: StunMessage) -> bytes:
    """Serialize ``message``; bad field values are caller misuse (``LocalProtocolError``)."""
    if len(message.transaction_id) != TRANSACTION_ID_LENGTH:
        raise LocalProtocolError("a transaction ID is 12 bytes")
    if not 0 <= message.method <= 0xFFF:
        raise LocalProtocolError(f"method out of range: {message.method}")
    xor_key = MAGIC_COOKIE_BYTES + message.transaction_id
    attributes: list[tuple[int, bytes]] = []
    if message.xor_mapped_address is not None:
        attributes.append(
            (ATTR_XOR_MAPPED_ADDRESS, _encode_address(message.xor_mapped_address, xor_key))
        )
    if message.mapped_address is not None:
        attributes.append((ATTR_MAPPED_ADDRESS, _encode_address(message.mapped_address, None)))
    if message.response_origin is not None:
        attributes.append((ATTR_RESPONSE_ORIGIN, _encode_address(message.response_origin, None)))
    if message.other_address is not None:
        attributes.append((ATTR_OTHER_ADDRESS, _encode_address(message.other_address, None)))
    if message.change_request:
        flags = (CHANGE_IP_FLAG if message.change_ip else 0) | (
            CHANGE_PORT_FLAG if message.change_port else 0
        )
        attributes.append((ATTR_CHANGE_REQUEST, struct.pack("!I", flags)))
    elif message.change_ip or message.change_port:
        raise LocalProtocolError("change flags need change_request=True")
    if message.error is not None:
        code = message.error.code
        if not 300 <= code <= 699:
            raise LocalProtocolError(f"error code out of range: {code}")
        reason = _encode_text(message.error.reason, "reason", _MAX_REASON_BYTES)
        attributes.append(
            (ATTR_ERROR_CODE, struct.pack("!HBB", 0, code // 100, code % 100) + reason)
        )
    if message.unknown_attributes:
        if not all(0 <= t <= 0xFFFF for t in message.unknown_attributes):
            raise LocalProtocolError("attribute types are 16-bit")
        attributes.append(
            (
                ATTR_UNKNOWN_ATTRIBUTES,
                b"".join(struct.pack("!H", t) for t in message.unknown_attributes),
            )
        )
    if message.software is not None:
        attributes.append(
            (ATTR_SOFTWARE, _encode_text(message.software, "software", _MAX_SOFTWARE_BYTES))
        )
    for attr_type, value in message.other_attributes:
        if attr_type in _TYPED_ATTRIBUTES or not 0 <= attr_type <= 0xFFFF or len(value) > 0xFFFF:
            raise LocalProtocolError(f"attribute {attr_type:#06x} cannot go in other_attributes")
        attributes.append((attr_type, value))
    body = b"".join(struct.pack("!HH", t, len(v)) + _pad(v) for t, v in attributes)
    message_type = _message_type(message.method, message.message_class)
    if not message.fingerprint:
        return struct.pack("!HH", message_type, len(body)) + xor_key + body
    head = struct.pack("!HH", message_type, len(body) + 8) + xor_key + body
    return head + struct.pack("!HHI", ATTR_FINGERPRINT, 4, fingerprint_of(head))


def decode(data: bytes) -> StunMessage:
    """Parse one STUN message; anything malformed raises ``DecodeError``.

    A FINGERPRINT, when present, must be the last attribute and must match. Padding bytes are
    ignored whatever their value (RFC 8489 §14).
    """
    data = bytes(data)
    if not is_stun(data):
        raise DecodeError("not a STUN message")
    message_type, length = struct.unpack_from("!HH", data)
    if length % 4 or HEADER_LENGTH + length != len(data):
        raise DecodeError("STUN length does not match the datagram")
    method, message_class = _split_message_type(message_type)
    transaction_id = data[8:HEADER_LENGTH]
    xor_key = data[4:HEADER_LENGTH]
    seen: dict[int, bytes] = {}
    others: list[tuple[int, bytes]] = []
    fingerprint = False
    offset = HEADER_LENGTH
    while offset < len(data):
        if fingerprint:
            raise DecodeError("attribute after FINGERPRINT")
        if offset + 4 > len(data):
            raise DecodeError("truncated attribute header")
        attr_type, attr_length = struct.unpack_from("!HH", data, offset)
        start = offset + 4
        end = start + attr_length
        if end > len(data):
            raise DecodeError("attribute runs past the message")
        value = data[start:end]
        if attr_type == ATTR_FINGERPRINT:
            if attr_length != 4:
                raise DecodeError("FINGERPRINT is 4 bytes")
            if struct.unpack("!I", value)[0] != fingerprint_of(data[:offset]):
                raise DecodeError("FINGERPRINT mismatch")
            fingerprint = True
        elif attr_type in _TYPED_ATTRIBUTES:
            seen.setdefault(attr_type, value)
        else:
            others.append((attr_type, value))
        offset = start + attr_length + (-attr_length % 4)
    if offset != len(data):
        raise DecodeError("attribute padding runs past the message")
    return _typed_message(
        message_class, transaction_id, method, xor_key, seen, tuple(others), fingerprint
    )


def _typed_message(
    message_class: MessageClass,
    transaction_id: bytes,
    method: int,
    xor_key: bytes,
    seen: dict[int, bytes],
    others: tuple[tuple[int, bytes], ...],
    fingerprint: bool,
) -> StunMessage:
    def address(attr_type: int, xor: bool) -> Address | None:
        value = seen.get(attr_type)
        return None if value is None else _decode_address(value, xor_key if xor else None)

    change = seen.get(ATTR_CHANGE_REQUEST)
    if change is not None and len(change) != 4:
        raise DecodeError("CHANGE-REQUEST is 4 bytes")
    flags = struct.unpack("!I", change)[0] if change is not None else 0
    error = None
    raw_error = seen.get(ATTR_ERROR_CODE)
    if raw_error is not None:
        if len(raw_error) < 4:
            raise DecodeError("ERROR-CODE too short")
        error_class, number = raw_error[2] & 0x07, raw_error[3]
        if not 3 <= error_class <= 6 or number > 99:
            raise DecodeError("ERROR-CODE out of range")
        error = ErrorCode(
            error_class * 100 + number, _decode_text(raw_error[4:], "reason", _MAX_REASON_BYTES)
        )
    raw_unknown = seen.get(ATTR_UNKNOWN_ATTRIBUTES, b"")
    if len(raw_unknown) % 2:
        raise DecodeError("UNKNOWN-ATTRIBUTES has an odd length")
    raw_software = seen.get(ATTR_SOFTWARE)
    return StunMessage(
        message_class=message_class,
        transaction_id=transaction_id,
        method=method,
        xor_mapped_address=address(ATTR_XOR_MAPPED_ADDRESS, True),
        mapped_address=address(ATTR_MAPPED_ADDRESS, False),
        response_origin=address(ATTR_RESPONSE_ORIGIN, False),
        other_address=address(ATTR_OTHER_ADDRESS, False),
        change_request=change is not None,
        change_ip=bool(flags & CHANGE_IP_FLAG),
        change_port=bool(flags & CHANGE_PORT_FLAG),
        error=error,
        unknown_attributes=tuple(
            struct.unpack_from("!H", raw_unknown, i)[0] for i in range(0, len(raw_unknown), 2)
        ),
        software=(
            None
            if raw_software is None
            else _decode_text(raw_software, "SOFTWARE", _MAX_SOFTWARE_BYTES)
        ),
        other_attributes=others,
        fingerprint=fingerprint,
    )


def comprehension_required_unknown(message: StunMessage) -> tuple[int, ...]:
    """Attribute types below 0x8000 that meshguard does not understand (RFC 8489 §14)."""
    return tuple(t for t, _ in message.other_attributes if t < 0x8000)


# --------------------------------------------------------------------------- responder


class StunResponder:
    """Answers Binding requests: the node's own STUN server (the address it saw the request from).

    A request with a comprehension-required attribute it does not understand gets a 420 error
    (RFC 8489 §6.3.1); that includes CHANGE-REQUEST, since one socket cannot answer from another
    address (RFC 5780 §6.1). Everything else — responses, indications, other methods,
    malformed bytes — is dropped and counted.
    """

    def __init__(self, software: str | None = None) -> None:
        self.software = software
        self.answered = 0
        self.dropped = 0

    def answer(self, data: bytes, source: Address) -> bytes | None:
        """The response datagram to send back to ``source``, or ``None`` to drop ``data``."""
        try:
            request = decode(data)
        except DecodeError:
            self.dropped += 1
            return None
        if request.message_class is not MessageClass.REQUEST or request.method != BINDING:
            self.dropped += 1
            return None
        unknown = comprehension_required_unknown(request)
        if request.change_request:
            unknown = (ATTR_CHANGE_REQUEST, *unknown)
        self.answered += 1
        if unknown:
            return encode(
                StunMessage(
                    MessageClass.ERROR,
                    request.transaction_id,
                    error=ErrorCode(420, "Unknown Attribute"),
                    unknown_attributes=unknown,
                    software=self.software,
                )
            )
        return encode(
            StunMessage(
                MessageClass.SUCCESS,
                request.transaction_id,
                xor_mapped_address=source,
                mapped_address=source,
                software=self.software,
            )
        )


# --------------------------------------------------------------------------- client


@dataclass(frozen=True, slots=True)
class StunTiming:
    """Retransmission schedule (RFC 8489 §6.2.1) and refresh period.

    A request is sent at 0, RTO, 3·RTO, 7·RTO, … (the interval doubles) ``transmissions``
    times (Rc); after the last one the client waits ``last_wait_factor``·RTO (Rm) before
    giving up. The defaults are the RFC's: 0.5 s, 7, 16, so a dead server times out after 39.5 s.
    """

    rto: float = 0.5
    transmissions: int = 7
    last_wait_factor: float = 16.0
    refresh_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.rto <= 0 or self.transmissions < 1 or self.last_wait_factor <= 0:
            raise LocalProtocolError("STUN timing needs rto > 0, transmissions ≥ 1, Rm > 0")
        if self.refresh_interval <= 0:
            raise LocalProtocolError("refresh interval must be positive")

    def give_up_after(self) -> float:
        """Seconds from the first transmission to the timeout."""
        return self.rto * ((1 << (self.transmissions - 1)) - 1) + self.rto * self.last_wait_factor


@dataclass(frozen=True, slots=True)
class MappedAddress:
    """A Binding response: ``server`` saw us as ``mapped``.

    ``via_xor`` tells whether it came from XOR-MAPPED-ADDRESS (else the MAPPED-ADDRESS
    fallback). ``source`` is where the response came from (differs from ``server`` after a
    CHANGE-REQUEST); ``other_address`` is the server's RFC 5780 alternate address, if any.
    """

    transaction_id: bytes
    server: Address
    mapped: Address
    via_xor: bool
    source: Address
    other_address: Address | None = None
    response_origin: Address | None = None


@dataclass(frozen=True, slots=True)
class StunTimeout:
    """No answer from ``server`` after the whole retransmission schedule."""

    transaction_id: bytes
    server: Address


@dataclass(frozen=True, slots=True)
class StunErrorResponse:
    """``server`` answered with an error (e.g. 420 to a CHANGE-REQUEST it cannot honour)."""

    transaction_id: bytes
    server: Address
    error: ErrorCode
    unknown_attributes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PublicAddressChanged:
    """A monitored server now sees a different mapped address than at the previous refresh."""

    server: Address
    previous: Address
    current: Address


StunEvent = MappedAddress | StunTimeout | StunErrorResponse | PublicAddressChanged


@dataclass(slots=True)
class _Transaction:
    server: Address
    datagram: bytes
    sent: int
    next_at: float
    interval: float
    monitored: bool


class StunClient:
    """Sans-IO STUN Binding client.

    ``query`` starts one transaction (for NAT detection); ``monitor`` keeps asking one server
    every ``timing.refresh_interval`` and reports ``PublicAddressChanged`` when the answer
    changes. Responses are matched to outstanding transactions by ID alone (a CHANGE-REQUEST
    is answered from another address); anything else is dropped and counted.
    """

    def __init__(
        self, entropy: Entropy, timing: StunTiming | None = None, software: str | None = None
    ) -> None:
        self.timing = timing or StunTiming()
        self.software = software
        self.dropped_malformed = 0
        self.dropped_unmatched = 0
        self._entropy = entropy
        self._transactions: dict[bytes, _Transaction] = {}
        self._monitored: dict[Address, float | None] = {}
        self._last_mapped: dict[Address, Address] = {}
        self._outbox: list[tuple[bytes, Address]] = []
        self._events: list[StunEvent] = []

    # ---- commands

    def query(
        self,
        server: Address,
        now: float,
        *,
        change_ip: bool = False,
        change_port: bool = False,
    ) -> bytes:
        """Send a Binding request to ``server`` now; returns its transaction ID."""
        return self._start(server, now, change_ip, change_port, monitored=False)

    def monitor(self, server: Address, now: float) -> None:
        """Ask ``server`` now and again every refresh interval from its last result."""
        if server in self._monitored:
            raise LocalProtocolError(f"already monitoring {server}")
        self._monitored[server] = None
        self._start(server, now, False, False, monitored=True)

    def cancel(self, transaction_id: bytes) -> None:
        """Forget an outstanding transaction (its answer, if it comes, is dropped)."""
        self._transactions.pop(transaction_id, None)

    def public_address(self, server: Address) -> Address | None:
        """The mapped address ``server`` reported most recently."""
        return self._last_mapped.get(server)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` carries the ID of one of our outstanding transactions."""
        return transaction_id_of(data) in self._transactions

    # ---- sans-IO interface

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def events(self) -> list[StunEvent]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        deadlines = [t.next_at for t in self._transactions.values()]
        deadlines += [at for at in self._monitored.values() if at is not None]
        return min(deadlines, default=None)

    def on_timer(self, now: float) -> None:
        for transaction_id, transaction in list(self._transactions.items()):
            if transaction.next_at > now:
                continue
            if transaction.sent >= self.timing.transmissions:
                del self._transactions[transaction_id]
                self._events.append(StunTimeout(transaction_id, transaction.server))
                self._schedule_refresh(transaction, now)
                continue
            self._outbox.append((transaction.datagram, transaction.server))
            transaction.sent += 1
            transaction.interval *= 2
            if transaction.sent == self.timing.transmissions:
                transaction.next_at = now + self.timing.rto * self.timing.last_wait_factor
            else:
                transaction.next_at = now + transaction.interval
        for server, at in list(self._monitored.items()):
            if at is not None and at <= now:
                self._monitored[server] = None
                self._start(server, now, False, False, monitored=True)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        try:
            message = decode(data)
        except DecodeError:
            self.dropped_malformed += 1
            return
        transaction = self._transactions.get(message.transaction_id)
        if (
            transaction is None
            or message.method != BINDING
            or message.message_class not in (MessageClass.SUCCESS, MessageClass.ERROR)
        ):
            self.dropped_unmatched += 1
            return
        if message.message_class is MessageClass.ERROR:
            if message.error is None:
                self.dropped_malformed += 1
                return
            del self._transactions[message.transaction_id]
            self._events.append(
                StunErrorResponse(
                    message.transaction_id,
                    transaction.server,
                    message.error,
                    message.unknown_attributes,
                )
            )
            self._schedule_refresh(transaction, now)
            return
        mapped = message.xor_mapped_address or message.mapped_address
        if mapped is None:
            self.dropped_malformed += 1
            return
        del self._transactions[message.transaction_id]
        self._events.append(
            MappedAddress(
                message.transaction_id,
                transaction.server,
                mapped,
                message.xor_mapped_address is not None,
                addr,
                message.other_address,
                message.response_origin,
            )
        )
        if transaction.monitored:
            previous = self._last_mapped.get(transaction.server)
            if previous is not None and previous != mapped:
                self._events.append(PublicAddressChanged(transaction.server, previous, mapped))
        self._last_mapped[transaction.server] = mapped
        self._schedule_refresh(transaction, now)

    # ---- internals

    def _start(
        self, server: Address, now: float, change_ip: bool, change_port: bool, monitored: bool
    ) -> bytes:
        transaction_id = self._entropy(TRANSACTION_ID_LENGTH)
        if len(transaction_id) != TRANSACTION_ID_LENGTH:
            raise LocalProtocolError("entropy returned the wrong number of bytes")
        if transaction_id in self._transactions:
            raise LocalProtocolError("entropy repeated a transaction ID")
        datagram = encode(
            StunMessage(
                MessageClass.REQUEST,
                transaction_id,
                change_request=change_ip or change_port,
                change_ip=change_ip,
                change_port=change_port,
                software=self.software,
            )
        )
        timing = self.timing
        first_wait = (
            timing.rto if timing.transmissions > 1 else timing.rto * timing.last_wait_factor
        )
        self._outbox.append((datagram, server))
        self._transactions[transaction_id] = _Transaction(
            server=server,
            datagram=datagram,
            sent=1,
            next_at=now + first_wait,
            interval=self.timing.rto,
            monitored=monitored,
        )
        return transaction_id

    def _schedule_refresh(self, transaction: _Transaction, now: float) -> None:
        if transaction.monitored and transaction.server in self._monitored:
            self._monitored[transaction.server] = now + self.timing.refresh_interval
