"""Forgetting what is no longer needed: replies kept for duplicates and finished ops, once
older than the retention (7 days by default, PROTOCOL.md A.7), and expired portal sessions."""

from __future__ import annotations

import asyncio
import logging

from image_service.pipeline import Transactions
from image_service.protocol.transport import RetryLater

log = logging.getLogger(__name__)

# A run of failed logins is forgotten a day after its last failure (once no lock holds).
LOGIN_FAILURES_KEPT = 24 * 3600.0


class Pruner:
    def __init__(self, transactions: Transactions, *, retention: float, every: float) -> None:
        self.transactions = transactions
        self.retention = retention
        self.every = every

    async def run(self) -> None:
        while True:
            try:
                await self.prune()
            except RetryLater as exc:
                log.warning("pruning: %s", exc)
            await asyncio.sleep(self.every)

    async def prune(self) -> None:
        async with self.transactions.open() as ctx:
            await ctx.tx.inbox.prune(older_than=self.retention)
            await ctx.tx.ops.prune(older_than=self.retention)
            await ctx.tx.accounts.prune_sessions()
            await ctx.tx.accounts.prune_failures(older_than=LOGIN_FAILURES_KEPT)
