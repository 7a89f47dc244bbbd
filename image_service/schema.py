"""The published message schema (contract section 11): JSON Schema of every API's parameters,
every inventory, every event and agent message, and an AsyncAPI document of the queues and
exchanges, generated from the models the service itself validates with.

    python -m image_service.schema            write docs/schema/
    python -m image_service.schema --check    exit 1 when docs/schema/ differs from the models

tests/unit/test_schema.py runs the check, so a model that changes without its published schema
fails the suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from image_service.api import APIS
from image_service.portal.zstack import BY_API, CLASSES, QUERY_OPS, Special
from image_service.protocol import agent, events
from image_service.protocol.inventories import INVENTORIES

DEFAULT_DIRECTORY = Path(__file__).resolve().parents[1] / "docs" / "schema"
JSON_SCHEMA = "https://json-schema.org/draft/2020-12/schema"


class LogInByAccount(BaseModel):
    """The portal's login (APILogInByAccountMsg)."""

    accountName: str
    password: str


class SessionQuestion(BaseModel):
    """APILogOutMsg and APIValidateSessionMsg: about `sessionUuid`, by default the session
    the message carries (`"session": {"uuid": S}`)."""

    sessionUuid: str | None = None


PORTAL_PARAMS: dict[str, type[BaseModel]] = {
    Special.LogIn: LogInByAccount,
    Special.LogOut: SessionQuestion,
    Special.ValidateSession: SessionQuestion,
}


def _schema(model: Any, title: str, description: str | None = None) -> dict[str, Any]:
    adapter = model if isinstance(model, TypeAdapter) else TypeAdapter(model)
    schema: dict[str, Any] = {"$schema": JSON_SCHEMA, **adapter.json_schema(mode="validation")}
    schema["title"] = title
    if description:
        schema["description"] = description
    return schema


def _api_description(name: str) -> str:
    cls = BY_API.get(name)
    portal = f" ZStack's portal: {cls.name}, answered with {cls.reply}." if cls else ""
    return f"params of the {name} API (contract section 4 and after).{portal}"


def documents() -> dict[str, Any]:
    """Every file of docs/schema/, by relative path."""
    files: dict[str, Any] = {}
    for name, api in sorted(APIS.items()):
        files[f"params/{name}.json"] = _schema(api.model, name, _api_description(name))
    for special, model in PORTAL_PARAMS.items():
        cls = BY_API[special]
        files[f"params/portal/{special}.json"] = _schema(
            model, special, f"the portal's own {cls.name} (contract section 11)"
        )
    for inventory in INVENTORIES:
        files[f"inventories/{inventory.__name__}.json"] = _schema(
            inventory, inventory.__name__, inventory.__doc__
        )
    for event in (
        events.ImageStatusChanged,
        events.ImageStateChanged,
        events.ImageDeleted,
        events.ImageProgress,
        events.BackupStorageStatusChanged,
        events.VolumeEvent,
        events.SnapshotEvent,
    ):
        files[f"events/{event.__name__}.json"] = _schema(event, event.__name__, event.__doc__)
    files["agent/AgentCommand.json"] = _schema(
        TypeAdapter[agent.AgentCommand](agent.AgentCommand),
        "AgentCommand",
        "a command on NS.agent.UUID, told apart by `command`",
    )
    for message in (agent.AgentResult, agent.Heartbeat):
        files[f"agent/{message.__name__}.json"] = _schema(
            message, message.__name__, message.__doc__
        )
    files["asyncapi.json"] = asyncapi()
    return files


def _ref(path: str) -> dict[str, str]:
    return {"$ref": path}


def asyncapi() -> dict[str, Any]:
    """The queues and exchanges (contract sections 1, 2, 7 and 8; PROTOCOL.md A.1-A.3)."""

    def message(name: str, payload: str | dict[str, Any], summary: str) -> dict[str, Any]:
        return {
            "name": name,
            "contentType": "application/json",
            "summary": summary,
            "payload": _ref(payload) if isinstance(payload, str) else payload,
        }

    def api_call(name: str) -> dict[str, Any]:
        """The body of an API message: the envelope around the API's params."""
        return {
            "type": "object",
            "properties": {"api": {"const": name}, "params": _ref(f"params/{name}.json")},
            "required": ["api"],
        }

    namespace = {"description": "the namespace (--namespace)", "default": "image"}
    backup_storage = {"description": "the backup storage's uuid (32 lowercase hex)"}

    api_names = sorted(APIS)
    event_key = "{uuid}"
    channels = {
        "api": {
            "address": "{namespace}.api",
            "parameters": {"namespace": namespace},
            "description": "API calls: the default exchange, routing key NS.api; body"
            ' {"api": NAME, "params": {...}}; message_id runs once; one reply goes to reply_to'
            " with the correlation_id.",
            "messages": {name: message(name, api_call(name), f"call {name}") for name in api_names},
        },
        "events": {
            "address": "{namespace}.events",
            "parameters": {"namespace": namespace},
            "description": "Topic exchange of events (section 7). Routing keys:"
            f" image.status.{event_key}, image.state.{event_key}, image.progress.{event_key},"
            f" image.deleted.{event_key}, backupStorage.status.{event_key}; consumed:"
            f" volume.created|updated|deleted.{event_key},"
            f" volumeSnapshot.created|deleted.{event_key}.",
            "messages": {
                name: message(name, f"events/{name}.json", name)
                for name in (
                    "ImageStatusChanged",
                    "ImageStateChanged",
                    "ImageDeleted",
                    "ImageProgress",
                    "BackupStorageStatusChanged",
                    "VolumeEvent",
                    "SnapshotEvent",
                )
            },
        },
        "agentCommands": {
            "address": "{namespace}.agent.{backupStorageUuid}",
            "parameters": {"namespace": namespace, "backupStorageUuid": backup_storage},
            "description": "Commands to one agent, from the service's broker user only.",
            "messages": {
                "AgentCommand": message(
                    "AgentCommand", "agent/AgentCommand.json", "download, create, delete or inspect"
                )
            },
        },
        "agentMessages": {
            "address": "{namespace}.agents",
            "parameters": {"namespace": namespace},
            "description": "Topic exchange agents publish to: result.{backupStorageUuid} (to"
            " NS.results) and heartbeat.{backupStorageUuid} (to NS.heartbeats); each agent's"
            " broker user may use only its own keys.",
            "messages": {
                "AgentResult": message("AgentResult", "agent/AgentResult.json", "an op's result"),
                "Heartbeat": message("Heartbeat", "agent/Heartbeat.json", "a heartbeat"),
            },
        },
    }
    operations = {
        "callApi": {
            "action": "send",
            "channel": _ref("#/channels/api"),
            "summary": "call an API (the reply schemas are the inventories)",
        },
        "serveApi": {
            "action": "receive",
            "channel": _ref("#/channels/api"),
            "summary": "the service consumes NS.api",
        },
        "publishEvents": {"action": "send", "channel": _ref("#/channels/events")},
        "commandAgents": {"action": "send", "channel": _ref("#/channels/agentCommands")},
        "hearAgents": {"action": "receive", "channel": _ref("#/channels/agentMessages")},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Image service",
            "version": "11",
            "description": "The bus of the image service (../PROTOCOL.md). The HTTP portal"
            " serves the same APIs as ZStack message classes: "
            + ", ".join(f"{c.name} -> {c.api}" for c in sorted(CLASSES.values(), key=str))
            + ". Query operators: "
            + ", ".join(f"{z} -> {ours}" for z, ours in QUERY_OPS.items())
            + ".",
        },
        "channels": channels,
        "operations": operations,
    }


def render(document: Any) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def differences(directory: Path) -> list[str]:
    """What in `directory` differs from the models (missing, changed or stray files)."""
    expected = {path: render(doc) for path, doc in documents().items()}
    found = {
        str(p.relative_to(directory)): p.read_text()
        for p in directory.rglob("*.json")
        if p.is_file()
    }
    problems = [f"missing: {p}" for p in sorted(set(expected) - set(found))]
    problems += [f"stray: {p}" for p in sorted(set(found) - set(expected))]
    problems += [
        f"differs: {p}" for p in sorted(expected) if p in found and found[p] != expected[p]
    ]
    return problems


def write(directory: Path) -> None:
    for path in directory.rglob("*.json"):
        path.unlink()
    for relative, document in documents().items():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(document))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m image_service.schema", description=__doc__)
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIRECTORY)
    parser.add_argument("--check", action="store_true", help="compare, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = differences(args.directory)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("docs/schema is stale: python -m image_service.schema", file=sys.stderr)
            sys.exit(1)
        return
    write(args.directory)


if __name__ == "__main__":
    main()
