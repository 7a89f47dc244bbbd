"""Benchmark: HashingWriter alone, 1 GiB from memory to disk in 1 MiB pieces (md5 + sha256 +
write), median of 5 runs, wall and CPU time. Run from the checkout whose agent you measure:

    python tests/benchmarks/bench_hashing_writer.py

Not collected by pytest.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())

from backup_agent.transfer import HashingWriter


async def main() -> None:
    piece = os.urandom(1 << 20)
    d = tempfile.mkdtemp(dir=os.getcwd())
    times: list[tuple[float, float]] = []
    for run in range(5):
        p = Path(d) / f"f{run}"
        w = HashingWriter(p)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        for _ in range(1024):
            await w.write(piece)
        await w.finish()
        el = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        times.append((el, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime))
        p.unlink()
    shutil.rmtree(d, ignore_errors=True)
    times.sort()
    wall, cpu = times[2]
    print(f"{os.getcwd()}: 1 GiB, wall median {wall:.3f} s, CPU {cpu:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
