"""Image row locks in one order: two replicas deleting backup storages that hold the same
images, at the same moment, both succeed. (The image locks used to be taken in the order the
references happened to be read; two such deletions could deadlock, and PostgreSQL aborted one
with INTERNAL_ERROR.)"""

from __future__ import annotations

import asyncio
import json
import uuid

from tests.conftest import Stack
from tests.helpers import queue_counts, wait_for

IMAGES = 150
DOWNLOADING = 30


async def insert_backup_storage(stack: Stack, name: str) -> str:
    bs_uuid = uuid.uuid4().hex
    # No heartbeat yet (last_heartbeat NULL): Connected, and never judged silent.
    await stack.db.execute(
        "INSERT INTO backup_storage (uuid, name, url, hostname, status, total_capacity,"
        " available_capacity) VALUES ($1, $2, $3, '127.0.0.1', 'Connected', 100, 100)",
        bs_uuid,
        name,
        f"/srv/{name}",
    )
    return bs_uuid


async def test_two_replicas_delete_backup_storages_holding_the_same_images(stack: Stack) -> None:
    stack.start_service()
    await wait_for(lambda: _two(stack), timeout=30)
    bs1 = await insert_backup_storage(stack, "bs1")
    bs2 = await insert_backup_storage(stack, "bs2")
    images = sorted(uuid.uuid4().hex for _ in range(IMAGES))
    for i, image in enumerate(images):
        ready = i >= DOWNLOADING
        await stack.db.execute(
            "INSERT INTO image (uuid, name, status, url, media_type, platform, format, size,"
            " md5_sum) VALUES ($1, $2, $3, 'http://h/x', 'RootVolumeTemplate', 'Linux', 'raw',"
            " $4, $5)",
            image,
            f"image{i}",
            "Ready" if ready else "Downloading",
            1 if ready else None,
            "0" * 32 if ready else None,
        )
        if not ready:  # an AddImage to both backup storages, waiting for its downloads
            await stack.db.execute(
                "INSERT INTO inbox (message_id, api, image_uuid) VALUES ($1, 'AddImage', $2)",
                f"add-{image}",
                image,
            )
    # The two backup storages list the images in opposite orders: bs1's references and ops
    # were written in ascending uuid order, bs2's in descending order.
    for bs_uuid, order in ((bs1, images), (bs2, images[::-1])):
        for image in order:
            ready = images.index(image) >= DOWNLOADING
            await stack.db.execute(
                "INSERT INTO image_backup_storage_ref (image_uuid, backup_storage_uuid,"
                " install_path, status) VALUES ($1, $2, $3, $4)",
                image,
                bs_uuid,
                f"/srv/{bs_uuid}/templates/{image}/x.template",
                "Ready" if ready else "Downloading",
            )
            if not ready:
                await stack.db.execute(
                    "INSERT INTO op (op_id, kind, message_id, image_uuid, backup_storage_uuid,"
                    " command) VALUES ($1, 'download', $2, $3, $4, '{}')",
                    uuid.uuid4(),
                    f"add-{image}",
                    image,
                    bs_uuid,
                )

    replies = await asyncio.gather(
        stack.call("DeleteBackupStorage", {"uuid": bs1}),
        stack.call("DeleteBackupStorage", {"uuid": bs2}),
    )

    assert replies == [{"success": True, "api": "DeleteBackupStorage"}] * 2, replies
    assert await stack.db.fetchval("SELECT count(*) FROM image") == 0
    assert await stack.db.fetchval("SELECT count(*) FROM image_backup_storage_ref") == 0
    assert await stack.db.fetchval("SELECT count(*) FROM backup_storage") == 0
    assert await stack.db.fetchval("SELECT count(*) FROM op WHERE status = 'Pending'") == 0
    # The AddImages waiting on the cancelled downloads were answered: no image was left.
    answered = await stack.db.fetch("SELECT reply FROM inbox WHERE api = 'AddImage'")
    assert len(answered) == DOWNLOADING
    assert all(json.loads(row["reply"])["error"]["code"] == "OPERATION_ERROR" for row in answered)
    for service in stack.services:
        assert "deadlock" not in service.log().lower()


async def _two(stack: Stack) -> bool:
    _, consumers = await queue_counts(stack.names.api)
    return consumers >= 2
