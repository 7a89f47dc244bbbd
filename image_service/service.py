"""One replica of the image service: wires the store and the bus to the parts that do the work.

`pipeline` runs API messages, `agent_inputs` results and heartbeats, `volume_events` the
volume read model; `relay`, `monitor`, `pruning` and `expunger` are background loops, each safe to run in
several replicas at once. Nothing here decides anything about images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from image_service.agent_inputs import AgentInputs
from image_service.api import APIS
from image_service.config import ServiceSettings
from image_service.expunger import Expunger
from image_service.globalconfig import CONFIG_CHANNEL, DELETED_CHANNEL
from image_service.metrics import METRICS
from image_service.monitor import Monitor, MonitorSettings
from image_service.pipeline import Pipeline, Transactions
from image_service.portal.accounts import ensure_admin
from image_service.protocol.config import split_host_port
from image_service.protocol.names import Names
from image_service.protocol.transport import Bus
from image_service.pruning import Pruner
from image_service.relay import Relay
from image_service.settlement import settle_message
from image_service.store import Store
from image_service.volume_events import VolumeEvents

if TYPE_CHECKING:
    from image_service.portal.server import Portal

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0


class ListenFailed(Exception):
    """The HTTP portal cannot listen where it was told to."""


class ImageService:
    """One replica; several may run against the same broker and database."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.bus = Bus(settings.broker("image-service"), self.names)
        self._tasks: list[asyncio.Task[None]] = []
        self._relay: Relay | None = None
        self._store: Store | None = None
        self._portal: Portal | None = None
        # The port the portal listens on (the one chosen, when asked for port 0).
        self.http_port: int | None = None

    async def start(self) -> None:
        settings = self.settings
        store = self._store = await Store.open(settings.database_url)
        await store.migrate()
        await self.bus.connect()
        await self.bus.declare_topology()
        transactions = Transactions(store, self.names, query_timeout=settings.query_timeout)
        async with transactions.open() as ctx:
            await ensure_admin(ctx.tx, settings.admin_password.get_secret_value())
        METRICS.know_apis(APIS)
        self._relay = Relay(transactions, self.bus)
        monitor = Monitor(
            transactions,
            MonitorSettings(
                interval=settings.monitor_interval,
                resend_after=settings.resend_after,
                missed_heartbeats=settings.missed_heartbeats,
            ),
        )
        pruner = Pruner(transactions, retention=settings.retention, every=PRUNE_EVERY)
        expunger = Expunger(transactions)

        async def listen() -> None:
            await store.listen([CONFIG_CHANNEL, DELETED_CHANNEL], lambda _payload: expunger.wake())

        self._tasks = [
            asyncio.create_task(_forever("relay", self._relay.run)),
            asyncio.create_task(_forever("monitor", monitor.run)),
            asyncio.create_task(_forever("pruning", pruner.run)),
            asyncio.create_task(_forever("expunger", expunger.run)),
            asyncio.create_task(_forever("listener", listen)),
        ]
        agents = AgentInputs(transactions, self.bus, settings.agent_users)
        volumes = VolumeEvents(transactions)
        pipeline = Pipeline(transactions, self.bus, APIS, settle_message)
        if settings.http_listen is not None:
            # Before any delivery: a port that cannot be had stops the start with nothing
            # taken in hand (/readyz says 503 until the API queue is consumed).
            await self._start_portal(transactions, pipeline, settings.http_listen)
        prefetch = settings.prefetch
        await self.bus.consume(self.names.heartbeats, agents.on_heartbeat, prefetch=prefetch)
        await self.bus.consume(self.names.results, agents.on_result, prefetch=prefetch)
        # One at a time: two updates of one volume must be applied in the order they came.
        await self.bus.consume(self.names.volume_events, volumes.on_event, prefetch=1)
        # The API queue last: a request is served once everything it needs is in place.
        await self.bus.consume(self.names.api, pipeline.on_api, prefetch=prefetch)
        transactions.heard_since = time.monotonic()
        log.info("image service started (namespace %s)", settings.namespace)

    async def _start_portal(
        self, transactions: Transactions, pipeline: Pipeline, listen: str
    ) -> None:
        # Imported here: aiohttp's server is a seventh of the start-up time of a replica that
        # serves no HTTP.
        from image_service.portal.server import (
            FINISHED_CHANNEL,
            PROBE_FAILED,
            PROBE_TIMEOUT,
            Portal,
            PortalSettings,
        )

        settings = self.settings
        store = transactions.store

        async def ready() -> str | None:
            try:
                async with asyncio.timeout(PROBE_TIMEOUT), store.autocommit() as tx:
                    await tx.stats.ping()
            except PROBE_FAILED as exc:
                return f"database unavailable: {type(exc).__name__}"
            if not self.bus.consuming(self.names.api):
                return "not consuming the API queue"
            return None

        portal = self._portal = Portal(
            transactions,
            pipeline,
            PortalSettings(
                session_timeout=settings.session_timeout,
                wait=settings.http_wait,
                concurrency=settings.prefetch,
            ),
            ready,
        )

        async def listen_finished() -> None:
            await store.listen([FINISHED_CHANNEL], portal.finished)

        self._tasks.append(asyncio.create_task(_forever("portal listener", listen_finished)))
        host, port = split_host_port(listen)
        try:
            self.http_port = await portal.start(host, port)
        except OSError as exc:
            raise ListenFailed(f"--http-listen {listen}: {exc.strerror or exc}") from exc

    async def stop(self) -> None:
        """Graceful stop: take no new deliveries, finish and ack the ones in hand, publish
        what they committed, then close. What is left resumes in another replica."""
        if self._portal is not None:
            # First the HTTP requests: a call in hand finishes (or answers Processing, to be
            # polled at another replica) before the database goes.
            await self._portal.stop()
        await self.bus.stop_consuming()
        if self._relay is not None:
            with contextlib.suppress(Exception):
                await self._relay.publish_all()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.close()
        if self._store is not None:
            await self._store.close()
        log.info("image service stopped")


async def _forever(name: str, body: Callable[[], Awaitable[None]]) -> None:
    """Run a background loop; a bug in one round is logged and the loop starts again."""
    while True:
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s loop failed; restarting it", name)
            await asyncio.sleep(1.0)


async def run_forever(settings: ServiceSettings, stop: asyncio.Event) -> None:
    service = ImageService(settings)
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()
