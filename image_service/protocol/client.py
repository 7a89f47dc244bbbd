"""A caller of the service's API over RabbitMQ: `image-cli`, the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from image_service.protocol.broker import Broker
from image_service.protocol.names import Names
from image_service.protocol.transport import PUBLISH_TIMEOUT


class ApiClient:
    """A caller of the service's API (used by image-cli and the tests): publishes to `NS.api`
    and matches replies on its own exclusive queue by correlation id."""

    def __init__(self, broker: Broker | str, names: Names) -> None:
        self.broker = Broker.of(broker)
        self.names = names
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subscriptions: list[AbstractQueue] = []

    async def connect(self) -> None:
        self.connection = await aio_pika.connect(
            self.broker.url,
            ssl_context=self.broker.ssl_context,
            client_properties={"connection_name": "image-cli"},
        )
        self._channel = await self.connection.channel(publisher_confirms=True)
        self._reply_queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await self._reply_queue.consume(self._on_reply, no_ack=True)

    @property
    def reply_to(self) -> str:
        assert self._reply_queue is not None, "ApiClient.connect() first"
        return self._reply_queue.name

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.get(message.correlation_id or "")
        if future is None or future.done():
            return
        try:
            future.set_result(json.loads(message.body))
        except ValueError as exc:
            future.set_exception(exc)

    async def publish_raw(
        self,
        body: bytes,
        *,
        message_id: str | None,
        reply_to: str | None,
        correlation_id: str | None = None,
        content_type: str | None = "application/json",
    ) -> None:
        assert self._channel is not None, "ApiClient.connect() first"
        message = aio_pika.Message(
            body,
            content_type=content_type,
            message_id=message_id,
            reply_to=reply_to,
            correlation_id=correlation_id,
            user_id=self.broker.user,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self._channel.default_exchange.publish(
            message, routing_key=self.names.api, timeout=PUBLISH_TIMEOUT
        )

    def expect(self, correlation_id: str) -> asyncio.Future[dict[str, Any]]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        return future

    async def call(
        self,
        api: str,
        params: dict[str, Any] | None = None,
        *,
        message_id: str | None = None,
        timeout: float | None = 60.0,
    ) -> dict[str, Any]:
        """Call one API and wait for its reply."""
        message_id = message_id or uuid.uuid4().hex
        future = self.expect(message_id)
        try:
            await self.publish_raw(
                json.dumps({"api": api, "params": params or {}}).encode(),
                message_id=message_id,
                reply_to=self.reply_to,
            )
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(message_id, None)

    async def subscribe(
        self, binding_keys: list[str], callback: Callable[[str, dict[str, Any]], Awaitable[None]]
    ) -> None:
        """Receive events of `NS.events` matching `binding_keys` while connected."""
        assert self._channel is not None, "ApiClient.connect() first"
        # Not declared: the service declares it, and a client that may configure the exchange
        # could also delete it.
        exchange = await self._channel.get_exchange(self.names.events, ensure=False)
        queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        for key in binding_keys:
            await queue.bind(exchange, routing_key=key)

        async def on_event(message: AbstractIncomingMessage) -> None:
            with contextlib.suppress(ValueError):
                await callback(message.routing_key or "", json.loads(message.body))

        await queue.consume(on_event, no_ack=True)
        self._subscriptions.append(queue)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
