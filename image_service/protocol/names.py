"""Exchange and queue names, all under the namespace (contract §1)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    namespace: str

    @property
    def api(self) -> str:
        return f"{self.namespace}.api"

    @property
    def results(self) -> str:
        return f"{self.namespace}.results"

    @property
    def heartbeats(self) -> str:
        return f"{self.namespace}.heartbeats"

    @property
    def agent_messages(self) -> str:
        """The topic exchange agents publish their results (`result.<uuid>`) and heartbeats
        (`heartbeat.<uuid>`) to: the broker's topic permissions let each agent's user publish
        only under its own backup storage's uuid (deploy/rabbitmq/setup-users.sh)."""
        return f"{self.namespace}.agents"

    @staticmethod
    def result_key(backup_storage_uuid: str) -> str:
        return f"result.{backup_storage_uuid}"

    @staticmethod
    def heartbeat_key(backup_storage_uuid: str) -> str:
        return f"heartbeat.{backup_storage_uuid}"

    @property
    def events(self) -> str:
        return f"{self.namespace}.events"

    @property
    def dead_letters(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def volume_events(self) -> str:
        """The service's queue of `volume.*` and `volumeSnapshot.*` events."""
        return f"{self.namespace}.volume-events"

    def agent(self, backup_storage_uuid: str) -> str:
        return f"{self.namespace}.agent.{backup_storage_uuid}"

    def is_internal(self, queue: str) -> bool:
        """A queue the service or its agents consume: never a reply target (a reply published
        there, as the service's own broker user, would pose as a command or a result)."""
        fixed = (self.api, self.results, self.heartbeats, self.volume_events, self.dead_letters)
        return queue in fixed or queue.startswith(f"{self.namespace}.agent.")
