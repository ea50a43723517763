"""The two kinds of failure in the core (after h11's Local vs Remote protocol errors)."""


class LocalProtocolError(Exception):
    """The caller (a driver or the simulator) misused a machine: a programming error."""


class DecodeError(ValueError):
    """Bytes from the network are not a valid message.

    This is the one error the codec raises for bad input. Machines catch it, count the
    datagram as dropped and carry on: bytes from the network never take a node down.
    """
