"""The expunger: removes Deleted references `expungePeriod` seconds after their deletion,
while the deletion policy is not Never (contract section 10).

Every replica runs it. A round locks the images concerned without waiting (SKIP LOCKED, in
uuid order) and claims each due reference with one guarded statement (`ref_op IS NULL`), so
each is expunged once whichever replica gets there; the claim, the delete op and its command
commit together, and the reference goes when the agent confirms (operations.apply_result). A
replica killed after its commit leaves the op to the reconciler and the command to any
replica's relay; one killed before leaves nothing, and the next round claims the reference.

Between rounds it sleeps until the next reference is due, or until woken: a NOTIFY says a
reference turned Deleted or an option changed (`Store.listen`), so a shorter period or a
switch from Never applies at once, not at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from image_service.deletion import start_expunge
from image_service.globalconfig import DeletionPolicy, deletion_policy, expunge_period
from image_service.lifecycle import RefStatus
from image_service.pipeline import Transactions
from image_service.protocol.transport import RetryLater

log = logging.getLogger(__name__)

BATCH = 100
# The longest sleep: a safety net should a NOTIFY be missed (it is not a poll of the options,
# which are read in every round's transaction).
MAX_SLEEP = 60.0
# A due reference whose image another transaction holds is tried again this soon.
BUSY_RETRY = 0.5
RETRY_AFTER_FAILURE = 5.0


class Expunger:
    def __init__(self, transactions: Transactions) -> None:
        self.transactions = transactions
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self.expunge_due()
            except RetryLater as exc:
                log.warning("expunger: %s", exc)
                delay = RETRY_AFTER_FAILURE
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def expunge_due(self) -> float:
        """One round; returns the seconds until the next one is due."""
        async with self.transactions.open() as ctx:
            if await deletion_policy(ctx.tx) is DeletionPolicy.Never:
                return MAX_SLEEP
            period = float(await expunge_period(ctx.tx))
            due = await ctx.tx.images.due_for_expunge(period=period, limit=BATCH)
            started = 0
            for image_uuid in await ctx.tx.images.try_lock_many(due):
                for ref in await ctx.tx.images.refs(image_uuid):
                    if ref.status is RefStatus.Deleted and ref.ref_op is None:
                        started += await start_expunge(
                            ctx,
                            image_uuid,
                            ref.backup_storage_uuid,
                            message_id=None,
                            min_age=period,
                        )
            next_in = await ctx.tx.images.next_expunge_in(period=period)
        if started:
            log.info("expunging %d Deleted image references (expungePeriod %g s)", started, period)
        if len(due) == BATCH and started:
            return 0.0  # there may be more
        if next_in is None:
            return MAX_SLEEP
        return min(MAX_SLEEP, max(BUSY_RETRY, next_in))
