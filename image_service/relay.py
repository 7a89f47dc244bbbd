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
from image_service.protocol.transport import Bus, PublishRejected
from image_service.store import CONNECTION_ERRORS
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
            done: list[int] = []
            try:
                for row in rows:
                    try:
                        await self.bus.publish(
                            row.exchange,
                            row.routing_key,
                            encode(row.body),
                            correlation_id=row.correlation_id,
                            message_id=row.message_id,
                            persistent=row.persistent,
                        )
                    except PublishRejected as exc:
                        if not _is_reply(row):
                            raise
                        # A reply the broker refused by itself (its caller is gone, or never
                        # was): only this reply is lost, nothing waits behind it.
                        log.warning("relay: reply to %s dropped: %s", row.routing_key, exc)
                    done.append(row.id)
            except PublishRejected as exc:
                log.warning("relay: the broker refused a message: %s", exc)
                await tx.outbox.delete(done)
                refused = rows[len(done)]
                if await tx.outbox.rejected(refused.id) >= MAX_REJECTIONS:
                    log.error("relay: dropping undeliverable message to %s", refused.routing_key)
                    await tx.outbox.delete([refused.id])
                await asyncio.sleep(0.5)
                return 0
            except Exception as exc:  # broker trouble: keep the rest for the next round
                log.warning("relay: publish failed, will retry: %r", exc)
                await tx.outbox.delete(done)
                await asyncio.sleep(0.5)
                return 0
            await tx.outbox.delete(done)
            return len(rows)
