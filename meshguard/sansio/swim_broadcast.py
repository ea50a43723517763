"""The queue of membership updates waiting to be piggybacked on outgoing datagrams.

SWIM spreads changes by infection: each update rides on a few outgoing messages and every
receiver passes it on. memberlist's ``TransmitLimitedQueue`` is the model: one pending update
per member (a newer one replaces the older, so a refutation never queues behind the
accusation it answers), handed out least-transmitted first and newest first among equals,
and dropped after the retransmit limit.

Entries live in buckets keyed by how often they were sent; inside a bucket dict order is age
(oldest first), so taking updates costs O(updates taken + a few skipped), never a sort of the
whole queue. Updates sent together move to the next bucket keeping their order; updates sent
at different times are ordered there by when they were last sent (close to their age).
"""

from __future__ import annotations

from meshguard.sansio.messages import Update

MAX_SKIPS = 8
"""Updates too large for the remaining room examined before giving up on filling a datagram."""


class TransmitQueue:
    """Pending updates keyed by the member they are about."""

    __slots__ = ("_buckets", "_sent")

    def __init__(self) -> None:
        self._buckets: dict[int, dict[bytes, tuple[Update, int]]] = {}
        self._sent: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._sent)

    def __contains__(self, member: bytes) -> bool:
        return member in self._sent

    def put(self, member: bytes, update: Update, size: int) -> None:
        """Queue ``update`` (encoded ``size`` bytes) about ``member``, replacing any older one."""
        self.discard(member)
        self._buckets.setdefault(0, {})[member] = (update, size)
        self._sent[member] = 0

    def get(self, member: bytes) -> Update | None:
        sent = self._sent.get(member)
        return None if sent is None else self._buckets[sent][member][0]

    def discard(self, member: bytes) -> None:
        sent = self._sent.pop(member, None)
        if sent is not None:
            bucket = self._buckets[sent]
            del bucket[member]
            if not bucket:
                del self._buckets[sent]

    def take(
        self, room: int, limit: int, smallest: int, skip: bytes | None = None
    ) -> list[Update]:
        """Updates totalling at most ``room`` bytes, least sent and newest first.

        Each one handed out counts as one transmission; after ``limit`` it leaves the queue.
        ``smallest`` is the size of the smallest possible update: below it, stop looking.
        The update about ``skip`` is left where it is.
        """
        taken: list[Update] = []
        if room < smallest:
            return taken
        buckets = self._buckets
        chosen: list[tuple[int, bytes, tuple[Update, int]]] = []
        skipped = 0
        for sent in sorted(buckets):
            bucket = buckets[sent]
            for member in reversed(bucket):
                if member == skip:
                    continue
                entry = bucket[member]
                size = entry[1]
                if size <= room:
                    room -= size
                    taken.append(entry[0])
                    chosen.append((sent, member, entry))
                    if room < smallest:
                        break
                else:
                    skipped += 1
                    if skipped > MAX_SKIPS:
                        break
            if room < smallest or skipped > MAX_SKIPS:
                break
        sent_counts = self._sent
        for sent, member, entry in reversed(chosen):
            bucket = buckets[sent]
            del bucket[member]
            if not bucket:
                del buckets[sent]
            if sent + 1 >= limit:
                del sent_counts[member]
            else:
                following = buckets.get(sent + 1)
                if following is None:
                    following = buckets[sent + 1] = {}
                following[member] = entry
                sent_counts[member] = sent + 1
        return taken
