"""meshguard's own protocol messages as plain data.

These are the decoded forms of every meshguard datagram (everything on the port that is
neither WireGuard nor STUN). ``codec`` turns them into bytes and back; the machines (SWIM,
hole punching, relay) only ever see these objects. Public keys are raw 32-byte Ed25519 keys.

Trust rules the types encode (DESIGN.md §4):

- A ``MemberRecord`` is a member's claim about itself (liveness, incarnation, endpoints,
  NAT facts) and carries that member's Ed25519 signature, so nobody can forge another node's
  liveness or endpoint, however many hops the record travels.
- ``Suspect`` and ``Dead`` are accusations by another member; they are believed only because
  the datagram carrying them is authenticated by a trusted sender, and a member refutes
  them with a newer self-signed record.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class RecordStatus(IntEnum):
    """What a member says about itself."""

    ALIVE = 0
    LEFT = 1


class NatMapping(IntEnum):
    """Mapping behaviour a node measured for itself (RFC 5780 terms)."""

    UNKNOWN = 0
    NONE = 1
    ENDPOINT_INDEPENDENT = 2
    ADDRESS_DEPENDENT = 3
    ADDRESS_AND_PORT_DEPENDENT = 4


class NatFiltering(IntEnum):
    """Filtering behaviour a node measured for itself (RFC 5780 terms)."""

    UNKNOWN = 0
    ENDPOINT_INDEPENDENT = 1
    ADDRESS_DEPENDENT = 2
    ADDRESS_AND_PORT_DEPENDENT = 3


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A UDP endpoint a member can be reached on; ``host`` is an IPv4 or IPv6 literal."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class NatInfo:
    """What a member learned about the NAT in front of it; gossiped inside its record."""

    mapping: NatMapping = NatMapping.UNKNOWN
    filtering: NatFiltering = NatFiltering.UNKNOWN
    hairpinning: bool = False
    allows_relay: bool = False


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """A member's signed statement about itself.

    ``signature`` is Ed25519 by ``public_key`` over ``codec.record_signing_bytes(record)``.
    A higher ``incarnation`` supersedes a lower one; ``timestamp`` is informational.
    """

    public_key: bytes
    incarnation: int
    status: RecordStatus
    endpoints: tuple[Endpoint, ...]
    nat: NatInfo
    signature: bytes


@dataclass(frozen=True, slots=True)
class Alive:
    """Gossip: a self-signed record (alive, or a graceful leave when its status is LEFT)."""

    record: MemberRecord


@dataclass(frozen=True, slots=True)
class Suspect:
    """Gossip: ``accuser`` suspects ``member`` at ``incarnation``."""

    member: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True, slots=True)
class Dead:
    """Gossip: ``accuser`` declares ``member`` dead at ``incarnation``."""

    member: bytes
    incarnation: int
    accuser: bytes


Update = Alive | Suspect | Dead
"""One piece of membership gossip, piggybacked on SWIM messages."""


@dataclass(frozen=True, slots=True)
class Ping:
    """SWIM direct probe of ``target`` (the receiver's key, so a stale address is detected)."""

    seq: int
    target: bytes
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a ``Ping``, echoing its ``seq``."""

    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to probe ``target`` at ``target_endpoint`` on the sender's behalf."""

    seq: int
    target: bytes
    target_endpoint: Endpoint
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class IndirectAck:
    """A helper relays back to the prober that ``target`` answered the probe ``seq``."""

    seq: int
    target: bytes
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: a helper tells the prober it is alive but ``target`` did not answer."""

    seq: int
    target: bytes


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One member in a full state exchange: its latest record and how the sender sees it.

    ``suspect_or_dead`` is ``None`` when the sender believes the record, else the accusation.
    """

    record: MemberRecord
    suspect_or_dead: Suspect | Dead | None = None


@dataclass(frozen=True, slots=True)
class StateSync:
    """Push-pull: a chunk of the sender's full membership state.

    Each chunk is self-contained (every record in it is separately verifiable), so chunks
    need no reassembly. ``want_reply`` asks the receiver to send its own state back (join and
    periodic anti-entropy); ``part``/``parts`` number the chunks of one exchange.
    """

    exchange: int
    part: int
    parts: int
    want_reply: bool
    entries: tuple[StateEntry, ...]


@dataclass(frozen=True, slots=True)
class StateDigest:
    """Push-pull's opening: the sender's membership state summarised in buckets.

    Members fall into ``len(buckets)`` buckets (a power of two up to 256) by the first bits of
    their public key; each bucket is the XOR of a 32-bit hash of every member's (record,
    accusation) in it. Two members with the same view have the same buckets, so they send
    each other only the members of buckets that differ, as ``StateSync`` chunks. With
    ``want_reply`` the receiver answers with its own digest for the same ``exchange``.
    """

    exchange: int
    want_reply: bool
    buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PunchRequest:
    """Hole punching rendezvous: ``initiator`` wants a direct path to ``target``.

    Sent initiator → rendezvous member, then forwarded rendezvous → target. ``candidates`` are
    the initiator's endpoints to probe (public mapping first, then LAN addresses).
    """

    session: int
    initiator: bytes
    target: bytes
    candidates: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class PunchResponse:
    """The target's answer to a ``PunchRequest``, routed back through the rendezvous."""

    session: int
    initiator: bytes
    target: bytes
    candidates: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class PunchProbe:
    """A hole-punching probe sent straight to a candidate endpoint; ``reply`` marks the echo."""

    session: int
    seq: int
    reply: bool


@dataclass(frozen=True, slots=True)
class RelayEnvelope:
    """Ciphertext carried through a relay member.

    From the origin to the relay, ``peer`` is the destination; from the relay to the
    destination, ``peer`` is the origin (set by the relay from the authenticated sender).
    ``payload`` is an opaque WireGuard or meshguard datagram the relay cannot read.
    """

    peer: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class EndpointUpdate:
    """A member pushes its new signed record straight to a peer (roaming)."""

    record: MemberRecord


Message = (
    Ping
    | Ack
    | PingReq
    | IndirectAck
    | Nack
    | StateSync
    | StateDigest
    | PunchRequest
    | PunchResponse
    | PunchProbe
    | RelayEnvelope
    | EndpointUpdate
)
"""Every meshguard message that can travel in an authenticated datagram."""
