"""The volume read model, kept from the volume service's events (contract section 7).

Idempotent: replays change nothing, and a deletion is a tombstone that a late `created` cannot
undo. A malformed event is logged and dropped.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from image_service.pipeline import Transactions
from image_service.protocol.errors import validation_details
from image_service.protocol.events import SnapshotEvent, VolumeEvent
from image_service.protocol.transport import Incoming

log = logging.getLogger(__name__)

_MODELS: dict[str, type[VolumeEvent] | type[SnapshotEvent]] = {
    "volume": VolumeEvent,
    "volumeSnapshot": SnapshotEvent,
}


class VolumeEvents:
    def __init__(self, transactions: Transactions) -> None:
        self.transactions = transactions

    async def on_event(self, msg: Incoming) -> None:
        if msg.exchange != self.transactions.names.events:
            # Sent straight to the queue rather than through NS.events, where the broker's topic
            # permissions say who may publish `volume.*` (contract section 8).
            log.warning("event dropped: published to %r, not to the events exchange", msg.exchange)
            return
        kind, _, rest = (msg.routing_key or "").partition(".")
        action, _, key_uuid = rest.partition(".")
        model = _MODELS.get(kind)
        if model is None or action not in ("created", "updated", "deleted"):
            log.warning("event %r dropped: not a volume event", msg.routing_key)
            return
        try:
            event: VolumeEvent | SnapshotEvent = model.model_validate_json(msg.body)
        except ValidationError as exc:
            log.warning("malformed %r event dropped: %s", msg.routing_key, validation_details(exc))
            return
        if key_uuid and key_uuid != event.uuid:
            log.warning("event %r dropped: body uuid %s differs", msg.routing_key, event.uuid)
            return
        async with self.transactions.open() as ctx:
            volumes = ctx.tx.volumes
            if isinstance(event, VolumeEvent):
                if action == "deleted":
                    await volumes.delete_volume(event.uuid)
                else:
                    await volumes.upsert_volume(event)
            elif action == "deleted":
                await volumes.delete_snapshot(event.uuid)
            else:
                await volumes.upsert_snapshot(event)
