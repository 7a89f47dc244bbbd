"""Benchmark: what the capacity in every agent result costs (contract section 10) on a backup
storage with a quota and many stored images. Baseline: a walk of templates/ at every
measurement (how heartbeats measured before, and results would have); now: the tracked total
(`Gauge`), which walks once and then only every REWALK_AFTER seconds. Median of 7 rounds of
50 measurements, at 1,000 and 10,000 stored files, each round after a store and a delete
through `Gauge.changing` so that the tracked total really moves. Run from the checkout:

    python tests/benchmarks/bench_capacity.py

Not collected by pytest.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.getcwd())

from backup_agent.layout import Gauge, Layout, allocated

QUOTA = 1 << 40
ROUNDS = 7
PER_ROUND = 50


def populate(layout: Layout, files: int) -> None:
    for _ in range(files):
        directory = layout.templates / uuid.uuid4().hex
        directory.mkdir()
        (directory / "image.template").write_bytes(b"x" * 4096)


async def round_trip(layout: Layout, gauge: Gauge | None) -> float:
    """One store and one delete, then PER_ROUND measurements; seconds per measurement."""
    directory = layout.templates / uuid.uuid4().hex
    directory.mkdir()
    path = directory / "image.template"
    if gauge is not None:
        async with gauge.changing() as changed:
            path.write_bytes(b"y" * 8192)
            changed(allocated(path))
    else:
        path.write_bytes(b"y" * 8192)
    start = time.perf_counter()
    for _ in range(PER_ROUND):
        if gauge is None:
            await asyncio.to_thread(layout.capacity, QUOTA)
        else:
            await gauge.measure()
    elapsed = (time.perf_counter() - start) / PER_ROUND
    if gauge is not None:
        async with gauge.changing() as changed:
            freed = allocated(path)
            path.unlink()
            changed(-freed)
    else:
        path.unlink()
    directory.rmdir()
    return elapsed


async def main() -> None:
    for files in (1_000, 10_000):
        with tempfile.TemporaryDirectory(dir=os.getcwd()) as root:
            layout = Layout(Path(root))
            layout.prepare()
            populate(layout, files)
            gauge = Gauge(layout, QUOTA)
            await gauge.measure()  # the first walk
            walked = statistics.median([await round_trip(layout, None) for _ in range(ROUNDS)])
            tracked = statistics.median([await round_trip(layout, gauge) for _ in range(ROUNDS)])
            truth = layout.capacity(QUOTA).available
            measured = (await gauge.measure()).available
            assert measured == truth, (measured, truth)
            print(
                f"{files:>6} files: walk per measurement {walked * 1e3:8.2f} ms,"
                f" tracked {tracked * 1e3:6.3f} ms, ratio {walked / tracked:7.1f}x"
                f" (tracked total equals a fresh walk: {measured == truth})"
            )


if __name__ == "__main__":
    asyncio.run(main())
