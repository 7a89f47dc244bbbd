"""Benchmark: AddImage of a large raw image over loopback HTTP, beside `md5sum` of the file.

    python tests/benchmarks/bench_add_image.py [--size 1GiB] [--runs 3]

Starts a real image service and one backup agent (processes of their own, in a namespace and
database of their own), serves the file from a separate HTTP server process (aiohttp, sendfile),
and prints per run and as the median: `md5sum` wall time (page cache warm), the same job done by
standard tools (`curl | tee FILE | md5sum`, then `sync FILE`), AddImage wall time
from call to the Ready reply, their ratio (target <= 1.3), the agent's peak RSS (VmHWM, reset
before each run; target < 100 MiB) and the throughput. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.benchmarks.harness import (  # noqa: E402
    deployment,
    print_load,
    start_profiler,
    stop_on_sigterm,
    stop_profiler,
    watched,
)
from tests.conftest import Agent, Proc, Stack  # noqa: E402

MiB = 1 << 20
PATTERN_SIZE = 16 * MiB


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 256MiB)")
    number, unit = int(match.group(1)), match.group(2).upper()
    return number << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def make_image(path: Path, size: int) -> None:
    """Random-looking content (16 MiB of urandom repeated): incompressible, no magic number."""
    pattern = os.urandom(PATTERN_SIZE)
    with open(path, "wb") as f:
        written = 0
        while written < size:
            piece = pattern[: min(PATTERN_SIZE, size - written)]
            f.write(piece)
            written += len(piece)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def time_tools(url: str, destination: Path) -> float:
    """The same job done by standard tools in one pipeline: download, store, md5, fsync."""
    started = time.perf_counter()
    subprocess.run(
        [
            "bash",
            "-c",
            'set -o pipefail; curl -sf "$1" | tee "$2" | md5sum >/dev/null && sync "$2"',
            "tools",
            url,
            str(destination),
        ],
        check=True,
    )
    elapsed = time.perf_counter() - started
    destination.unlink()
    return elapsed


def time_md5sum(path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(["md5sum", str(path)], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - started, out.split()[0]


# --- the HTTP server, in a process of its own ---------------------------------------------


def serve(directory: str) -> None:
    """Child mode: serve `directory` on 127.0.0.1 (sendfile) and print the port."""
    from aiohttp import web

    async def main() -> None:
        app = web.Application()
        app.router.add_static("/files/", directory)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_http_server(directory: Path) -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(directory)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError(f"http server did not start: {line!r}")
    return process, int(line)


# --- agent memory ------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A `VmXxx:` figure of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each run has its own peak."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class RssPoller:
    """Samples VmRSS while a run goes on, a cross-check of VmHWM."""

    pid: int
    peak: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)


@dataclass
class Phases:
    """When the contract's `image.progress` events of one image arrive (monotonic clock):
    the first says the transfer started, the last with every byte says it is on disk."""

    size: int
    first: float | None = None
    complete: float | None = None

    async def on_event(self, _key: str, body: dict[str, object]) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        if body.get("downloadedBytes") == self.size:
            self.complete = now


@dataclass
class Run:
    md5sum: float
    tools: float
    add_image: float
    peak_rss: int
    sampled_rss: int
    size: int
    to_first_byte: float
    to_stored: float

    @property
    def ratio(self) -> float:
        return self.add_image / self.md5sum

    @property
    def throughput(self) -> float:
        return self.size / MiB / self.add_image


async def bench(args: argparse.Namespace) -> list[Run]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-add-image-", dir=args.workdir))
    www = workdir / "www"
    www.mkdir()
    image = www / "image.raw"
    http: subprocess.Popen[str] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    runs: list[Run] = []
    try:
        print(f"writing {args.size / MiB:,.0f} MiB to {image} ...", flush=True)
        make_image(image, args.size)
        http, port = start_http_server(www)
        url = f"http://127.0.0.1:{port}/files/{image.name}"
        async with deployment(workdir, "b") as stack:
            agent = await watched(stack.start_agent("bench", *args.agent_args), stack.services)
            processes = [*stack.services, agent.proc]
            assert agent.proc.process is not None
            pid = agent.proc.process.pid
            idle_rss = proc_status(pid, "VmRSS")
            print(f"agent pid {pid}, idle RSS {idle_rss / MiB:.1f} MiB", flush=True)
            if args.profile_agent:
                profiler = start_profiler(pid, args.profile_agent)
                await asyncio.sleep(1.0)
            for index in range(args.runs):
                run = await one_run(stack, agent, processes, image, url, index, args)
                runs.append(run)
                print(
                    f"run {index + 1}: md5sum {run.md5sum:.3f}s  "
                    f"curl|tee|md5sum+fsync {run.tools:.3f}s  AddImage {run.add_image:.3f}s  "
                    f"ratio {run.ratio:.2f}  agent peak RSS {run.peak_rss / MiB:.1f} MiB "
                    f"(sampled {run.sampled_rss / MiB:.1f})  {run.throughput:,.0f} MiB/s\n"
                    f"       phases: to first byte {run.to_first_byte:.3f}s, "
                    f"streamed+hashed+fsynced {run.to_stored - run.to_first_byte:.3f}s, "
                    f"after (qemu-img, commit, reply) {run.add_image - run.to_stored:.3f}s",
                    flush=True,
                )
            if profiler is not None:
                stop_profiler(profiler, args.profile_agent, "agent")
                profiler = None
            if args.keep_logs:
                for proc in processes:
                    print(f"===== {proc.name}\n{proc.log()}")
        return runs
    finally:
        if profiler is not None:
            stop_profiler(profiler, args.profile_agent, "agent")
        if http is not None:
            http.kill()
            http.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def one_run(
    stack: Stack,
    agent: Agent,
    processes: list[Proc],
    image: Path,
    url: str,
    index: int,
    args: argparse.Namespace,
) -> Run:
    pid = agent.proc.process.pid if agent.proc.process else 0
    warm_page_cache(image)
    md5_time, md5 = time_md5sum(image)
    if not reset_peak_rss(pid):
        print("cannot reset VmHWM: peak RSS is the process lifetime peak")
    image_uuid = uuid.uuid4().hex
    phases = Phases(args.size)
    await stack.client.subscribe([f"image.progress.{image_uuid}"], phases.on_event)
    poller = RssPoller(pid)
    stop = asyncio.Event()
    sampler = asyncio.create_task(poller.run(stop))
    started = time.perf_counter()
    try:
        reply = await watched(
            stack.call(
                "AddImage",
                {
                    "name": f"bench{index}",
                    "url": url,
                    "format": "raw",
                    "backupStorageUuids": [agent.uuid],
                    "resourceUuid": image_uuid,
                },
                timeout=args.timeout,
            ),
            processes,
        )
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await sampler
    if not reply.get("success"):
        raise RuntimeError(f"AddImage failed: {json.dumps(reply)}")
    inventory = reply["inventory"]
    assert inventory["status"] == "Ready" and inventory["md5Sum"] == md5, inventory
    assert inventory["size"] == args.size, inventory
    # Free the disk (and the page cache of the stored copy) before the next run.
    deleted = await watched(
        stack.call("DeleteImage", {"uuid": inventory["uuid"]}, timeout=60), processes
    )
    assert deleted.get("success"), deleted
    # The standard tools last, so that what they leave behind (writeback, a freed file) does
    # not slow the AddImage measured above.
    tools_time = time_tools(url, image.parent.parent / "tools.copy")
    return Run(
        md5_time,
        tools_time,
        elapsed,
        proc_status(pid, "VmHWM"),
        poller.peak,
        args.size,
        (phases.first or started) - started,
        (phases.complete or started) - started,
    )


def report(runs: list[Run], size: int) -> None:
    def median(values: list[float]) -> float:
        return statistics.median(values)

    md5_time = median([r.md5sum for r in runs])
    add_time = median([r.add_image for r in runs])
    ratio = median([r.ratio for r in runs])
    rss = median([r.peak_rss for r in runs]) / MiB
    sampled = median([r.sampled_rss for r in runs]) / MiB
    throughput = median([r.throughput for r in runs])
    print()
    print(f"AddImage of {size / MiB:,.0f} MiB over loopback HTTP, median of {len(runs)} runs")
    print(f"  md5sum                {md5_time:8.3f} s   ({size / MiB / md5_time:,.0f} MiB/s)")
    tools = median([r.tools for r in runs])
    print(f"  curl|tee|md5sum+fsync {tools:8.3f} s   (the same job by standard tools)")
    print(f"  AddImage -> Ready     {add_time:8.3f} s   ({throughput:,.0f} MiB/s)")
    print(f"  ratio AddImage/tools  {median([r.add_image / r.tools for r in runs]):8.2f}")
    verdict = "ok" if ratio <= 1.3 else "ABOVE TARGET"
    print(f"  ratio AddImage/md5sum {ratio:8.2f}     (target <= 1.3: {verdict})")
    verdict = "ok" if rss < 100 else "ABOVE TARGET"
    print(
        f"  agent peak RSS        {rss:8.1f} MiB (target < 100: {verdict}; sampled {sampled:.1f})"
    )
    first = median([r.to_first_byte for r in runs])
    stream = median([r.to_stored - r.to_first_byte for r in runs])
    after = median([r.add_image - r.to_stored for r in runs])
    print(f"  phases (median): call -> first byte {first:.3f} s, stream+hash+write+fsync")
    print(f"                   {stream:.3f} s, stored -> Ready reply {after:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="image size (1GiB)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per AddImage")
    parser.add_argument("--workdir", default=None, help="where the file and agent root go")
    parser.add_argument("--keep-logs", action="store_true", help="print process logs at the end")
    parser.add_argument(
        "--agent-arg",
        dest="agent_args",
        action="append",
        default=[],
        help="extra backup-agent argument (repeatable)",
    )
    parser.add_argument(
        "--profile-agent", metavar="FILE", help="record the agent with py-spy (collapsed stacks)"
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    stop_on_sigterm()
    print_load("before")
    runs = asyncio.run(bench(args))
    report(runs, args.size)
    print_load("after")


if __name__ == "__main__":
    main()
