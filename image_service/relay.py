"""The outbox relay: publishes what committed transactions put in the outbox.

Rows are taken with `FOR UPDATE SKIP LOCKED` and deleted in the transaction that published
them, so each row is published by one replica; a crash between publish and commit publishes it
again (at least once; every receiver is idempotent). A commit wakes the relay at once; a timer
catches rows other replicas left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from image_service.outbox import encode
from image_service.pipeline import Transactions
from image_service.protocol.transport import Bus, PublishRejected, Refused
from image_service.store import CONNECTION_ERRORS, Tx
from image_service.store.rows import OutboxRow

log = logging.getLogger(__name__)

BATCH = 100
# A row the broker refuses this many times (a forged reply-to) is dropped, not retried forever.
MAX_REJECTIONS = 2


def _is_reply(row: OutboxRow) -> bool:
    """Outbox.reply rows: to the default exchange without a message id (commands have one)."""
    return row.exchange == "" and row.message_id is None


class Relay:
    def __init__(self, transactions: Transactions, bus: Bus) -> None:
        self.transactions = transactions
        self.bus = bus

    async def run(self) -> None:
        committed = self.transactions.committed
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(committed.wait(), timeout=0.5)
            committed.clear()
            try:
                await self.publish_all()
            except CONNECTION_ERRORS as exc:
                log.warning("relay: database unavailable: %s", exc)
                await asyncio.sleep(1.0)

    async def publish_all(self) -> None:
        while await self._publish_batch() == BATCH:
            pass

    async def _publish_batch(self) -> int:
        async with self.transactions.store.transaction() as tx:
            rows = await tx.outbox.take(limit=BATCH)
            replies = [row for row in rows if _is_reply(row)]
            others = [row for row in rows if not _is_reply(row)]
            done: list[int] = []
            # Commands and events first, in their order (a reply never overtakes the events
            # of its message).
            try:
                for row in others:
                    await self._publish(row)
                    done.append(row.id)
            except PublishRejected as exc:
                log.warning("relay: the broker refused a message: %s", exc)
                await tx.outbox.delete(done)
                await self._count_refusal(tx, others[len(done)])
                await asyncio.sleep(0.5)
                return 0
            except Exception as exc:  # broker trouble: keep the rest for the next round
                log.warning("relay: publish failed, will retry: %r", exc)
                await tx.outbox.delete(done)
                await asyncio.sleep(0.5)
                return 0
            # Replies are independent of each other: published all at once, so that one whose
            # target the broker refuses (a forged reply-to costs a reconnection) does not hold
            # up the others.
            outcomes = await asyncio.gather(
                *(self._publish_reply(row) for row in replies), return_exceptions=True
            )
            kept = 0
            for row, outcome in zip(replies, outcomes, strict=True):
                if outcome is True:
                    done.append(row.id)
                elif isinstance(outcome, PublishRejected):
                    # Its channel closed under it, maybe for another reply: counted; the one
                    # that is refused again is dropped.
                    kept += not await self._count_refusal(tx, row)
                else:
                    log.warning("relay: publishing a reply failed, will retry: %r", outcome)
                    kept += 1
            await tx.outbox.delete(done)
            if kept:
                await asyncio.sleep(0.5)
                return 0
            return len(rows)

    async def _count_refusal(self, tx: Tx, row: OutboxRow) -> bool:
        """Count one refusal of `row`; True when it was dropped for good."""
        if await tx.outbox.rejected(row.id) >= MAX_REJECTIONS:
            log.error("relay: dropping undeliverable message to %r", row.routing_key[:300])
            await tx.outbox.delete([row.id])
            return True
        return False

    async def _publish(self, row: OutboxRow) -> None:
        await self.bus.publish(
            row.exchange,
            row.routing_key,
            encode(row.body),
            correlation_id=row.correlation_id,
            message_id=row.message_id,
            persistent=row.persistent,
        )

    async def _publish_reply(self, row: OutboxRow) -> bool:
        """True once the reply is published, or dropped because the broker refused this very
        reply (its caller is gone, or never was): only that reply is lost."""
        try:
            await self._publish(row)
        except Refused as exc:
            log.warning("relay: reply to %s dropped: %s", row.routing_key[:300], exc)
        return True
