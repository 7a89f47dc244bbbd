"""What both benchmarks need beside `tests.conftest`: one isolated deployment that fails fast
when the broker or a process it started goes away, and that always cleans up after itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aio_pika

from image_service.protocol.client import ApiClient
from image_service.protocol.names import Names
from tests.conftest import (
    AMQP_URL,
    PG_URL,
    Proc,
    Stack,
    _drop_database,
    _drop_namespace,
    _schema_ready,
    _try_connect,
    wait_for,
)

T = TypeVar("T")
BROKER_TIMEOUT = 20.0
CLEANUP_TIMEOUT = 30.0


class ProcessDied(RuntimeError):
    pass


def stop_on_sigterm() -> None:
    """SIGTERM becomes KeyboardInterrupt, so `finally` blocks still clean up."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


async def bounded(label: str, awaitable: Awaitable[Any], timeout: float = CLEANUP_TIMEOUT) -> None:
    """A cleanup step that may not hang the benchmark (a wedged broker must not)."""
    try:
        await asyncio.wait_for(awaitable, timeout)
    except Exception as exc:
        print(f"cleanup: {label} failed: {exc!r}")


async def watched(awaitable: Awaitable[T], procs: list[Proc], poll: float = 0.25) -> T:
    """Await `awaitable` while every process in `procs` runs; if one exits, fail at once with
    the end of its log instead of waiting for a reply that will not come."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            for proc in procs:
                if not proc.running:
                    code = proc.process.returncode if proc.process else None
                    tail = "\n".join(proc.log().splitlines()[-20:])
                    raise ProcessDied(f"{proc.name} exited (code {code}); its log ends:\n{tail}")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


@contextlib.asynccontextmanager
async def deployment(workdir: Path, prefix: str) -> AsyncIterator[Stack]:
    """A namespace and database of their own with one image service running; agents are added
    with `stack.start_agent`. Everything is stopped, deleted and dropped on the way out."""
    namespace = f"{prefix}{uuid.uuid4().hex[:12]}"
    names = Names(namespace)
    dbname = f"images_{namespace}"
    database_url = f"{PG_URL}/{dbname}"
    client = ApiClient(AMQP_URL, names)
    stack = Stack(namespace, database_url, workdir, None, client, None)  # type: ignore[arg-type]
    try:
        try:
            await asyncio.wait_for(client.connect(), BROKER_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(f"RabbitMQ at {AMQP_URL} does not answer") from None
        stack.start_service()
        stack.db = await watched(
            wait_for(lambda: _try_connect(database_url), timeout=30), stack.services
        )
        await watched(wait_for(lambda: _schema_ready(stack.db), timeout=30), stack.services)
        yield stack
    finally:
        for agent in stack.agents:
            agent.proc.terminate(10)
        for proc in stack.services:
            proc.terminate(10)
        if stack.db is not None:
            await bounded("closing the database connection", stack.db.close())
        await bounded("closing the client", client.close())
        agent_uuids = [a.uuid for a in stack.agents if a.uuid]
        await bounded("deleting the namespace", _drop_namespace(namespace, agent_uuids))
        await bounded("deleting the volume-events queue", drop_queues(names.volume_events))
        await bounded("dropping the database", _drop_database(dbname))


async def drop_queues(*queues: str) -> None:
    """Queues of the namespace that `tests.conftest._drop_namespace` does not know about."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for queue in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)


def start_profiler(pid: int, output: str, rate: int = 200) -> subprocess.Popen[bytes]:
    """py-spy (pip install py-spy) samples `pid`, idle threads included, so the collapsed stacks
    show where the wall time goes, not only the CPU time."""
    command = ["py-spy", "record", "--pid", str(pid), "--idle", "--threads", "--rate", str(rate)]
    command += ["--format", "raw", "--output", output, "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(profiler: subprocess.Popen[bytes], output: str, what: str) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
    print(f"{what} profile (py-spy collapsed stacks): {output}")


def print_load(when: str) -> None:
    """Other work on the machine skews every figure: say how busy it was."""
    one, five, _ = os.getloadavg()
    print(f"load average {when}: {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs")
