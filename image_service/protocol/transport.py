"""RabbitMQ edge: the only module (of the service and of the agent) that imports aio-pika.

It declares the topology, publishes with publisher confirms and a timeout, and runs
consumers that ack a delivery only after its handler returned (that is, after the handler's
transaction committed). Handlers see an `Incoming` value, never an aio-pika message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from image_service.protocol.names import Names

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 10.0
# A message that makes its handler fail this many times is parked on NS.dead, not looped.
DELIVERY_LIMIT = 10


@dataclass(frozen=True, slots=True)
class Incoming:
    body: bytes
    message_id: str | None
    reply_to: str | None
    correlation_id: str | None
    routing_key: str | None
    redelivered: bool


Handler = Callable[[Incoming], Awaitable[None]]


class PublishRejected(Exception):
    """The broker refused this very message (an unknown reply-to, a closed channel in answer
    to it): retrying it forever would wedge whatever is queued behind it."""


class Unroutable(PublishRejected):
    """The broker returned the message: no queue by that name (a caller that went away)."""


# Broker answers to a publish that blame the message rather than the network.
_REJECTIONS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ConnectionInternalError,
    aiormq.exceptions.AMQPChannelError,
    aiormq.exceptions.DeliveryError,
)


async def _publish_or_reject(
    target: AbstractExchange, message: aio_pika.Message, routing_key: str
) -> None:
    try:
        await target.publish(message, routing_key=routing_key, timeout=PUBLISH_TIMEOUT)
    except aiormq.exceptions.DeliveryError as exc:
        raise Unroutable(f"{routing_key}: {exc!r}") from exc
    except _REJECTIONS as exc:
        raise PublishRejected(f"{routing_key}: {exc!r}") from exc


class RetryLater(Exception):
    """Raised by a handler when a dependency (the database) is unavailable: requeue, no ack."""


class Bus:
    def __init__(
        self, amqp_url: str, names: Names, *, connection_name: str = "image-service"
    ) -> None:
        self.amqp_url = amqp_url
        self.connection_name = connection_name
        self.names = names
        self.connection: AbstractRobustConnection | None = None
        # Publishing has a connection of its own: a reply the broker rejects by closing the
        # connection (RabbitMQ does so for a forged direct reply-to) must not drop consumers.
        self.publish_connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        # Direct replies of read-only APIs (ImageService.on_read_only) have a connection of
        # their own, opened on first use: when a forged reply-to makes the broker close it, the
        # outbox relay's publishes, on the other connection, are not hit and not blamed.
        self._reply_connection: AbstractRobustConnection | None = None
        self._reply_channel: AbstractChannel | None = None
        self._reply_lock = asyncio.Lock()
        self._consume_channels: list[AbstractChannel] = []
        # Strong references: connect_robust only restores what is still referenced.
        self._queues: list[AbstractQueue] = []
        self._consumer_tags: list[tuple[AbstractQueue, str]] = []
        self._events: AbstractExchange | None = None
        self._declared_agent_queues: set[str] = set()
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def connect(self) -> None:
        self.connection = await aio_pika.connect_robust(
            self.amqp_url,
            client_properties={"connection_name": self.connection_name},
            reconnect_interval=1,
        )
        self.publish_connection = await aio_pika.connect_robust(
            self.amqp_url,
            client_properties={"connection_name": f"{self.connection_name} (publish)"},
            reconnect_interval=1,
        )
        self._publish_channel = await self.publish_connection.channel(publisher_confirms=True)

    def _channel(self) -> AbstractChannel:
        assert self._publish_channel is not None, "Bus.connect() first"
        return self._publish_channel

    async def _declare_shared(self) -> AbstractChannel:
        """What service and agents both use: events, dead letters, results, heartbeats."""
        channel = self._channel()
        self._events = await channel.declare_exchange(
            self.names.events, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead = await channel.declare_exchange(
            self.names.dead_letters, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(self.names.dead_letters, durable=True)
        await dead_queue.bind(dead)
        await channel.declare_queue(
            self.names.results, durable=True, arguments=self.work_queue_arguments()
        )
        await channel.declare_queue(self.names.heartbeats, durable=True)
        return channel

    async def declare_topology(self) -> None:
        channel = await self._declare_shared()
        await channel.declare_queue(
            self.names.api, durable=True, arguments=self.work_queue_arguments()
        )
        volume_events = await channel.declare_queue(
            self.names.volume_events, durable=True, arguments=self.work_queue_arguments()
        )
        assert self._events is not None
        for key in ("volume.*.*", "volumeSnapshot.*.*"):
            await volume_events.bind(self._events, routing_key=key)

    async def declare_agent_topology(self, backup_storage_uuid: str) -> None:
        await self._declare_shared()
        await self.declare_agent_queue(backup_storage_uuid)

    def work_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.names.dead_letters,
        }

    async def declare_agent_queue(self, backup_storage_uuid: str) -> None:
        """Declare an agent's command queue so commands wait there while the agent is away."""
        name = self.names.agent(backup_storage_uuid)
        if name in self._declared_agent_queues:
            return
        await self._channel().declare_queue(
            name, durable=True, arguments=self.work_queue_arguments()
        )
        self._declared_agent_queues.add(name)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        correlation_id: str | None = None,
        message_id: str | None = None,
        persistent: bool = True,
        expiration: float | None = None,
    ) -> None:
        channel = self._channel()
        message = aio_pika.Message(
            body,
            content_type="application/json",
            correlation_id=correlation_id,
            message_id=message_id,
            expiration=expiration,
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
        )
        if exchange == "":
            target = channel.default_exchange
        elif exchange == self.names.events and self._events is not None:
            target = self._events
        else:
            target = await channel.get_exchange(exchange, ensure=False)
        await _publish_or_reject(target, message, routing_key)

    async def publish_reply(
        self, reply_to: str, body: bytes, *, correlation_id: str | None
    ) -> None:
        """A reply straight to its caller, on the reply connection (see __init__)."""
        async with self._reply_lock:
            if self._reply_connection is None:
                self._reply_connection = await aio_pika.connect_robust(
                    self.amqp_url,
                    client_properties={"connection_name": f"{self.connection_name} (replies)"},
                    reconnect_interval=1,
                )
                self._reply_channel = await self._reply_connection.channel(publisher_confirms=True)
        assert self._reply_channel is not None
        message = aio_pika.Message(
            body,
            content_type="application/json",
            correlation_id=correlation_id,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        await _publish_or_reject(self._reply_channel.default_exchange, message, reply_to)

    async def consume(self, queue_name: str, handler: Handler, *, prefetch: int = 16) -> None:
        """Consume `queue_name` on a channel of its own, `prefetch` deliveries at a time."""
        assert self.connection is not None
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=True)
        self._consume_channels.append(channel)
        self._queues.append(queue)

        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._inflight.add(task)
            try:
                await self._deliver(message, handler)
            finally:
                if task is not None:
                    self._inflight.discard(task)

        tag = await queue.consume(on_message, no_ack=False)
        self._consumer_tags.append((queue, tag))

    async def _deliver(self, message: AbstractIncomingMessage, handler: Handler) -> None:
        incoming = Incoming(
            body=message.body,
            message_id=message.message_id,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            routing_key=message.routing_key,
            redelivered=bool(message.redelivered),
        )
        delay = 0.5
        while True:
            try:
                await handler(incoming)
            except RetryLater as exc:
                # A dependency is down: keep the delivery and try again, so that an outage
                # does not count toward the queue's delivery limit and park good messages.
                if self._stopping:
                    await self._settle(message, ack=False)
                    return
                log.warning("retrying %s: %s", message.message_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            except Exception:
                log.exception("handler failed for %s; requeueing", message.message_id)
                await asyncio.sleep(0.5)
                await self._settle(message, ack=False)
                return
            await self._settle(message, ack=True)
            return

    @staticmethod
    async def _settle(message: AbstractIncomingMessage, *, ack: bool) -> None:
        # A lost channel means the broker redelivers the message: the inbox makes that safe.
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError, ConnectionError):
            if ack:
                await message.ack()
            else:
                await message.nack(requeue=True)

    async def stop_consuming(self, drain_timeout: float = 30.0) -> None:
        """Stop taking deliveries, then wait for the ones being handled to settle."""
        self._stopping = True
        for queue, tag in self._consumer_tags:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._consumer_tags.clear()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=drain_timeout)

    async def consumer_count(self, queue_name: str) -> int:
        queue = await self._channel().declare_queue(queue_name, passive=True)
        count = queue.declaration_result.consumer_count
        return int(count or 0)

    async def close(self) -> None:
        for connection in (self.connection, self.publish_connection, self._reply_connection):
            if connection is not None:
                await connection.close()
