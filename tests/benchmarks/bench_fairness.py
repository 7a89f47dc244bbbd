"""Benchmark: how much do drip-fed sources slow healthy downloads down? (contract §9: a slow
source never holds a download slot that a healthy one is waiting for)

    python -m tests.benchmarks.bench_fairness [--images 10] [--drips 8] [--size 4MiB] [--runs 3]
    pytest -s tests/benchmarks/bench_fairness.py     (one run)

Starts a real image service and one backup agent with `--max-downloads 4` (processes of their
own, in a namespace and database of their own) and an in-process HTTP source
(tests/hostile_server.py). Each run times IMAGES concurrent AddImages of SIZE random raw bytes
alone, then again while DRIPS other AddImages hold connections to sources that send one byte
every 2 s (the batch starts as soon as the server has seen every drip, or `--settle` seconds
later); prints both wall times and their ratio (target under 2x). The drips are deleted
(Enforcing) after each run, long before `--min-throughput` would fail them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.benchmarks.bench_add_image import parse_size  # noqa: E402
from tests.benchmarks.harness import (  # noqa: E402
    deployment,
    print_load,
    stop_on_sigterm,
    watched,
)
from tests.conftest import Agent, Stack, wait_for  # noqa: E402
from tests.hostile_server import HostileServer  # noqa: E402

MiB = 1 << 20
TARGET = 2.0


async def add(
    stack: Stack, agent: Agent, url: str, name: str, image_uuid: str, timeout: float
) -> dict[str, Any]:
    body = {
        "name": name,
        "url": url,
        "format": "raw",
        "backupStorageUuids": [agent.uuid],
        "resourceUuid": image_uuid,
    }
    return await stack.call("AddImage", body, timeout=timeout)


async def healthy_batch(
    stack: Stack, agent: Agent, server: HostileServer, label: str, count: int, size: int
) -> float:
    """Wall time of `count` concurrent AddImages of `size` bytes; each must be Ready with its
    md5. They are deleted afterwards (not timed)."""
    expected: dict[str, str] = {}
    for index in range(count):
        name = f"{label}-{index}"
        expected[name] = server.add(name, os.urandom(size))
    uuids = {name: uuid.uuid4().hex for name in expected}
    started = time.perf_counter()
    replies = await asyncio.gather(
        *(
            add(stack, agent, server.url("blob", name), name, uuids[name], timeout=120)
            for name in expected
        )
    )
    elapsed = time.perf_counter() - started
    for name, reply in zip(expected, replies, strict=True):
        if not reply.get("success"):
            raise RuntimeError(f"{name}: AddImage failed: {reply}")
        inventory = reply["inventory"]
        assert inventory["status"] == "Ready" and inventory["md5Sum"] == expected[name], inventory
    for image_uuid in uuids.values():
        reply = await stack.call("DeleteImage", {"uuid": image_uuid}, timeout=60)
        assert reply.get("success"), reply
    for name in expected:
        server.blobs.pop(name, None)
    return elapsed


async def downloading(stack: Stack, image_uuid: str) -> bool:
    condition = {"name": "uuid", "op": "=", "value": image_uuid}
    reply = await stack.call("QueryImage", {"conditions": [condition]}, timeout=30)
    return [i["status"] for i in reply.get("inventories") or []] == ["Downloading"]


async def one_run(
    stack: Stack, agent: Agent, server: HostileServer, index: int, args: argparse.Namespace
) -> tuple[float, float]:
    alone = await healthy_batch(stack, agent, server, f"alone{index}", args.images, args.size)
    drips = {f"drip{index}-{i}": uuid.uuid4().hex for i in range(args.drips)}
    calls = [
        asyncio.create_task(
            add(
                stack,
                agent,
                server.url("drip", name, interval=2, length=64 * MiB),
                name,
                image_uuid,
                timeout=180,
            )
        )
        for name, image_uuid in drips.items()
    ]
    try:

        async def all_dripping() -> bool:
            return all(server.hits(name) for name in drips)

        await wait_for(all_dripping, timeout=30)
        # 0: the healthy batch arrives as soon as every drip is connected (the worst case: the
        # drips that just got a slot must be watched for a second before they are judged slow).
        await asyncio.sleep(args.settle)
        with_drips = await healthy_batch(
            stack, agent, server, f"crowded{index}", args.images, args.size
        )
        still = [name for name, image_uuid in drips.items() if await downloading(stack, image_uuid)]
        if len(still) != len(drips):
            print(f"warning: only {len(still)} of {len(drips)} drips still Downloading")
    finally:
        for image_uuid in drips.values():
            await stack.call(
                "DeleteImage", {"uuid": image_uuid, "deleteMode": "Enforcing"}, timeout=60
            )
        _, pending = await asyncio.wait(calls, timeout=60)
        for call in pending:
            call.cancel()
    return alone, with_drips


async def bench(args: argparse.Namespace) -> list[tuple[float, float]]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-fairness-", dir=args.workdir))
    runs: list[tuple[float, float]] = []
    try:
        async with HostileServer() as server, deployment(workdir, "f") as stack:
            agent = await watched(
                stack.start_agent(
                    "fair",
                    "--max-downloads",
                    str(args.max_downloads),
                    "--throughput-window",
                    "60",
                ),
                stack.services,
            )
            processes = [*stack.services, agent.proc]
            for index in range(args.runs):
                alone, crowded = await watched(
                    one_run(stack, agent, server, index, args), processes
                )
                runs.append((alone, crowded))
                print(
                    f"run {index + 1}: {args.images} images alone {alone:.3f}s, "
                    f"beside {args.drips} drips {crowded:.3f}s, ratio {crowded / alone:.2f}",
                    flush=True,
                )
        return runs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(runs: list[tuple[float, float]], args: argparse.Namespace) -> float:
    alone = statistics.median(a for a, _ in runs)
    crowded = statistics.median(c for _, c in runs)
    ratio = statistics.median(c / a for a, c in runs)
    print()
    print(
        f"{args.images} AddImages of {args.size / MiB:g} MiB, --max-downloads "
        f"{args.max_downloads}, batch {args.settle:g}s after the drips connected,"
        f" median of {len(runs)} runs"
    )
    print(f"  alone                    {alone:8.3f} s")
    print(f"  beside {args.drips} drip feeds      {crowded:8.3f} s")
    verdict = "ok" if ratio < TARGET else "ABOVE TARGET"
    print(f"  ratio                    {ratio:8.2f}   (target < {TARGET:g}: {verdict})")
    return ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10, help="healthy images per batch")
    parser.add_argument("--drips", type=int, default=8, help="drip-fed downloads")
    parser.add_argument("--size", type=parse_size, default=4 * MiB, help="healthy image size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-downloads", type=int, default=4)
    parser.add_argument(
        "--settle", type=float, default=0.0, help="seconds between the drips and the batch"
    )
    parser.add_argument("--workdir", default=None, help="where the agent root goes")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    stop_on_sigterm()
    print_load("before")
    runs = asyncio.run(bench(args))
    report(runs, args)
    print_load("after")


async def test_fairness_benchmark() -> None:
    """One run under pytest (given this file explicitly): prints the figures; the timing
    itself is not asserted, only that every healthy image got Ready."""
    args = parse_args(["--runs", "1"])
    runs = await bench(args)
    report(runs, args)


if __name__ == "__main__":
    main()
