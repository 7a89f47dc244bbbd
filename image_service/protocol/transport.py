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

from image_service.protocol.broker import Broker
from image_service.protocol.direct_reply import PREFIX as DIRECT_REPLY_PREFIX
from image_service.protocol.direct_reply import DirectReplyNodes, Route
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
    # The broker user that published it, as RabbitMQ validated it (None: the sender set none).
    user_id: str | None = None
    # The exchange it was published to ("" for the default exchange).
    exchange: str = ""


Handler = Callable[[Incoming], Awaitable[None]]


class PublishRejected(Exception):
    """The broker closed the channel or connection the message was published on, in answer to
    it or to another message in flight there (RabbitMQ fails them all alike): try it again,
    and give up only after it was refused more than once (the relay counts)."""


class Refused(PublishRejected):
    """The broker refused this very message, proven: drop it, retrying cannot help."""


class Unroutable(Refused):
    """The broker returned the message: no queue by that name (a caller that went away)."""


# Broker answers to a publish that close its channel or connection.
_CLOSED_BY_BROKER: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ConnectionInternalError,
    aiormq.exceptions.AMQPChannelError,
)


async def _publish_or_reject(
    target: AbstractExchange, message: aio_pika.Message, routing_key: str
) -> None:
    try:
        await target.publish(message, routing_key=routing_key, timeout=PUBLISH_TIMEOUT)
    except aiormq.exceptions.DeliveryError as exc:
        raise Unroutable(f"{routing_key[:300]}: {exc!r}") from exc
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        if "user_id" in str(exc):
            raise WrongBrokerUser(_wrong_user(message.user_id, exc)) from None
        raise PublishRejected(f"{routing_key[:300]}: {exc!r}") from exc
    except _CLOSED_BY_BROKER as exc:
        raise PublishRejected(f"{routing_key[:300]}: {exc!r}") from exc


def _wrong_user(user: str | None, exc: BaseException) -> str:
    return (
        f"the broker does not know this connection as {user!r} ({exc.args[0] if exc.args else exc});"
        " with a client certificate the broker must map its common name to the user"
        " (ssl_cert_login_from = common_name)"
    )


class WrongBrokerUser(Exception):
    """The broker knows this process's connection as another user than the one its messages
    are signed with (a certificate login mapped by distinguished name, say): every publish
    would be refused, so the process must not start."""


class RetryLater(Exception):
    """Raised by a handler when a dependency (the database) is unavailable: requeue, no ack."""


# What a publish raises when its connection or channel went away under it.
_CONNECTION_LOST: tuple[type[Exception], ...] = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    RuntimeError,
    TimeoutError,
)
# A direct reply that failed on the shared reply connection, for one of these reasons, is
# tried again alone (Bus._publish_direct_reply).
_RETRY_ALONE: tuple[type[Exception], ...] = (PublishRejected, *_CONNECTION_LOST)
# Direct replies tried alone at once, each on a connection of its own: a flood of forged names
# costs a few connections at a time, not one per name.
ALONE_AT_ONCE = 4
CONNECT_TIMEOUT = 10.0


class Bus:
    def __init__(
        self, broker: Broker | str, names: Names, *, connection_name: str = "image-service"
    ) -> None:
        self.broker = Broker.of(broker)
        self.connection_name = connection_name
        self.names = names
        self.connection: AbstractRobustConnection | None = None
        # Publishing has a connection of its own: a reply the broker rejects by closing the
        # connection (RabbitMQ does so for a forged direct reply-to) must not drop consumers.
        self.publish_connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        # Publishes to direct reply-to names have a connection of their own (see
        # _publish_direct_reply): when a forged name makes the broker close it, nothing else
        # published by this process is hit.
        self._reply_connection: aio_pika.abc.AbstractConnection | None = None
        self._reply_channel: AbstractChannel | None = None
        self._reply_lock = asyncio.Lock()
        self._direct_nodes = DirectReplyNodes()
        self._alone_turns = asyncio.Semaphore(ALONE_AT_ONCE)
        # The broker is a RabbitMQ 3.x, whose direct reply-to names direct_reply.py can read.
        self._rabbitmq_3 = True
        self._consume_channels: list[AbstractChannel] = []
        # Strong references: connect_robust only restores what is still referenced.
        self._queues: list[AbstractQueue] = []
        self._consumer_tags: list[tuple[AbstractQueue, str]] = []
        self._events: AbstractExchange | None = None
        self._declared_agent_queues: set[str] = set()
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def _connect(self, purpose: str) -> AbstractRobustConnection:
        name = f"{self.connection_name} ({purpose})" if purpose else self.connection_name
        return await aio_pika.connect_robust(
            self.broker.url,
            ssl_context=self.broker.ssl_context,
            client_properties={"connection_name": name},
            reconnect_interval=1,
        )

    async def connect(self) -> None:
        self.connection = await self._connect("")
        self.publish_connection = await self._connect("publish")
        self._publish_channel = await self.publish_connection.channel(publisher_confirms=True)
        await self._check_user()
        transport = self.publish_connection.transport
        if transport is not None:
            version = transport.connection.server_properties.get("version")
            self._rabbitmq_3 = str(version or "").startswith("3.")

    async def _check_user(self) -> None:
        """Publish one message that routes nowhere, signed as `broker.user`: the broker checks
        `user_id` before routing, and refuses it if the connection's user is another."""
        assert self.publish_connection is not None
        # A user that may not publish to the default exchange (an agent's) cannot be checked
        # here: its first heartbeat is the check (backup_agent.agent).
        with contextlib.suppress(aiormq.exceptions.ChannelAccessRefused):
            async with self.publish_connection.channel(publisher_confirms=True) as probe:
                try:
                    await probe.default_exchange.publish(
                        aio_pika.Message(b"", user_id=self.broker.user),
                        routing_key=f"{self.names.namespace}.user-probe",
                        mandatory=False,
                        timeout=PUBLISH_TIMEOUT,
                    )
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    raise WrongBrokerUser(_wrong_user(self.broker.user, exc)) from None

    def _channel(self) -> AbstractChannel:
        assert self._publish_channel is not None, "Bus.connect() first"
        return self._publish_channel

    async def _declare_shared(self, channel: AbstractChannel) -> AbstractExchange:
        """What service and agents both use: events, dead letters, results, heartbeats and the
        exchange agents publish them to. Returns the events exchange."""
        events = await channel.declare_exchange(
            self.names.events, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead = await channel.declare_exchange(
            self.names.dead_letters, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(self.names.dead_letters, durable=True)
        await dead_queue.bind(dead)
        agents = await channel.declare_exchange(
            self.names.agent_messages, aio_pika.ExchangeType.TOPIC, durable=True
        )
        results = await channel.declare_queue(
            self.names.results, durable=True, arguments=self.work_queue_arguments()
        )
        await results.bind(agents, routing_key=self.names.result_key("*"))
        heartbeats = await channel.declare_queue(self.names.heartbeats, durable=True)
        await heartbeats.bind(agents, routing_key=self.names.heartbeat_key("*"))
        return events

    async def declare_topology(self) -> None:
        channel = self._channel()
        self._events = await self._declare_shared(channel)
        await channel.declare_queue(
            self.names.api, durable=True, arguments=self.work_queue_arguments()
        )
        volume_events = await channel.declare_queue(
            self.names.volume_events, durable=True, arguments=self.work_queue_arguments()
        )
        for key in ("volume.*.*", "volumeSnapshot.*.*"):
            await volume_events.bind(self._events, routing_key=key)

    async def declare_agent_topology(self, backup_storage_uuid: str) -> None:
        """An agent's own command queue, and the shared topology when its user may declare
        it (the development account). A per-agent user may not (deploy/rabbitmq): the
        service declares it; until then results wait in the agent's journal and are retried."""
        assert self.publish_connection is not None, "Bus.connect() first"
        try:
            # On a channel of its own: a refusal closes the channel it happened on.
            async with self.publish_connection.channel() as scratch:
                await self._declare_shared(scratch)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            log.info("shared queues left to the service to declare: %s", exc)
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
        """Publish with publisher confirms, as this process's broker user (`user_id`)."""
        message = aio_pika.Message(
            body,
            content_type="application/json",
            correlation_id=correlation_id,
            message_id=message_id,
            expiration=expiration,
            user_id=self.broker.user,
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
        )
        if exchange == "" and routing_key.startswith(DIRECT_REPLY_PREFIX):
            await self._publish_direct_reply(message, routing_key)
            return
        channel = self._channel()
        if exchange == "":
            target = channel.default_exchange
        elif exchange == self.names.events and self._events is not None:
            target = self._events
        else:  # not declared by this process (it may not be allowed to): must exist
            target = await channel.get_exchange(exchange, ensure=False)
        await _publish_or_reject(target, message, routing_key)

    async def publish_reply(
        self, reply_to: str, body: bytes, *, correlation_id: str | None
    ) -> None:
        """A reply straight to its caller, persistent (a caller that reads its replies from a
        durable queue loses none in a broker restart)."""
        await self.publish("", reply_to, body, correlation_id=correlation_id)

    async def _reply_channel_now(self) -> AbstractChannel:
        async with self._reply_lock:
            connection = self._reply_connection
            if connection is None or connection.is_closed or self._reply_channel is None:
                # Not a robust connection: when a forged name kills it, the next reply opens
                # a new one at once instead of waiting for a reconnect interval.
                self._reply_connection = connection = await aio_pika.connect(
                    self.broker.url,
                    ssl_context=self.broker.ssl_context,
                    timeout=CONNECT_TIMEOUT,
                    client_properties={"connection_name": f"{self.connection_name} (replies)"},
                )
                self._reply_channel = await connection.channel(publisher_confirms=True)
            assert self._reply_channel is not None
            return self._reply_channel

    async def _drop_reply_connection(self, channel: AbstractChannel) -> None:
        async with self._reply_lock:
            if self._reply_channel is channel and self._reply_connection is not None:
                connection, self._reply_connection, self._reply_channel = (
                    self._reply_connection,
                    None,
                    None,
                )
                with contextlib.suppress(*_CONNECTION_LOST):
                    await connection.close()

    async def _publish_direct_reply(self, message: aio_pika.Message, reply_to: str) -> None:
        """A forged or malformed direct reply-to name costs only its own reply.

        The broker answers one by closing the whole connection, failing the other replies in
        flight on it too. A name that cannot be one is refused without a publish; a name on a
        broker node that has not taken a direct reply yet is tried alone, on a connection of
        its own (direct_reply.py). On the shared reply connection, a reply whose publish fails
        is tried once more alone: if the broker refuses it there, it was the culprit (Refused,
        and its caller drops it); the others go through."""
        check = self._rabbitmq_3
        route = self._direct_nodes.route(reply_to, check_pid=check)
        if route is Route.REFUSE:
            raise Refused(f"{reply_to[:300]}: not a deliverable direct reply-to name")
        if route is Route.SHARED:
            channel = await self._reply_channel_now()
            try:
                await _publish_or_reject(channel.default_exchange, message, reply_to)
                return
            except Refused:
                raise
            except _RETRY_ALONE as exc:
                log.info("reply connection lost publishing to %r (%r); retrying it alone",
                         reply_to[:300], exc)  # fmt: skip
                await self._drop_reply_connection(channel)
        async with self._alone_turns:
            await self._publish_alone(message, reply_to)
        self._direct_nodes.delivered(reply_to, check_pid=check)

    async def _publish_alone(self, message: aio_pika.Message, reply_to: str) -> None:
        """One reply on a connection of its own: a close by the broker blames this reply
        (Refused); anything else (the broker away, too slow) is left to the caller's retry."""
        connection = await aio_pika.connect(
            self.broker.url,
            ssl_context=self.broker.ssl_context,
            timeout=CONNECT_TIMEOUT,
            client_properties={"connection_name": f"{self.connection_name} (one reply)"},
        )
        try:
            alone = await connection.channel(publisher_confirms=True)
            try:
                await _publish_or_reject(alone.default_exchange, message, reply_to)
            except Refused:
                raise
            except PublishRejected as exc:
                raise Refused(str(exc)) from exc
        finally:
            with contextlib.suppress(*_CONNECTION_LOST):
                await connection.close()

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
            user_id=message.user_id,
            exchange=message.exchange or "",
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

    def consuming(self, queue_name: str) -> bool:
        """Whether this process consumes `queue_name` now, on a channel that is open (a
        robust connection being re-established says False until it is back)."""
        if self.connection is None or self.connection.is_closed or self._stopping:
            return False
        for channel, queue in zip(self._consume_channels, self._queues, strict=False):
            if queue.name == queue_name and not channel.is_closed:
                return any(q is queue for q, _tag in self._consumer_tags)
        return False

    async def consumer_count(self, queue_name: str) -> int:
        queue = await self._channel().declare_queue(queue_name, passive=True)
        count = queue.declaration_result.consumer_count
        return int(count or 0)

    async def close(self) -> None:
        for connection in (self.connection, self.publish_connection, self._reply_connection):
            if connection is not None:
                await connection.close()
