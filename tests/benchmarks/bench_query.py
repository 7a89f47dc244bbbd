"""Benchmark: round trips of QueryImage against a bare broker echo, on a loaded database.

    python tests/benchmarks/bench_query.py [--images 10000] [--calls 1000]
    python tests/benchmarks/bench_query.py --large    # 100,000 images, 3 refs each, 200,000 volumes

Queries timed: `uuid=X`, `volume.vmInstanceUuid=X`, `name~=%x% limit=100` and `count=true`.

Starts a real image service (a process of its own, in a namespace and database of its own),
bulk-loads images (status Ready, size and md5 set, one reference each) and one backup storage
with COPY, then times sequential `QueryImage uuid=<random existing uuid>` calls through the real
`ApiClient`; in the same run, as the baseline, the round trip of a bare request/reply echo over
the same broker (an aio-pika consumer in this process, on a queue of the same kind as `NS.api`,
replying with a body of the same size). Prints p50/p99 of both and their ratio, and the plans
PostgreSQL chooses for the statements a query runs. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aio_pika  # noqa: E402
import asyncpg  # noqa: E402

from image_service.params import Query  # noqa: E402
from image_service.protocol.client import ApiClient  # noqa: E402
from image_service.protocol.names import Names  # noqa: E402
from image_service.protocol.transport import Bus  # noqa: E402
from image_service.query import IMAGE, compile_query  # noqa: E402
from tests.benchmarks.harness import (  # noqa: E402
    bounded,
    deployment,
    print_load,
    start_profiler,
    stop_on_sigterm,
    stop_profiler,
    watched,
)
from tests.conftest import AMQP_URL, Stack  # noqa: E402

IMAGE_COLUMNS = [
    "uuid",
    "name",
    "description",
    "state",
    "status",
    "size",
    "actual_size",
    "virtual_size",
    "url",
    "media_type",
    "guest_os_type",
    "platform",
    "system",
    "format",
    "md5_sum",
    "type",
    "create_date",
    "last_op_date",
]
REF_COLUMNS = [
    "image_uuid",
    "backup_storage_uuid",
    "install_path",
    "status",
    "create_date",
    "last_op_date",
]


async def load(
    db: asyncpg.Connection, count: int, root: str, refs_per_image: int = 1, volumes: int = 0
) -> tuple[list[str], list[str]]:
    """`refs_per_image` Connected backup storages, `count` Ready images with a reference on
    each, and `volumes` volumes (two per VM) made from random images; returns the image uuids
    and the VM uuids."""
    bs_uuids = [uuid.uuid4().hex for _ in range(refs_per_image)]
    for index, bs_uuid in enumerate(bs_uuids):
        await db.execute(
            "INSERT INTO backup_storage (uuid, name, url, hostname, status, total_capacity,"
            " available_capacity) VALUES ($1, $2, $3, 'localhost', 'Connected', $4, $5)",
            bs_uuid,
            f"bench{index}",
            f"{root}{index}",
            1 << 40,
            1 << 39,
        )
    rng = random.Random(42)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    images, refs, uuids = [], [], []
    for index in range(count):
        image_uuid = uuid.UUID(int=rng.getrandbits(128)).hex
        created = start + timedelta(seconds=index)
        size = rng.randrange(1 << 20, 8 << 30)
        fmt = rng.choice(["qcow2", "raw"])
        name = f"image-{index}"
        images.append(
            (
                image_uuid,
                name,
                f"benchmark image {index}",
                "Enabled",
                "Ready",
                size,
                size,
                size * 2 if fmt == "qcow2" else size,
                f"http://images.example.com/{name}.{fmt}",
                "RootVolumeTemplate",
                "CentOS",
                rng.choice(["Linux", "Windows", "Other"]),
                False,
                fmt,
                hashlib.md5(name.encode()).hexdigest(),
                "zstack",
                created,
                created,
            )
        )
        for index_bs, bs_uuid in enumerate(bs_uuids):
            install_path = f"{root}{index_bs}/templates/{image_uuid}/{name}.template"
            refs.append((image_uuid, bs_uuid, install_path, "Ready", created, created))
        uuids.append(image_uuid)
    await db.copy_records_to_table("image", records=images, columns=IMAGE_COLUMNS)
    await db.copy_records_to_table("image_backup_storage_ref", records=refs, columns=REF_COLUMNS)
    vms: list[str] = []
    rows = []
    for index in range(volumes):
        if index % 2 == 0:
            vms.append(uuid.UUID(int=rng.getrandbits(128)).hex)
        created = start + timedelta(seconds=index)
        rows.append(
            (
                uuid.UUID(int=rng.getrandbits(128)).hex,
                f"volume-{index}",
                "Root" if index % 2 == 0 else "Data",
                vms[-1],
                rng.choice(uuids),
                f"file:///volumes/{index}.qcow2",
                "qcow2",
                1 << 30,
                created,
                created,
            )
        )
    await db.copy_records_to_table(
        "volume",
        records=rows,
        columns=[
            "uuid",
            "name",
            "type",
            "vm_instance_uuid",
            "root_image_uuid",
            "install_path",
            "format",
            "size",
            "create_date",
            "last_op_date",
        ],
    )
    # As autovacuum leaves a table in steady state: statistics, and the visibility map that
    # lets count(*) read only an index.
    await db.execute("VACUUM ANALYZE")
    return uuids, vms


def ratios(latencies: list[float], baseline: list[float]) -> tuple[float, float]:
    """p50 and p99 of `latencies`, each divided by the same percentile of `baseline`."""
    p50, p99 = (
        percentile(latencies, fraction) / percentile(baseline, fraction)
        for fraction in (0.50, 0.99)
    )
    return p50, p99


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


class Echo:
    """The baseline: a consumer that answers every request at once with a fixed body, on a
    queue declared like `NS.api` (durable quorum queue), replying like the service does."""

    def __init__(self, names: Names, reply_body: bytes, suffix: str = "") -> None:
        self.queue_name = f"{names.namespace}.bench-echo{suffix}"
        self.names = names
        self.reply_body = reply_body
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.queue: aio_pika.abc.AbstractQueue | None = None
        self.tag: str | None = None

    async def start(self) -> None:
        self.connection = await aio_pika.connect_robust(AMQP_URL)
        consume = await self.connection.channel()
        await consume.set_qos(prefetch_count=16)
        publish = await self.connection.channel(publisher_confirms=True)
        arguments = Bus(AMQP_URL, self.names).work_queue_arguments()
        self.queue = await consume.declare_queue(self.queue_name, durable=True, arguments=arguments)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            assert message.reply_to is not None
            await publish.default_exchange.publish(
                aio_pika.Message(
                    self.reply_body,
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=message.reply_to,
                timeout=10,
            )
            await message.ack()

        self.tag = await self.queue.consume(on_message)

    async def call(self, client: ApiClient, body: bytes) -> dict[str, Any]:
        """A request/reply through the client's own reply queue and correlation matching."""
        message_id = uuid.uuid4().hex
        future = client.expect(message_id)
        try:
            assert client._channel is not None
            await client._channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    message_id=message_id,
                    correlation_id=message_id,
                    reply_to=client.reply_to,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self.queue_name,
                timeout=10,
            )
            return await asyncio.wait_for(future, 10)
        finally:
            client._waiting.pop(message_id, None)

    async def stop(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                if self.queue is not None and self.tag is not None:
                    await self.queue.cancel(self.tag)
                channel = await self.connection.channel()
                await channel.queue_delete(self.queue_name)
            await self.connection.close()


async def measure(
    label: str, call: Callable[[], Awaitable[None]], calls: int, warmup: int
) -> list[float]:
    for _ in range(warmup):
        await call()
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    p50, p99 = percentile(latencies, 0.50), percentile(latencies, 0.99)
    print(
        f"{label:<34} p50 {p50 * 1000:7.2f} ms  p99 {p99 * 1000:7.2f} ms  "
        f"mean {statistics.fmean(latencies) * 1000:7.2f} ms  max {max(latencies) * 1000:7.2f} ms",
        flush=True,
    )
    return latencies


async def explain(db: asyncpg.Connection, label: str, params: dict[str, Any]) -> None:
    """The plans of the statements the service runs for one query, as it builds them."""
    compiled = compile_query(IMAGE, Query.model_validate_json(json.dumps(params)))
    statements = [("page", compiled.select_sql, compiled.args)]
    if params.get("count") or params.get("replyWithCount"):
        statements.append(("count", compiled.count_sql, compiled.count_args))
    if not params.get("count"):
        page = await db.fetch(compiled.select_sql, *compiled.args)
        statements.append(
            (
                "inventories",
                "SELECT * FROM image i WHERE i.uuid = ANY($1::bpchar[])",
                [[r[0] for r in page]],
            )
        )
    for kind, sql, args in statements:
        rows = await db.fetch(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING ON) {sql}", *args)
        print(f"plan of {label}, {kind} statement:")
        for row in rows:
            print(f"    {row[0]}")


async def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-query-"))
    try:
        async with deployment(workdir, "q") as stack:
            await measure_stack(stack, workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def measure_stack(stack: Stack, workdir: Path, args: argparse.Namespace) -> None:
    client, services = stack.client, stack.services
    started = time.perf_counter()
    uuids, vms = await load(
        stack.db, args.images, str(workdir / "bs"), args.refs_per_image, args.volumes
    )
    print(
        f"loaded {len(uuids):,} images, {len(uuids) * args.refs_per_image:,} references, "
        f"{args.volumes:,} volumes in {time.perf_counter() - started:.2f}s",
        flush=True,
    )
    rng = random.Random(7)

    def by_uuid() -> dict[str, Any]:
        return {"conditions": [{"name": "uuid", "op": "=", "value": rng.choice(uuids)}]}

    def by_vm() -> dict[str, Any]:
        return {
            "conditions": [{"name": "volume.vmInstanceUuid", "op": "=", "value": rng.choice(vms)}]
        }

    def by_name() -> dict[str, Any]:
        value = f"%{rng.randrange(10, 1000)}%"
        return {"conditions": [{"name": "name", "op": "~=", "value": value}], "limit": 100}

    def count_all() -> dict[str, Any]:
        return {"conditions": [], "count": True}

    scenarios: list[tuple[str, Callable[[], dict[str, Any]]]] = [("uuid=X", by_uuid)]
    if vms:
        scenarios.append(("volume.vmInstanceUuid=X", by_vm))
    scenarios += [("name~=%x% limit=100", by_name), ("count=true", count_all)]

    params = by_uuid()
    sample = await watched(client.call("QueryImage", params, timeout=30), services)
    reply_body = json.dumps(sample).encode()
    request_body = json.dumps({"api": "QueryImage", "params": params}).encode()
    print(f"request {len(request_body)} bytes, reply {len(reply_body)} bytes", flush=True)

    wide = {"conditions": [{"name": "name", "op": "~=", "value": "%1%"}], "limit": 100}
    wide_body = json.dumps(await client.call("QueryImage", wide, timeout=30)).encode()
    print(f"a 100-inventory reply: {len(wide_body):,} bytes", flush=True)

    echo = Echo(stack.names, reply_body)
    echo_wide = Echo(stack.names, wide_body, "-wide")
    results: list[tuple[str, list[float]]] = []
    try:
        await asyncio.wait_for(echo.start(), 20)
        await asyncio.wait_for(echo_wide.start(), 20)

        async def echo_call() -> None:
            await echo.call(client, request_body)

        async def echo_wide_call() -> None:
            await echo_wide.call(client, request_body)

        print(f"{args.calls:,} sequential calls after {args.warmup} warm-up calls each:")
        bare = await measure("echo over the same broker", echo_call, args.calls, args.warmup)
        bare_wide = await measure(
            "echo, 100-inventory reply", echo_wide_call, args.calls, args.warmup
        )
        for label, make in scenarios:

            async def query_image(make: Callable[[], dict[str, Any]] = make) -> None:
                reply = await watched(
                    client.call("QueryImage", make(), timeout=30), services, poll=1.0
                )
                if not reply.get("success"):
                    raise RuntimeError(f"unexpected reply: {json.dumps(reply)[:500]}")

            profiler = None
            if args.profile_service and label.startswith(args.profile_query):
                process = services[0].process
                assert process is not None
                profiler = start_profiler(process.pid, args.profile_service, rate=500)
                await asyncio.sleep(1.0)
            results.append(
                (label, await measure(f"QueryImage {label}", query_image, args.calls, args.warmup))
            )
            if profiler is not None:
                stop_profiler(profiler, args.profile_service, "service")
        again = await measure("echo again (drift check)", echo_call, args.calls, args.warmup)
    finally:
        await bounded("stopping the echo consumer", echo.stop())
        await bounded("stopping the wide echo consumer", echo_wide.stop())
    baseline = bare + again
    print()
    for label, latencies in results:
        p50, p99 = ratios(latencies, baseline)
        print(f"ratio QueryImage {label:<26} / echo: p50 {p50:5.2f}  p99 {p99:5.2f}")
        if label.startswith("name"):
            p50, p99 = ratios(latencies, bare_wide)
            print(
                f"ratio QueryImage {label:<26} / echo of a 100-inventory reply: "
                f"p50 {p50:5.2f}  p99 {p99:5.2f}"
            )
    print()
    for label, make in scenarios:
        await explain(stack.db, label, make())
    if args.keep_logs:
        for proc in services:
            print(f"===== {proc.name}\n{proc.log()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--refs-per-image", type=int, default=1)
    parser.add_argument("--volumes", type=int, default=0)
    parser.add_argument(
        "--large",
        action="store_true",
        help="100,000 images, 3 references each, 200,000 volumes (the query issue's figures)",
    )
    parser.add_argument("--calls", type=int, default=1_000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--profile-service",
        metavar="FILE",
        help="record the service with py-spy during the QueryImage calls (collapsed stacks)",
    )
    parser.add_argument(
        "--profile-query", default="uuid", help="which query --profile-service records (uuid)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="print the service log at the end")
    args = parser.parse_args()
    if args.large:
        args.images, args.refs_per_image, args.volumes = 100_000, 3, 200_000
    stop_on_sigterm()
    print_load("before")
    asyncio.run(bench(args))
    print_load("after")


if __name__ == "__main__":
    main()
