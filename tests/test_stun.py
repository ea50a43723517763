"""STUN codec, client and responder: RFC 5769 known answers, properties, explicit-time client."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshguard import netcheck
from meshguard.drivers.stun_socket import UsageError, parse_host_port
from meshguard.sansio import stun
from meshguard.sansio.errors import DecodeError, LocalProtocolError
from meshguard.sansio.stun import (
    ErrorCode,
    MappedAddress,
    MessageClass,
    PublicAddressChanged,
    StunClient,
    StunErrorResponse,
    StunMessage,
    StunResponder,
    StunTimeout,
    StunTiming,
)


def hex_bytes(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


# RFC 5769 §2.1–2.3 (SOFTWARE/USERNAME padding there is 0x20 on purpose).
RFC5769_REQUEST = hex_bytes(
    """00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf"""
)
RFC5769_IPV4_RESPONSE = hex_bytes(
    """01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96"""
)
RFC5769_IPV6_RESPONSE = hex_bytes(
    """01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c"""
)
RFC5769_TRANSACTION_ID = hex_bytes("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
VECTORS = (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE)

SERVER = ("203.0.113.10", 3478)
OTHER_SERVER = ("203.0.113.20", 3478)


def counting_entropy() -> stun.Entropy:
    """Distinct, predictable transaction IDs: 1, 2, 3, … as 12-byte big-endian numbers."""
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


# ------------------------------------------------------------------ RFC 5769 known answers


def test_rfc5769_request_decodes_with_its_fingerprint_and_unknown_attributes() -> None:
    message = stun.decode(RFC5769_REQUEST)
    assert message.message_class is MessageClass.REQUEST
    assert message.method == stun.BINDING
    assert message.transaction_id == RFC5769_TRANSACTION_ID
    assert message.software == "STUN test client"
    assert message.fingerprint
    assert [t for t, _ in message.other_attributes] == [0x0024, 0x8029, 0x0006, 0x0008]
    assert dict(message.other_attributes)[0x0006] == b"evtj:h6vY"
    assert stun.comprehension_required_unknown(message) == (0x0024, 0x0006, 0x0008)


def test_rfc5769_ipv4_response_gives_its_xor_mapped_address() -> None:
    message = stun.decode(RFC5769_IPV4_RESPONSE)
    assert message.message_class is MessageClass.SUCCESS
    assert message.xor_mapped_address == ("192.0.2.1", 32853)
    assert message.mapped_address is None
    assert message.software == "test vector"
    assert message.fingerprint


def test_rfc5769_ipv6_response_gives_its_xor_mapped_address() -> None:
    message = stun.decode(RFC5769_IPV6_RESPONSE)
    assert message.xor_mapped_address == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert message.fingerprint


@pytest.mark.parametrize(
    ("address", "attribute"),
    [
        (("192.0.2.1", 32853), "00 20 00 08 00 01 a1 47 e1 12 a6 43"),
        (
            ("2001:db8:1234:5678:11:2233:4455:6677", 32853),
            "00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9",
        ),
    ],
)
def test_xor_mapped_address_encodes_to_the_rfc5769_bytes(
    address: tuple[str, int], attribute: str
) -> None:
    message = StunMessage(
        MessageClass.SUCCESS, RFC5769_TRANSACTION_ID, xor_mapped_address=address, fingerprint=False
    )
    assert stun.encode(message)[20:] == hex_bytes(attribute)


@pytest.mark.parametrize("vector", VECTORS)
def test_fingerprint_function_matches_the_rfc5769_values(vector: bytes) -> None:
    assert stun.fingerprint_of(vector[:-8]).to_bytes(4, "big") == vector[-4:]


@pytest.mark.parametrize("vector", VECTORS)
def test_every_single_byte_corruption_of_a_vector_is_caught(vector: bytes) -> None:
    fingerprint_type = range(len(vector) - 8, len(vector) - 6)
    for position in range(len(vector)):
        corrupted = bytearray(vector)
        corrupted[position] ^= 0x01
        if position in fingerprint_type:
            # No longer a FINGERPRINT but an unknown optional attribute: nothing vouched for.
            assert not stun.decode(bytes(corrupted)).fingerprint
            continue
        with pytest.raises(DecodeError):
            stun.decode(bytes(corrupted))


@pytest.mark.parametrize("vector", VECTORS)
def test_vectors_survive_a_reencode(vector: bytes) -> None:
    message = stun.decode(vector)
    again = stun.decode(stun.encode(message))
    assert again == message


def test_encoded_header_and_fingerprint_layout() -> None:
    data = stun.encode(StunMessage(MessageClass.REQUEST, bytes(12)))
    assert data == hex_bytes("00 01 00 08 21 12 a4 42") + bytes(12) + hex_bytes(
        "80 28 00 04"
    ) + stun.fingerprint_of(data[:-8]).to_bytes(4, "big")
    assert stun.is_stun(data)
    assert stun.transaction_id_of(data) == bytes(12)


def test_message_type_bits_of_each_class() -> None:
    types = {c: stun.encode(StunMessage(c, bytes(12), fingerprint=False))[:2] for c in MessageClass}
    assert types == {
        MessageClass.REQUEST: b"\x00\x01",
        MessageClass.INDICATION: b"\x00\x11",
        MessageClass.SUCCESS: b"\x01\x01",
        MessageClass.ERROR: b"\x01\x11",
    }


# ------------------------------------------------------------------ malformed input


def _raw(attributes: bytes, message_type: int = 0x0101) -> bytes:
    return (
        message_type.to_bytes(2, "big")
        + len(attributes).to_bytes(2, "big")
        + stun.MAGIC_COOKIE_BYTES
        + bytes(12)
        + attributes
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 19,
        _raw(b"")[:4] + b"\x00\x00\x00\x00" + bytes(12),  # no magic cookie
        b"\xc0" + _raw(b"")[1:],  # top bits set
        _raw(b"\x00\x20\x00\x08\x00\x03\x00\x01\x01\x02\x03\x04"),  # unknown family
        _raw(b"\x00\x20\x00\x08\x00\x01\x00\x01\x01\x02\x03"),  # length not multiple of 4
        _raw(b"\x00\x20\x00\x0c\x00\x01\x00\x01\x01\x02\x03\x04"),  # runs past the end
        _raw(b"\x00\x20\x00\x06\x00\x01\x00\x01\x01\x02\x00\x00"),  # IPv4 address too short
        _raw(b"\x80\x22\x00\x02\xff\xfe\x00\x00"),  # SOFTWARE not UTF-8
        _raw(b"\x00\x09\x00\x04\x00\x00\x07\x00"),  # ERROR-CODE class 7
        _raw(b"\x00\x03\x00\x02\x00\x00\x00\x00"),  # CHANGE-REQUEST of 2 bytes
        _raw(b"\x80\x28\x00\x04\x00\x00\x00\x00"),  # wrong FINGERPRINT
    ],
)
def test_malformed_messages_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        stun.decode(data)


def test_attribute_after_fingerprint_is_rejected() -> None:
    valid = stun.encode(StunMessage(MessageClass.SUCCESS, bytes(12), software="x"))
    extra = b"\x80\x22\x00\x01y\x00\x00\x00"
    data = valid[:2] + (len(valid) - 20 + len(extra)).to_bytes(2, "big") + valid[4:] + extra
    with pytest.raises(DecodeError):
        stun.decode(data)


def test_padding_bytes_of_any_value_are_accepted_and_first_duplicate_wins() -> None:
    attributes = b"\x80\x22\x00\x01a\xff\xff\xff" + b"\x80\x22\x00\x01b\x00\x00\x00"
    assert stun.decode(_raw(attributes)).software == "a"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        message = stun.decode(data)
    except DecodeError:
        return
    assert isinstance(message, StunMessage)


@given(st.binary(max_size=120).map(lambda body: body[: len(body) - len(body) % 4]))
def test_arbitrary_attribute_bytes_behind_a_valid_header_decode_or_raise(body: bytes) -> None:
    with contextlib.suppress(DecodeError):
        stun.decode(_raw(body))


# ------------------------------------------------------------------ round trips


def _canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None)


addresses = st.tuples(
    st.ip_addresses().filter(_canonical).map(str), st.integers(min_value=0, max_value=65535)
)
optional_addresses = st.none() | addresses
other_attribute_types = st.integers(min_value=0, max_value=0xFFFF).filter(
    lambda t: t not in stun._TYPED_ATTRIBUTES
)


@st.composite
def messages(draw: st.DrawFn) -> StunMessage:
    change_request = draw(st.booleans())
    return StunMessage(
        message_class=draw(st.sampled_from(MessageClass)),
        transaction_id=draw(st.binary(min_size=12, max_size=12)),
        method=draw(st.integers(min_value=0, max_value=0xFFF)),
        xor_mapped_address=draw(optional_addresses),
        mapped_address=draw(optional_addresses),
        response_origin=draw(optional_addresses),
        other_address=draw(optional_addresses),
        change_request=change_request,
        change_ip=change_request and draw(st.booleans()),
        change_port=change_request and draw(st.booleans()),
        error=draw(
            st.none()
            | st.builds(
                ErrorCode,
                st.integers(min_value=300, max_value=699),
                st.text(max_size=40),
            )
        ),
        unknown_attributes=tuple(draw(st.lists(st.integers(0, 0xFFFF), max_size=4))),
        software=draw(st.none() | st.text(max_size=40)),
        other_attributes=tuple(
            draw(st.lists(st.tuples(other_attribute_types, st.binary(max_size=30)), max_size=4))
        ),
        fingerprint=draw(st.booleans()),
    )


@given(messages())
def test_encode_then_decode_gives_the_same_message(message: StunMessage) -> None:
    data = stun.encode(message)
    assert len(data) % 4 == 0
    assert stun.decode(data) == message


def test_ipv4_mapped_ipv6_addresses_are_encoded_as_ipv4() -> None:
    message = StunMessage(MessageClass.SUCCESS, bytes(12), xor_mapped_address=("::ffff:1.2.3.4", 9))
    assert stun.decode(stun.encode(message)).xor_mapped_address == ("1.2.3.4", 9)


@pytest.mark.parametrize(
    "message",
    [
        StunMessage(MessageClass.REQUEST, bytes(11)),
        StunMessage(MessageClass.REQUEST, bytes(12), mapped_address=("not-an-ip", 1)),
        StunMessage(MessageClass.REQUEST, bytes(12), mapped_address=("1.2.3.4", 70000)),
        StunMessage(MessageClass.REQUEST, bytes(12), change_ip=True),
        StunMessage(MessageClass.ERROR, bytes(12), error=ErrorCode(200)),
        StunMessage(MessageClass.REQUEST, bytes(12), other_attributes=((0x8028, b"1234"),)),
        StunMessage(MessageClass.ERROR, bytes(12), unknown_attributes=(0x10000,)),
    ],
)
def test_encoding_nonsense_is_caller_misuse(message: StunMessage) -> None:
    with pytest.raises(LocalProtocolError):
        stun.encode(message)


# ------------------------------------------------------------------ responder


def test_responder_answers_a_binding_request_with_both_mapped_addresses() -> None:
    responder = StunResponder(software="meshguard test")
    request = stun.encode(StunMessage(MessageClass.REQUEST, b"T" * 12))
    response = stun.decode(responder.answer(request, ("198.51.100.7", 40000)) or b"")
    assert response.message_class is MessageClass.SUCCESS
    assert response.transaction_id == b"T" * 12
    assert response.xor_mapped_address == ("198.51.100.7", 40000)
    assert response.mapped_address == ("198.51.100.7", 40000)
    assert response.software == "meshguard test"
    assert response.fingerprint
    assert (responder.answered, responder.dropped) == (1, 0)


def test_responder_answers_ipv6_sources() -> None:
    request = stun.encode(StunMessage(MessageClass.REQUEST, b"6" * 12, fingerprint=False))
    answer = StunResponder().answer(request, ("2001:db8::5", 51821))
    assert stun.decode(answer or b"").xor_mapped_address == ("2001:db8::5", 51821)


@pytest.mark.parametrize(
    "data",
    [
        RFC5769_IPV4_RESPONSE,
        stun.encode(StunMessage(MessageClass.INDICATION, bytes(12))),
        stun.encode(StunMessage(MessageClass.REQUEST, bytes(12), method=0x003)),
        b"\x01\x00\x00\x00" + bytes(40),
        b"",
    ],
)
def test_responder_drops_everything_but_binding_requests(data: bytes) -> None:
    responder = StunResponder()
    assert responder.answer(data, SERVER) is None
    assert (responder.answered, responder.dropped) == (0, 1)


def test_responder_refuses_change_request_and_unknown_attributes_with_420() -> None:
    responder = StunResponder()
    change = stun.encode(
        StunMessage(MessageClass.REQUEST, bytes(12), change_request=True, change_ip=True)
    )
    answer = stun.decode(responder.answer(change, SERVER) or b"")
    assert answer.message_class is MessageClass.ERROR
    assert answer.error == ErrorCode(420, "Unknown Attribute")
    assert answer.unknown_attributes == (stun.ATTR_CHANGE_REQUEST,)
    ice = stun.decode(responder.answer(RFC5769_REQUEST, SERVER) or b"")
    assert ice.unknown_attributes == (0x0024, 0x0006, 0x0008)


# ------------------------------------------------------------------ client


def test_client_retransmits_on_the_rfc_schedule_then_times_out() -> None:
    client = StunClient(counting_entropy())
    transaction_id = client.query(SERVER, now=100.0)
    sent = client.datagrams_to_send()
    assert len(sent) == 1 and sent[0][1] == SERVER
    send_times = [100.0]
    while (deadline := client.next_deadline()) is not None and not client.events():
        client.on_timer(deadline - 0.001)  # early: harmless
        assert client.datagrams_to_send() == []
        client.on_timer(deadline)
        again = client.datagrams_to_send()
        if again:
            assert again == sent
            send_times.append(deadline)
        else:
            break
    assert [round(t - 100.0, 6) for t in send_times] == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert client.events() == [StunTimeout(transaction_id, SERVER)]
    assert round(deadline - 100.0, 6) == 39.5 == StunTiming().give_up_after()
    assert client.next_deadline() is None


def test_client_schedule_is_configurable() -> None:
    timing = StunTiming(rto=0.1, transmissions=3, last_wait_factor=4)
    client = StunClient(counting_entropy(), timing)
    client.query(SERVER, now=0.0)
    times = [0.0]
    timed_out_at = None
    while (deadline := client.next_deadline()) is not None:
        client.on_timer(deadline)
        if client.datagrams_to_send():
            times.append(deadline)
        if client.events():
            timed_out_at = deadline
    assert [round(t, 6) for t in times] == [0.0, 0.1, 0.3]
    assert timed_out_at == pytest.approx(0.7) == timing.give_up_after()


def test_client_timing_rejects_nonsense() -> None:
    with pytest.raises(LocalProtocolError):
        StunTiming(rto=0)
    with pytest.raises(LocalProtocolError):
        StunTiming(transmissions=0)


def _answer_to(request: bytes, **fields: object) -> bytes:
    transaction_id = stun.decode(request).transaction_id
    return stun.encode(StunMessage(MessageClass.SUCCESS, transaction_id, **fields))  # type: ignore[arg-type]


def test_client_matches_the_response_and_stops_retransmitting() -> None:
    client = StunClient(counting_entropy())
    transaction_id = client.query(SERVER, now=0.0)
    [(request, _)] = client.datagrams_to_send()
    response = StunResponder().answer(request, ("192.0.2.50", 1234)) or b""
    assert client.matches(response)
    client.receive_datagram(response, SERVER, now=0.2)
    assert client.events() == [
        MappedAddress(transaction_id, SERVER, ("192.0.2.50", 1234), True, SERVER)
    ]
    assert client.next_deadline() is None
    client.receive_datagram(response, SERVER, now=0.3)  # a duplicate answer
    assert client.events() == []
    assert client.dropped_unmatched == 1


def test_client_drops_and_counts_a_response_to_another_transaction() -> None:
    client = StunClient(counting_entropy())
    client.query(SERVER, now=0.0)
    [(request, _)] = client.datagrams_to_send()
    stranger = stun.encode(
        StunMessage(MessageClass.SUCCESS, b"\xee" * 12, xor_mapped_address=("192.0.2.66", 6))
    )
    assert not client.matches(stranger)
    client.receive_datagram(stranger, SERVER, now=0.1)
    client.receive_datagram(request, SERVER, now=0.1)  # our own request reflected back
    assert client.events() == []
    assert client.dropped_unmatched == 2
    assert client.next_deadline() == 0.5


def test_client_falls_back_to_mapped_address_and_reports_rfc5780_attributes() -> None:
    client = StunClient(counting_entropy())
    transaction_id = client.query(SERVER, now=0.0)
    [(request, _)] = client.datagrams_to_send()
    reply = _answer_to(
        request,
        mapped_address=("192.0.2.9", 9),
        other_address=("203.0.113.11", 3479),
        response_origin=SERVER,
    )
    client.receive_datagram(reply, SERVER, now=0.1)
    assert client.events() == [
        MappedAddress(
            transaction_id,
            SERVER,
            ("192.0.2.9", 9),
            via_xor=False,
            source=SERVER,
            other_address=("203.0.113.11", 3479),
            response_origin=SERVER,
        )
    ]


def test_client_reports_error_responses() -> None:
    client = StunClient(counting_entropy())
    transaction_id = client.query(SERVER, now=0.0, change_ip=True, change_port=True)
    [(request, _)] = client.datagrams_to_send()
    assert stun.decode(request).change_ip and stun.decode(request).change_port
    reply = StunResponder().answer(request, ("192.0.2.9", 9)) or b""
    client.receive_datagram(reply, SERVER, now=0.1)
    assert client.events() == [
        StunErrorResponse(
            transaction_id,
            SERVER,
            ErrorCode(420, "Unknown Attribute"),
            (stun.ATTR_CHANGE_REQUEST,),
        )
    ]


def test_client_drops_success_without_an_address_and_garbage() -> None:
    client = StunClient(counting_entropy())
    client.query(SERVER, now=0.0)
    [(request, _)] = client.datagrams_to_send()
    client.receive_datagram(_answer_to(request), SERVER, now=0.1)
    client.receive_datagram(b"\x00\x01garbage", SERVER, now=0.1)
    assert client.events() == []
    assert client.dropped_malformed == 2
    assert client.next_deadline() == 0.5


def test_monitored_server_is_refreshed_and_a_changed_address_is_reported() -> None:
    timing = StunTiming(refresh_interval=30.0)
    client = StunClient(counting_entropy(), timing)
    responder = StunResponder()
    client.monitor(SERVER, now=0.0)
    [(first, _)] = client.datagrams_to_send()
    client.receive_datagram(responder.answer(first, ("192.0.2.1", 1000)) or b"", SERVER, 0.1)
    assert [type(e) for e in client.events()] == [MappedAddress]
    assert client.public_address(SERVER) == ("192.0.2.1", 1000)
    assert client.next_deadline() == pytest.approx(30.1)
    client.on_timer(30.1)
    [(second, _)] = client.datagrams_to_send()
    assert stun.decode(second).transaction_id != stun.decode(first).transaction_id
    client.receive_datagram(responder.answer(second, ("192.0.2.1", 1000)) or b"", SERVER, 30.2)
    assert [type(e) for e in client.events()] == [MappedAddress]
    client.on_timer(60.2)
    [(third, _)] = client.datagrams_to_send()
    client.receive_datagram(responder.answer(third, ("192.0.2.2", 2000)) or b"", SERVER, 60.3)
    events = client.events()
    assert events[1:] == [PublicAddressChanged(SERVER, ("192.0.2.1", 1000), ("192.0.2.2", 2000))]
    assert client.public_address(SERVER) == ("192.0.2.2", 2000)


def test_monitored_server_is_asked_again_after_a_timeout() -> None:
    timing = StunTiming(rto=1.0, transmissions=1, last_wait_factor=2, refresh_interval=10.0)
    client = StunClient(counting_entropy(), timing)
    client.monitor(OTHER_SERVER, now=0.0)
    client.datagrams_to_send()
    client.on_timer(2.0)
    assert [type(e) for e in client.events()] == [StunTimeout]
    assert client.next_deadline() == 12.0
    client.on_timer(12.0)
    assert [addr for _, addr in client.datagrams_to_send()] == [OTHER_SERVER]
    with pytest.raises(LocalProtocolError):
        client.monitor(OTHER_SERVER, now=12.0)


def test_client_rejects_bad_entropy() -> None:
    with pytest.raises(LocalProtocolError):
        StunClient(lambda n: b"short").query(SERVER, 0.0)
    with pytest.raises(LocalProtocolError):
        client = StunClient(lambda n: bytes(n))
        client.query(SERVER, 0.0)
        client.query(SERVER, 0.0)


@given(st.binary(max_size=120), st.booleans())
def test_client_never_raises_on_network_bytes(data: bytes, as_reply: bool) -> None:
    client = StunClient(counting_entropy())
    client.query(SERVER, now=0.0)
    if as_reply and len(data) >= 20:
        # Aim at the outstanding transaction so the bytes reach the deeper checks.
        data = data[:4] + stun.MAGIC_COOKIE_BYTES + (1).to_bytes(12, "big") + data[20:]
    client.receive_datagram(data, SERVER, now=0.1)
    assert client.dropped_malformed + client.dropped_unmatched + len(client.events()) == 1


def test_events_are_frozen_dataclasses() -> None:
    event = StunTimeout(bytes(12), SERVER)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.server = OTHER_SERVER  # type: ignore[misc]


# ------------------------------------------------------------------ command-line input


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.10:3478", ("203.0.113.10", 3478)),
        ("[2001:db8::1]:3478", ("2001:db8::1", 3478)),
        ("stun.example.org", ("stun.example.org", 3478)),
        ("2001:db8::1", ("2001:db8::1", 3478)),
    ],
)
def test_host_port_parsing(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text, default_port=3478) == expected


@pytest.mark.parametrize("text", ["1.2.3.4:99999", "1.2.3.4:x", "[::1", "[::1]x", ":3478"])
def test_bad_host_port_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_host_port(text, default_port=3478)


@pytest.mark.parametrize(
    "argv",
    [
        ["--stun", "127.0.0.1:99999"],
        ["--stun", "127.0.0.1:3478", "--rto", "0"],
        ["--stun", "127.0.0.1:3478", "--port", "70000"],
    ],
)
def test_netcheck_rejects_bad_input_in_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert netcheck.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("meshguard: error: ") and captured.err.count("\n") == 1


# ------------------------------------------------------------------ stateful


class StunClientMachine(RuleBasedStateMachine):
    """Queries, answers delivered late, twice, out of order or never, and time passing.

    Invariants: every query ends in exactly one result event, before its give-up time (plus
    the lateness of the last timer call); the client never asks for a deadline in the past.
    """

    def __init__(self) -> None:
        super().__init__()
        self.timing = StunTiming(rto=0.1, transmissions=3, last_wait_factor=4)
        self.client = StunClient(counting_entropy(), self.timing)
        self.responder = StunResponder()
        self.now = 0.0
        self.started: dict[bytes, float] = {}
        self.finished: dict[bytes, float] = {}
        self.in_flight: list[bytes] = []

    def _collect(self) -> None:
        self.in_flight += [data for data, _ in self.client.datagrams_to_send()]
        for event in self.client.events():
            assert isinstance(event, MappedAddress | StunTimeout | StunErrorResponse)
            assert event.transaction_id not in self.finished, "two results for one query"
            self.finished[event.transaction_id] = self.now

    @rule(change=st.booleans())
    def query(self, change: bool) -> None:
        transaction_id = self.client.query(SERVER, self.now, change_ip=change)
        self.started[transaction_id] = self.now
        self._collect()

    @rule(data=st.data(), twice=st.booleans())
    def deliver_answer(self, data: st.DataObject, twice: bool) -> None:
        if not self.in_flight:
            return
        request = self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))
        answer = self.responder.answer(request, ("192.0.2.1", 4242)) or b""
        for _ in range(2 if twice else 1):
            self.client.receive_datagram(answer, SERVER, self.now)
        self._collect()

    @rule(data=st.data())
    def lose_datagram(self, data: st.DataObject) -> None:
        if self.in_flight:
            self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))

    @rule(garbage=st.binary(max_size=60))
    def receive_garbage(self, garbage: bytes) -> None:
        self.client.receive_datagram(garbage, SERVER, self.now)
        self._collect()

    @rule(lateness=st.floats(0, 0.05))
    def advance_to_deadline(self, lateness: float) -> None:
        deadline = self.client.next_deadline()
        if deadline is not None:
            self.now = max(self.now, deadline + lateness)
            self.client.on_timer(self.now)
            self._collect()

    @invariant()
    def deadline_is_not_in_the_past(self) -> None:
        deadline = self.client.next_deadline()
        assert deadline is None or deadline > self.now

    @invariant()
    def every_query_ends_in_time(self) -> None:
        limit = self.timing.give_up_after() + 0.05 * (self.timing.transmissions + 1)
        for transaction_id, started in self.started.items():
            ended = self.finished.get(transaction_id, self.now)
            assert ended - started <= limit + 1e-9

    def teardown(self) -> None:
        while (deadline := self.client.next_deadline()) is not None:
            self.now = max(self.now, deadline)
            self.client.on_timer(self.now)
            self._collect()
        assert set(self.finished) == set(self.started)


StunClientMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40)
TestStunClientMachine = StunClientMachine.TestCase
