"""Download slots that a slow source cannot hog (contract section 9).

`--max-downloads` bounds the transfers that run at full speed, because each one costs disk
bandwidth, hashing and memory. A source that drips bytes costs none of that, yet with plain
semaphore slots four drip-fed sources held every slot and a healthy image waited minutes.

So a download first connects and reads the head of its image (64 KiB, which the format
inspector needs anyway) outside the slots, and claims a slot only to stream the rest: a drip
feed never gets that far quickly, so it never takes a slot from a healthy source. A slot holder
that has moved less than `--min-throughput` during its last second, while another download
waits, gives its slot to that one and goes on outside the slots: its source keeps its
connection and may still finish (the `--min-throughput` average over a window judges it in
transfer.py), but it queues for a slot again as soon as it is fast again, so pausing once wins
a source no full-speed transfer outside the slots. Outside the slots is bounded too
(`overflow` downloads at most), so a flood of slow sources queues instead of opening sockets
without end. What follows a transfer (qemu-img info and check) and template creations hold
their slot to the end: their cost is qemu-img's, not a network's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

YIELD_AFTER = 1.0
TICK = 0.25


@dataclass(eq=False, slots=True)
class Ticket:
    """One download's place: the bytes it has moved, whether it has claimed a slot (once)
    and whether it holds it now."""

    slots: Slots
    preemptible: bool
    moved: int = 0
    claimed: bool = False
    holding: bool = False
    mark_time: float = field(default_factory=time.monotonic)
    mark_moved: int = 0

    def add(self, count: int) -> None:
        self.moved += count

    async def claim(self) -> bool:
        """Wait for a slot, the first time only (True when it had to wait)."""
        if self.claimed:
            return False
        self.claimed = True
        return await self.slots._acquire(self)

    async def keep_pace(self) -> bool:
        """A download that lost its slot for being slow queues for one again as soon as it has
        moved a second's worth of `--min-throughput` since: a source cannot win full speed
        outside the slots by pausing once (True when it had to wait)."""
        if not self.claimed or self.holding or not self.preemptible:
            return False
        if self.moved - self.mark_moved < self.slots.min_throughput * YIELD_AFTER:
            return False
        return await self.slots._acquire(self)

    async def hold(self) -> bool:
        """Keep (or get back) a slot to the end: what follows the transfer (qemu-img) costs CPU
        and disk, not a network's time (True when it had to wait)."""
        self.preemptible = False
        self.claimed = True
        if self.holding:
            return False
        return await self.slots._acquire(self)

    def restart_mark(self, now: float) -> None:
        self.mark_time, self.mark_moved = now, self.moved


class Slots:
    def __init__(self, size: int, min_throughput: int, *, overflow: int | None = None) -> None:
        self.min_throughput = min_throughput
        self._free = size
        self._waiters: deque[tuple[asyncio.Future[None], Ticket]] = deque()
        self._holders: set[Ticket] = set()
        self._lanes = asyncio.Semaphore(overflow if overflow is not None else size * 8)
        self._monitor: asyncio.Task[None] | None = None

    @property
    def holders(self) -> int:
        return len(self._holders)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def download(self) -> AsyncIterator[Ticket]:
        """A place for a transfer, which claims its slot with `Ticket.claim` once it has read
        its head; it may lose the slot (not the transfer) when it is slow."""
        async with self._lanes:
            ticket = Ticket(self, preemptible=True)
            try:
                yield ticket
            finally:
                self._release(ticket)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Ticket]:
        """A slot held to the end (template creation)."""
        async with self._lanes:
            ticket = Ticket(self, preemptible=False)
            await ticket.claim()
            try:
                yield ticket
            finally:
                self._release(ticket)

    async def _acquire(self, ticket: Ticket) -> bool:
        """A slot for `ticket`; True when it had to wait for it."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self._grant(ticket)
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((future, ticket))
        self._watch()
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self._release(ticket)  # granted just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((future, ticket))
            raise
        return True

    def _grant(self, ticket: Ticket) -> None:
        ticket.holding = True
        ticket.restart_mark(time.monotonic())
        self._holders.add(ticket)

    def _release(self, ticket: Ticket) -> None:
        if not ticket.holding:
            return
        ticket.holding = False
        self._holders.discard(ticket)
        while self._waiters:
            future, waiter = self._waiters.popleft()
            if not future.done():
                self._grant(waiter)
                future.set_result(None)
                return
        self._free += 1

    def _watch(self) -> None:
        if self._monitor is None or self._monitor.done():
            self._monitor = asyncio.create_task(self._preempt_slow_holders())

    async def _preempt_slow_holders(self) -> None:
        while self._waiters:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for ticket in list(self._holders):
                if not self._waiters:
                    break
                if not ticket.preemptible or now - ticket.mark_time < YIELD_AFTER:
                    continue
                rate = (ticket.moved - ticket.mark_moved) / (now - ticket.mark_time)
                if rate < self.min_throughput:
                    self._release(ticket)  # the transfer goes on, outside the slots
                ticket.restart_mark(now)  # the next second is judged (or keep_pace counts) anew
