"""`image-cli`: the operator's command line, in the syntax of ZStack's CLI (contract §6).

    image-cli AddImage name=CentOS7 format=qcow2 url=http://... backupStorageUuids=UUID1,UUID2
    image-cli QueryImage status=Ready system=true name~=cent limit=10

Prints the reply as JSON on stdout; exits 0 on success, 1 on an API error, 2 on a usage error.
On a terminal, AddImage draws a progress bar on stderr from the `image.progress` events.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from typing import Annotated, Any, TextIO

from pydantic import Field

from image_service.protocol.client import ApiClient
from image_service.protocol.config import BusSettings, options_parser, settings_from
from image_service.protocol.names import Names

LIST_PARAMS = {"backupStorageUuids", "fields"}
BOOL_PARAMS = {"system", "count", "replyWithCount", "forSystemVm"}
INT_PARAMS = {"limit", "start"}
QUERY_PARAMS = {"limit", "start", "count", "replyWithCount", "sortBy", "sortDirection", "fields"}
CONDITION_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)(!\?=|!~=|\?=|~=|!=|>=|<=|=|>|<)(.*)$", re.S)


class UsageError(Exception):
    pass


def _typed(key: str, value: str) -> Any:
    if key in LIST_PARAMS:
        return [item for item in value.split(",") if item]
    if key in BOOL_PARAMS:
        if value.lower() not in ("true", "false"):
            raise UsageError(f"{key}: expected true or false, got {value!r}")
        return value.lower() == "true"
    if key in INT_PARAMS:
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"{key}: expected an integer, got {value!r}") from None
    return value


def parse_condition(token: str) -> dict[str, Any]:
    match = CONDITION_RE.match(token)
    if match is None:
        raise UsageError(f"cannot read condition {token!r} (expected NAME OP VALUE)")
    name, op, value = match.groups()
    if value == "null" and op in ("=", "!="):
        return {"name": name, "op": "is null" if op == "=" else "not null"}
    if op in ("?=", "!?="):
        return {"name": name, "op": op, "value": [v for v in value.split(",") if v]}
    if op in ("~=", "!~=") and "%" not in value and "_" not in value:
        value = f"%{value}%"
    return {"name": name, "op": op, "value": value}


def build_params(api: str, tokens: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    is_query = api.startswith("Query")
    conditions: list[dict[str, Any]] = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if is_query and not (sep and key in QUERY_PARAMS):
            conditions.append(parse_condition(token))
            continue
        if not sep or not key:
            raise UsageError(f"expected key=value, got {token!r}")
        params[key] = _typed(key, value)
    if is_query:
        params["conditions"] = conditions
    return params


class ProgressBar:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.per_storage: dict[str, tuple[int, int | None]] = {}

    async def on_event(self, _key: str, body: dict[str, Any]) -> None:
        self.per_storage[str(body.get("backupStorageUuid"))] = (
            int(body.get("downloadedBytes") or 0),
            body.get("totalBytes"),
        )
        done = sum(d for d, _ in self.per_storage.values())
        totals = [t for _, t in self.per_storage.values()]
        width = 40
        if totals and all(isinstance(t, int) and t > 0 for t in totals):
            total = sum(t for t in totals if t)
            fraction = min(1.0, done / total)
            bar = "#" * int(width * fraction)
            text = (
                f"\r[{bar:<{width}}] {fraction:6.1%} {done / 2**20:,.1f}/{total / 2**20:,.1f} MiB"
            )
        else:
            text = f"\r{done / 2**20:,.1f} MiB downloaded"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.per_storage:
            self.stream.write("\n")
            self.stream.flush()


async def run(settings: CliSettings, api: str, params: dict[str, Any]) -> dict[str, Any]:
    client = ApiClient(settings.broker("image-cli"), Names(settings.namespace))
    await client.connect()
    bar: ProgressBar | None = None
    try:
        if api == "AddImage" and sys.stderr.isatty() and not settings.no_progress:
            params.setdefault("resourceUuid", uuid.uuid4().hex)
            if isinstance(params["resourceUuid"], str):
                bar = ProgressBar(sys.stderr)
                await client.subscribe([f"image.progress.{params['resourceUuid']}"], bar.on_event)
        return await client.call(api, params, timeout=settings.timeout)
    finally:
        if bar is not None:
            bar.close()
        await client.close()


class CliSettings(BusSettings):
    timeout: Annotated[float, Field(gt=0)] | None = Field(
        None, description="seconds to wait for the reply (default: no limit)"
    )
    no_progress: bool = Field(False, description="no progress bar")


def main(argv: list[str] | None = None) -> None:
    parser = options_parser(
        CliSettings,
        prog="image-cli",
        description="Call an image service API: image-cli API key=value ...",
    )
    parser.add_argument("api", help="API name, e.g. AddImage, QueryImage")
    parser.add_argument("params", nargs="*", help="key=value (queries: NAME OP VALUE)")
    args = parser.parse_args(argv)
    settings = settings_from(CliSettings, parser, args)
    try:
        params = build_params(args.api, args.params)
    except UsageError as exc:
        print(f"image-cli: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        reply = asyncio.run(run(settings, args.api, params))
    except TimeoutError:
        print("image-cli: no reply in time", file=sys.stderr)
        sys.exit(1)
    except (OSError, ConnectionError) as exc:
        print(f"image-cli: cannot reach the broker: {exc}", file=sys.stderr)
        sys.exit(1)
    try:
        json.dump(reply, sys.stdout, indent=2)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (`| head`) went away: not an error of ours. Point stdout at devnull so
        # that the interpreter's final flush does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0 if reply.get("success") else 1)


if __name__ == "__main__":
    main()
