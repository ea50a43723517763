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

Each entry carries its own send count, so a take touches only the entries and the two
buckets involved, not a second member-keyed table: with a thousand nodes' queues in memory,
each extra dict store per update handed out was a cache miss.
"""

from __future__ import annotations

from meshguard.sansio.messages import Update

MAX_SKIPS = 8
"""Updates too large for the remaining room examined before giving up on filling a datagram."""


class _Pending:
    """One queued update, its encoded size and how often it was handed out."""

    __slots__ = ("sent", "size", "update")

    def __init__(self, update: Update, size: int) -> None:
        self.update = update
        self.size = size
        self.sent = 0


class TransmitQueue:
    """Pending updates keyed by the member they are about."""

    __slots__ = ("_buckets", "_pending")

    def __init__(self) -> None:
        self._buckets: dict[int, dict[bytes, _Pending]] = {}
        self._pending: dict[bytes, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, member: bytes) -> bool:
        return member in self._pending

    def put(self, member: bytes, update: Update, size: int) -> None:
        """Queue ``update`` (encoded ``size`` bytes) about ``member``, replacing any older one."""
        self.discard(member)
        pending = _Pending(update, size)
        self._buckets.setdefault(0, {})[member] = pending
        self._pending[member] = pending

    def get(self, member: bytes) -> Update | None:
        pending = self._pending.get(member)
        return None if pending is None else pending.update

    def discard(self, member: bytes) -> None:
        pending = self._pending.pop(member, None)
        if pending is not None:
            bucket = self._buckets[pending.sent]
            del bucket[member]
            if not bucket:
                del self._buckets[pending.sent]

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
        chosen_by_bucket: list[tuple[int, dict[bytes, _Pending],
                                     list[tuple[bytes, _Pending]]]] = []
        skipped = 0
        for sent in sorted(buckets):
            bucket = buckets[sent]
            chosen: list[tuple[bytes, _Pending]] = []
            for item in reversed(bucket.items()):
                if item[0] == skip:
                    continue
                pending = item[1]
                size = pending.size
                if size <= room:
                    room -= size
                    taken.append(pending.update)
                    chosen.append(item)
                    if room < smallest:
                        break
                else:
                    skipped += 1
                    if skipped > MAX_SKIPS:
                        break
            if chosen:
                chosen_by_bucket.append((sent, bucket, chosen))
            if room < smallest or skipped > MAX_SKIPS:
                break
        for sent, bucket, chosen in reversed(chosen_by_bucket):
            self._move_on(sent, bucket, chosen, limit)
        return taken

    def _move_on(self, sent: int, bucket: dict[bytes, _Pending],
                 chosen: list[tuple[bytes, _Pending]], limit: int) -> None:
        """Moves ``chosen`` (newest first) from bucket ``sent`` to the end of the next one,
        oldest first, or out of the queue at ``limit``. A bucket taken whole, with no next
        bucket yet, becomes the next one as it is: the same entries in the same order."""
        buckets = self._buckets
        following_sent = sent + 1
        if following_sent >= limit:
            pending_by_member = self._pending
            for member, _ in chosen:
                del bucket[member]
                del pending_by_member[member]
        elif len(chosen) == len(bucket) and following_sent not in buckets:
            del buckets[sent]
            buckets[following_sent] = bucket
            for _, pending in chosen:
                pending.sent = following_sent
            return
        else:
            following = buckets.get(following_sent)
            if following is None:
                following = buckets[following_sent] = {}
            for member, pending in reversed(chosen):
                del bucket[member]
                following[member] = pending
                pending.sent = following_sent
        if not bucket:
            del buckets[sent]
