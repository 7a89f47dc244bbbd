"""PostgreSQL's planning and execution time of queries with many nested conditions (issue 8).

    python tests/benchmarks/bench_query_planning.py [--images 20000]

Builds a scratch database (dropped at the end) with IMAGES images, each with a backup storage
reference, a root volume and a user tag, then EXPLAIN ANALYZEs the QueryImage page statement
of 1, 4, 8, 16, 32 and 64 conditions on related inventories, compiled twice in the same run:
as every nested condition was compiled before (a semi-join each: the baseline) and as
`image_service.query` compiles them now (the fifth and later as subplans). Prints both and the
ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from typing import Any

import asyncpg

from image_service import query
from image_service.params import Query
from image_service.query import IMAGE, compile_query
from image_service.store import Store
from tests.helpers import fill_images

PG_URL = os.environ.get("TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432")
FIELDS = ["backupStorage.name", "volume.name", "backupStorageRef.installPath", "__userTag__"]


def conditions(count: int) -> list[dict[str, Any]]:
    return [
        {"name": FIELDS[i % len(FIELDS)], "op": "~=" if i % 2 else "!=", "value": f"%{i}%"}
        for i in range(count)
    ]


async def timings(db: asyncpg.Connection, count: int, joined: int) -> tuple[float, float]:
    """(planning, execution) in ms of the page statement with `joined` semi-joins at most."""
    saved = query.MAX_JOINED
    query.MAX_JOINED = joined
    try:
        compiled = compile_query(IMAGE, Query.model_validate({"conditions": conditions(count)}))
    finally:
        query.MAX_JOINED = saved
    rows = await db.fetch("EXPLAIN (ANALYZE, SUMMARY) " + compiled.select_sql, *compiled.args)
    lines = [r[0] for r in rows]
    planning = next(float(x.split()[2]) for x in lines if x.startswith("Planning Time"))
    execution = next(float(x.split()[2]) for x in lines if x.startswith("Execution Time"))
    return planning, execution


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20000)
    args = parser.parse_args()
    dbname = f"zbench_plan_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{PG_URL}/postgres")
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    try:
        store = await Store.open(f"{PG_URL}/{dbname}", min_size=1, max_size=1)
        await store.migrate()
        await store.close()
        db = await asyncpg.connect(f"{PG_URL}/{dbname}")
        try:
            await fill_images(db, args.images)
            print(f"{args.images:,} images; planning / execution of the page statement, ms")
            print(f"{'nested':>6}  {'all semi-joins (before)':>26}  {'as compiled now':>20}  ratio")
            for count in (1, 4, 8, 16, 32, 64):
                before = await timings(db, count, joined=count)
                after = await timings(db, count, joined=query.MAX_JOINED)
                ratio = (before[0] + before[1]) / max(after[0] + after[1], 1e-6)
                print(
                    f"{count:>6}  {before[0]:>12.1f} / {before[1]:>9.1f}  "
                    f"{after[0]:>9.1f} / {after[1]:>8.1f}  {ratio:6.1f}x"
                )
        finally:
            await db.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
