"""WireGuard's protocol constants (whitepaper §6, wireguard-go device/constants.go)."""

from __future__ import annotations

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX_MS = 334
"""Jitter added to REKEY_TIMEOUT is a whole number of milliseconds in [0, 334)."""
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
"""Retransmissions before giving up: REKEY_ATTEMPT_TIME worth of REKEY_TIMEOUTs."""
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 1.0 / 50
"""Minimum spacing between two initiations accepted from one peer (flood protection)."""
UNDER_LOAD_AFTER_TIME = 1.0
"""How long the device stays "under load" after load was last detected."""
ZERO_KEY_MATERIAL_AFTER = REJECT_AFTER_TIME * 3
"""Session keys are erased this long after the last session was derived."""
NEW_HANDSHAKE_AFTER = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
"""Sent data unanswered this long means the session is dead: start a handshake."""
LAST_MINUTE_HANDSHAKE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
"""An initiator receiving on a session this old rekeys before the session dies."""

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TAG_SIZE = 16
KEEPALIVE_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE
PADDING_MULTIPLE = 16
