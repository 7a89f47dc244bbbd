"""Deleting, expunging and recovering images (contract section 10), through the real broker,
database, service replicas and agent processes: the global configuration and its command line,
the Direct, Delay and Never policies, the expunger (one replica and three), ExpungeImage,
RecoverImage, SyncImageSize, exact capacity accounting, template inheritance, and how all of it
meets DeleteImage, DeleteBackupStorage and a Disconnected holder."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

from image_service.globalconfig import OPTIONS
from image_service.protocol.agent import Capacity
from tests.conftest import Agent, EventRecorder, PgStack, Stack, wait_for
from tests.helpers import (
    BARRIER_BINDING,
    add_ready,
    error_of,
    events_delivered,
    image_cli,
    install_path,
    md5_of,
    publish_result,
    query_image,
    wait_disconnected,
    wait_no_files,
)

MiB = 1 << 20
QUOTA = 64 * MiB


# --- helpers ------------------------------------------------------------------------------


async def set_config(stack: Stack, name: str, value: Any) -> dict[str, Any]:
    reply = await stack.call(
        "UpdateGlobalConfig", {"category": "image", "name": name, "value": value}
    )
    assert reply["success"], reply
    inventory: dict[str, Any] = reply["inventory"]
    return inventory


async def config(stack: Stack) -> dict[str, str]:
    reply = await stack.call("QueryGlobalConfig", {"conditions": []})
    assert reply["success"], reply
    return {f"{c['category']}.{c['name']}": c["value"] for c in reply["inventories"]}


def refs_of(inventory: dict[str, Any]) -> dict[str, str]:
    return {r["backupStorageUuid"]: r["status"] for r in inventory["backupStorageRefs"]}


async def available(stack: Stack, agent: Agent) -> int:
    reply = await stack.call(
        "QueryBackupStorage", {"conditions": [{"name": "uuid", "op": "=", "value": agent.uuid}]}
    )
    return int(reply["inventories"][0]["availableCapacity"])


async def delete(stack: Stack, image_uuid: str, **params: Any) -> dict[str, Any]:
    reply = await stack.call("DeleteImage", {"uuid": image_uuid, **params})
    assert reply["success"], reply
    return reply


async def wait_gone(stack: Stack, image_uuid: str, timeout: float = 15) -> None:
    async def gone() -> bool:
        return await query_image(stack, image_uuid) is None

    await wait_for(gone, timeout)


def stored(agent: Agent, inventory: dict[str, Any]) -> Path:
    return install_path(agent, inventory["uuid"], inventory["name"])


async def delete_ops(stack: Stack) -> dict[tuple[str, str], int]:
    rows = await stack.db.fetch(
        "SELECT image_uuid, backup_storage_uuid, count(*) AS n FROM op"
        " WHERE kind = 'delete' GROUP BY 1, 2"
    )
    return {(r["image_uuid"], r["backup_storage_uuid"]): r["n"] for r in rows}


def journalled_deletes(agent: Agent) -> dict[str, int]:
    """How many distinct delete ops (by op id) the agent journalled, per image."""
    counts: dict[str, int] = {}
    for entry in (agent.root / ".agent" / "ops").glob("*.json"):
        command = json.loads(entry.read_text()).get("command") or {}
        if command.get("command") == "delete":
            counts[command["imageUuid"]] = counts.get(command["imageUuid"], 0) + 1
    return counts


# === global configuration ===================================================================


async def test_global_config_defaults_update_and_the_command_line(stack: Stack) -> None:
    reply = await stack.call("QueryGlobalConfig", {"conditions": [], "replyWithCount": True})
    assert reply["success"] and reply["total"] == 2, reply
    by_name = {c["name"]: c for c in reply["inventories"]}
    assert by_name["deletionPolicy"] == {
        "category": "image",
        "name": "deletionPolicy",
        "value": "Direct",
        "defaultValue": "Direct",
        "description": by_name["deletionPolicy"]["description"],
    }
    assert (by_name["expungePeriod"]["value"], by_name["expungePeriod"]["defaultValue"]) == (
        "86400",
        "86400",
    )
    assert "Delay" in by_name["deletionPolicy"]["description"]

    # The operator's command line, as the issue gives it.
    code, out, err = await image_cli(
        stack, "UpdateGlobalConfig", "category=image", "name=deletionPolicy", "value=Delay"
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed["success"] and printed["inventory"]["value"] == "Delay", printed
    code, _, err = await image_cli(
        stack, "UpdateGlobalConfig", "category=image", "name=expungePeriod", "value=3600"
    )
    assert code == 0, err
    code, out, err = await image_cli(
        stack, "QueryGlobalConfig", "category=image", "name=deletionPolicy"
    )
    assert code == 0, err
    assert [c["value"] for c in json.loads(out)["inventories"]] == ["Delay"]
    code, out, _ = await image_cli(
        stack, "UpdateGlobalConfig", "category=image", "name=deletionPolicy", "value=x"
    )
    assert code == 1
    assert json.loads(out)["error"]["code"] == "INVALID_ARGUMENT"

    # A number is taken as its text; the stored value is canonical.
    assert (await set_config(stack, "expungePeriod", 60))["value"] == "60"
    assert (await set_config(stack, "expungePeriod", " 0042 "))["value"] == "42"
    assert await config(stack) == {"image.deletionPolicy": "Delay", "image.expungePeriod": "42"}
    # Queries: every op of the language works on the options.
    reply = await stack.call(
        "QueryGlobalConfig",
        {"conditions": [{"name": "value", "op": "!=", "value": "Delay"}], "fields": ["name"]},
    )
    assert reply["inventories"] == [{"name": "expungePeriod"}]


async def test_global_config_refuses_bad_input_and_changes_nothing(stack: Stack) -> None:
    await set_config(stack, "deletionPolicy", "Never")
    before = await stack.db.fetch("SELECT * FROM global_config ORDER BY id")
    hostile: list[dict[str, Any]] = [
        {"category": "image", "name": "deletionPolicy", "value": "delay"},
        {"category": "image", "name": "deletionPolicy", "value": "Direct; DROP TABLE image"},
        {"category": "image", "name": "deletionPolicy", "value": ""},
        {"category": "image", "name": "deletionPolicy", "value": True},
        {"category": "image", "name": "deletionPolicy", "value": None},
        {"category": "image", "name": "deletionPolicy", "value": ["Delay"]},
        {"category": "image", "name": "deletionPolicy", "value": {"v": "Delay"}},
        {"category": "image", "name": "expungePeriod", "value": -1},
        {"category": "image", "name": "expungePeriod", "value": "1e3"},
        {"category": "image", "name": "expungePeriod", "value": "1.5"},
        {"category": "image", "name": "expungePeriod", "value": "٣"},  # an Arabic-Indic 3
        {"category": "image", "name": "expungePeriod", "value": 2**31},
        {"category": "image", "name": "expungePeriod", "value": 2**70},
        {"category": "image", "name": "expungePeriod", "value": "9" * 5000},
        {"category": "image", "name": "expungePeriod", "value": "60\x00"},
        {"category": "image", "name": "nosuch", "value": "1"},
        {"category": "Image", "name": "deletionPolicy", "value": "Delay"},
        {"category": "image' OR '1'='1", "name": "deletionPolicy", "value": "Delay"},
        {"category": "image", "name": "deletionPolicy"},
        {"category": "image", "name": "deletionPolicy", "value": "Delay", "extra": 1},
    ]
    for params in hostile:
        reply = await stack.call("UpdateGlobalConfig", params)
        assert error_of(reply)["code"] == "INVALID_ARGUMENT", (params, reply)
    bad_query = await stack.call(
        "QueryGlobalConfig", {"conditions": [{"name": "id", "op": "=", "value": "x"}]}
    )
    assert error_of(bad_query)["code"] == "INVALID_ARGUMENT"
    assert await stack.db.fetch("SELECT * FROM global_config ORDER BY id") == before


# === the policies ==========================================================================


async def test_direct_is_the_default_and_removes_files_at_once(stack: Stack) -> None:
    agent = await stack.start_agent("bs0", "--capacity", str(QUOTA))
    inventory = await add_ready(stack, [agent], name="direct")
    assert stored(agent, inventory).exists()
    reply = await delete(stack, inventory["uuid"])
    assert "inventory" not in reply, reply
    assert await query_image(stack, inventory["uuid"]) is None
    assert agent.files() == []
    # The delete's result carried the capacity: the quota is whole again at the reply.
    assert await available(stack, agent) == QUOTA


async def test_delay_keeps_the_files_then_expunges_after_the_period(
    stack: Stack, events_recorder: Any
) -> None:
    recorder: EventRecorder = events_recorder()
    await stack.client.subscribe(["image.#", BARRIER_BINDING], recorder)
    agents = [await stack.start_agent(f"bs{i}") for i in range(2)]
    await set_config(stack, "deletionPolicy", "Delay")
    inventory = await add_ready(stack, agents, name="delayed")
    image_uuid = inventory["uuid"]
    files = [stored(a, inventory) for a in agents]

    reply = await delete(stack, image_uuid)
    # The reply shows the image as left: Deleted, with its references, whose files stay.
    assert reply["inventory"]["status"] == "Deleted"
    assert refs_of(reply["inventory"]) == {a.uuid: "Deleted" for a in agents}
    assert all(f.exists() for f in files)
    listed = await stack.call(
        "QueryImage", {"conditions": [{"name": "status", "op": "=", "value": "Deleted"}]}
    )
    assert [i["uuid"] for i in listed["inventories"]] == [image_uuid]
    by_ref = await stack.call(
        "QueryImage",
        {"conditions": [{"name": "backupStorageRef.status", "op": "=", "value": "Deleted"}]},
    )
    assert [i["uuid"] for i in by_ref["inventories"]] == [image_uuid]

    # A period of 1 s, set after the deletion: it applies at once (the expunger is woken).
    await set_config(stack, "expungePeriod", 1)
    await wait_gone(stack, image_uuid)
    await wait_no_files(*agents)
    await events_delivered(stack, recorder)
    statuses = [(e["oldStatus"], e["newStatus"]) for e in recorder.of(f"image.status.{image_uuid}")]
    assert statuses == [(None, "Downloading"), ("Downloading", "Ready"), ("Ready", "Deleted")]
    deleted = recorder.of(f"image.deleted.{image_uuid}")
    assert len(deleted) == 1 and deleted[0]["inventory"]["status"] == "Deleted"
    assert set((await delete_ops(stack)).values()) == {1}


async def test_never_then_delay_expunges_what_never_kept(stack: Stack) -> None:
    agent = await stack.start_agent("bs0")
    await set_config(stack, "deletionPolicy", "Never")
    await set_config(stack, "expungePeriod", 1)
    kept = await add_ready(stack, [agent], name="kept")
    await delete(stack, kept["uuid"])
    # Under Never, twice the period passes and nothing is expunged (a Delay expunger would
    # have done it by then: the deletion woke it, and the period is 1 s).
    marker = await add_ready(stack, [agent], name="marker")
    deleted_at = await stack.db.fetchval(
        "SELECT deleted_at FROM image_backup_storage_ref WHERE image_uuid = $1", kept["uuid"]
    )

    async def two_periods_old() -> bool:
        age = await stack.db.fetchval(
            "SELECT extract(epoch FROM now() - $1::timestamptz)", deleted_at
        )
        return float(age) > 2.0

    await wait_for(two_periods_old, timeout=10)
    assert (await query_image(stack, kept["uuid"]) or {}).get("status") == "Deleted"
    assert stored(agent, kept).exists()
    assert (await query_image(stack, marker["uuid"]) or {}).get("status") == "Ready"

    await set_config(stack, "deletionPolicy", "Delay")
    await wait_gone(stack, kept["uuid"])
    assert not stored(agent, kept).exists()
    assert stored(agent, marker).exists()


# === ExpungeImage and RecoverImage =========================================================


async def test_expunge_image_on_some_then_all_backup_storages(stack: Stack) -> None:
    agents = [await stack.start_agent(f"bs{i}", "--capacity", str(QUOTA)) for i in range(3)]
    await set_config(stack, "deletionPolicy", "Never")
    inventory = await add_ready(stack, agents, name="three")
    image_uuid = inventory["uuid"]
    size = inventory["actualSize"]
    assert [await available(stack, a) for a in agents] == [QUOTA - size] * 3

    # Only one reference deleted: the image stays Ready; a Ready reference cannot be expunged.
    reply = await delete(stack, image_uuid, backupStorageUuids=[agents[0].uuid])
    assert reply["inventory"]["status"] == "Ready"
    refused = await stack.call(
        "ExpungeImage", {"uuid": image_uuid, "backupStorageUuids": [agents[1].uuid]}
    )
    assert error_of(refused)["code"] == "INVALID_STATE"
    await delete(stack, image_uuid)  # the rest
    assert [await available(stack, a) for a in agents] == [QUOTA - size] * 3, "Never keeps them"

    reply = await stack.call(
        "ExpungeImage", {"uuid": image_uuid, "backupStorageUuids": [agents[0].uuid]}
    )
    assert reply["success"], reply
    assert refs_of(reply["inventory"]) == {agents[1].uuid: "Deleted", agents[2].uuid: "Deleted"}
    assert reply["inventory"]["status"] == "Deleted"
    assert not stored(agents[0], inventory).exists()
    assert stored(agents[1], inventory).exists()
    # Exact: the expunge gave back exactly the image's actualSize, at the reply.
    assert await available(stack, agents[0]) == QUOTA
    assert await available(stack, agents[1]) == QUOTA - size

    reply = await stack.call("ExpungeImage", {"uuid": image_uuid})
    assert reply["success"] and "inventory" not in reply, reply
    assert await query_image(stack, image_uuid) is None
    assert all(a.files() == [] for a in agents)
    assert [await available(stack, a) for a in agents] == [QUOTA] * 3
    # Expunging what is gone is RESOURCE_NOT_FOUND (nothing to expunge, unlike a deletion).
    gone = await stack.call("ExpungeImage", {"uuid": image_uuid})
    assert error_of(gone)["code"] == "RESOURCE_NOT_FOUND"


async def test_expunge_and_recover_refuse_what_is_not_theirs(stack: Stack) -> None:
    agent = await stack.start_agent("bs0")
    other = await stack.start_agent("bs1")
    inventory = await add_ready(stack, [agent], name="ready")
    image_uuid = inventory["uuid"]
    for api in ("ExpungeImage", "RecoverImage"):
        not_deleted = await stack.call(api, {"uuid": image_uuid})
        assert error_of(not_deleted)["code"] == "INVALID_STATE", not_deleted
        elsewhere = await stack.call(api, {"uuid": image_uuid, "backupStorageUuids": [other.uuid]})
        assert error_of(elsewhere)["code"] == "RESOURCE_NOT_FOUND", elsewhere
        unknown = await stack.call(api, {"uuid": uuid.uuid4().hex})
        assert error_of(unknown)["code"] == "RESOURCE_NOT_FOUND"
        for bad in (
            {"uuid": "../../etc/passwd"},
            {"uuid": image_uuid.upper()},
            {"uuid": image_uuid, "backupStorageUuids": []},
            {"uuid": image_uuid, "backupStorageUuids": "all"},
            {"uuid": image_uuid, "deleteMode": "Enforcing"},
        ):
            reply = await stack.call(api, bad)
            assert error_of(reply)["code"] == "INVALID_ARGUMENT", (api, bad, reply)
    after = await query_image(stack, image_uuid)
    assert after is not None and after["status"] == "Ready"
    assert stored(agent, inventory).exists()


async def test_recover_on_some_then_all_backup_storages(stack: Stack) -> None:
    agents = [await stack.start_agent(f"bs{i}") for i in range(2)]
    await set_config(stack, "deletionPolicy", "Never")
    inventory = await add_ready(stack, agents, name="precious")
    image_uuid = inventory["uuid"]
    await delete(stack, image_uuid)
    refused = await stack.call("GetImageSource", {"uuid": image_uuid})
    assert error_of(refused)["code"] == "INVALID_STATE"

    reply = await stack.call(
        "RecoverImage", {"uuid": image_uuid, "backupStorageUuids": [agents[0].uuid]}
    )
    assert reply["success"], reply
    recovered = reply["inventory"]
    assert recovered["status"] == "Ready"
    assert refs_of(recovered) == {agents[0].uuid: "Ready", agents[1].uuid: "Deleted"}
    assert (recovered["md5Sum"], recovered["size"]) == (inventory["md5Sum"], inventory["size"])
    source = await stack.call("GetImageSource", {"uuid": image_uuid})
    assert [s["backupStorageUuid"] for s in source["sources"]] == [agents[0].uuid]

    reply = await stack.call("RecoverImage", {"uuid": image_uuid})
    assert reply["success"], reply
    assert refs_of(reply["inventory"]) == {a.uuid: "Ready" for a in agents}
    deleted_at = await stack.db.fetch(
        "SELECT deleted_at, ref_op FROM image_backup_storage_ref WHERE image_uuid = $1", image_uuid
    )
    assert all(r["deleted_at"] is None and r["ref_op"] is None for r in deleted_at)
    assert all(md5_of(stored(a, inventory)) == inventory["md5Sum"] for a in agents)


async def test_recover_reports_a_removed_file_and_keeps_a_changed_one(stack: Stack) -> None:
    agents = [await stack.start_agent(f"bs{i}") for i in range(3)]
    await set_config(stack, "deletionPolicy", "Never")
    inventory = await add_ready(stack, agents, name="victim")
    image_uuid = inventory["uuid"]
    await delete(stack, image_uuid)
    # Someone removed the file on bs1, and rewrote the one on bs2 with as many other bytes.
    stored(agents[1], inventory).unlink()
    changed = stored(agents[2], inventory)
    changed.write_bytes(os.urandom(changed.stat().st_size))

    reply = await stack.call("RecoverImage", {"uuid": image_uuid})
    assert reply["success"], reply
    causes = {c["backupStorageUuid"]: c for c in reply["causes"]}
    assert set(causes) == {agents[1].uuid, agents[2].uuid}
    assert causes[agents[1].uuid]["code"] == "RESOURCE_NOT_FOUND"
    assert causes[agents[2].uuid]["code"] == "CHECKSUM_MISMATCH"
    assert inventory["md5Sum"] in causes[agents[2].uuid]["details"]
    # The gone file's reference is removed; the changed one stays Deleted (its file exists).
    assert refs_of(reply["inventory"]) == {agents[0].uuid: "Ready", agents[2].uuid: "Deleted"}
    assert reply["inventory"]["status"] == "Ready"

    # When no file is left whole, the recovery fails, and an image on no storage is gone.
    await delete(stack, image_uuid)
    stored(agents[0], inventory).unlink()
    changed.unlink()
    reply = await stack.call("RecoverImage", {"uuid": image_uuid})
    error = error_of(reply)
    assert error["code"] == "OPERATION_ERROR"
    assert {c["code"] for c in error["causes"]} == {"RESOURCE_NOT_FOUND"}
    assert await query_image(stack, image_uuid) is None


# === interplay with the rest ===============================================================


async def test_a_deleted_image_is_refused_and_deleting_it_again_changes_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    vroot = tmp_path / "vols"
    vroot.mkdir()
    agent = await stack.start_agent("bs0", "--volume-root", str(vroot))
    await set_config(stack, "deletionPolicy", "Delay")
    inventory = await add_ready(stack, [agent], name="gone", platform="Windows")
    image_uuid = inventory["uuid"]
    await delete(stack, image_uuid)
    before = await stack.db.fetch(
        "SELECT * FROM image_backup_storage_ref WHERE image_uuid = $1", image_uuid
    )
    for api, params in (
        ("GetImageSource", {"uuid": image_uuid}),
        ("ChangeImageState", {"uuid": image_uuid, "stateEvent": "disable"}),
        ("UpdateImage", {"uuid": image_uuid, "name": "renamed"}),
        # A Deleted file is not measured before RecoverImage has checked it.
        ("SyncImageSize", {"uuid": image_uuid}),
    ):
        reply = await stack.call(api, params)
        assert error_of(reply)["code"] == "INVALID_STATE", (api, reply)
    # A template of a volume made from the Deleted image is refused too.
    volume = vroot / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(volume), "1M"], check=True)
    vol = await publish_volume(stack, f"file://{volume}", root_image_uuid=image_uuid)
    reply = await stack.call(
        "CreateRootVolumeTemplateFromRootVolume", {"name": "tpl", "rootVolumeUuid": vol}
    )
    assert error_of(reply)["code"] == "INVALID_STATE", reply
    # Deleting it again, in either mode, is a success that changes nothing.
    for mode in ("Permissive", "Enforcing"):
        again = await delete(stack, image_uuid, deleteMode=mode)
        assert again["inventory"]["status"] == "Deleted"
    after = await stack.db.fetch(
        "SELECT * FROM image_backup_storage_ref WHERE image_uuid = $1", image_uuid
    )
    assert after == before
    assert stored(agent, inventory).exists()
    row = await stack.image_row(image_uuid)
    assert row is not None and (row["name"], row["state"]) == ("gone", "Enabled")


async def test_enforcing_under_delay_still_cancels_downloads(stack: Stack) -> None:
    agents = [await stack.start_agent(f"bs{i}") for i in range(2)]
    await set_config(stack, "deletionPolicy", "Delay")
    url, _ = stack.http.add("slow.raw", os.urandom(4 * MiB))
    slow = url.replace("/files/", "/slow/") + "?rate=262144"
    image_uuid = uuid.uuid4().hex
    adding = asyncio.ensure_future(
        stack.add_image(slow, agents, name="slow", resourceUuid=image_uuid)
    )

    async def downloading() -> bool:
        inv = await query_image(stack, image_uuid)
        return inv is not None and inv["status"] == "Downloading"

    await wait_for(downloading, timeout=10)
    permissive = await stack.call("DeleteImage", {"uuid": image_uuid})
    assert error_of(permissive)["code"] == "INVALID_STATE"
    reply = await delete(stack, image_uuid, deleteMode="Enforcing")
    assert "inventory" not in reply, reply  # no reference was stored: nothing is kept
    added = await adding
    assert error_of(added)["code"] in ("DOWNLOAD_FAILED", "OPERATION_ERROR"), added
    assert await query_image(stack, image_uuid) is None
    await wait_no_files(*agents)


async def test_delete_backup_storage_removes_deleted_references(stack: Stack) -> None:
    agents = [await stack.start_agent(f"bs{i}") for i in range(2)]
    await set_config(stack, "deletionPolicy", "Delay")
    inventory = await add_ready(stack, agents, name="both")
    image_uuid = inventory["uuid"]
    await delete(stack, image_uuid, backupStorageUuids=[agents[0].uuid])
    reply = await stack.call("DeleteBackupStorage", {"uuid": agents[1].uuid})
    assert reply["success"], reply
    # Left with only its Deleted reference, the image is Deleted.
    left = await query_image(stack, image_uuid)
    assert left is not None and left["status"] == "Deleted"
    assert refs_of(left) == {agents[0].uuid: "Deleted"}
    reply = await stack.call("DeleteBackupStorage", {"uuid": agents[0].uuid})
    assert reply["success"], reply
    assert await query_image(stack, image_uuid) is None


async def test_a_disconnected_holder_defers_the_expunge_until_it_returns(stack: Stack) -> None:
    agents = [await stack.start_agent(f"bs{i}") for i in range(2)]
    await set_config(stack, "deletionPolicy", "Never")
    inventory = await add_ready(stack, agents, name="away")
    image_uuid = inventory["uuid"]
    await delete(stack, image_uuid)
    away = agents[1]
    away.proc.kill()
    await wait_disconnected(stack, away)

    reply = await stack.call("ExpungeImage", {"uuid": image_uuid})
    assert reply["success"], reply
    # The reference on the absent holder stays until its file is gone.
    assert refs_of(reply["inventory"]) == {away.uuid: "Deleted"}
    assert [c["backupStorageUuid"] for c in reply["causes"]] == [away.uuid]
    assert not stored(agents[0], inventory).exists()
    assert stored(away, inventory).exists()
    again = await stack.call("ExpungeImage", {"uuid": image_uuid})
    assert error_of(again)["code"] == "INVALID_STATE"

    stack.restart(away.proc)
    await stack.wait_connected(away)
    await wait_gone(stack, image_uuid, timeout=20)
    assert not stored(away, inventory).exists()
    assert set((await delete_ops(stack)).values()) == {1}


async def test_an_expunge_the_agent_cannot_do_is_reported_and_tried_again(stack: Stack) -> None:
    agent = await stack.start_agent("bs0")
    await set_config(stack, "deletionPolicy", "Never")
    inventory = await add_ready(stack, [agent], name="stuck")
    image_uuid = inventory["uuid"]
    await delete(stack, image_uuid)
    # Something the agent cannot unlink now: a directory where the file was.
    path = stored(agent, inventory)
    path.unlink()
    path.mkdir()
    (path / "blocker").write_bytes(b"x")

    reply = await stack.call("ExpungeImage", {"uuid": image_uuid})
    assert reply["success"], reply
    assert refs_of(reply["inventory"]) == {agent.uuid: "Deleted"}, "kept until it is gone"
    [cause] = reply["causes"]
    assert (cause["backupStorageUuid"], cause["code"]) == (agent.uuid, "OPERATION_ERROR")
    assert "tries again" in cause["details"]

    # Once the obstacle is gone, the delete the service re-sends is run again by the agent
    # (not answered with the failure it journalled), and the expunge completes.
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
    await wait_gone(stack, image_uuid, timeout=20)
    assert set((await delete_ops(stack)).values()) == {1}
    assert not (agent.root / "templates" / image_uuid).exists()


# === capacity ==============================================================================


async def test_capacity_is_exact_and_current_at_every_reply(stack: Stack) -> None:
    """With a quota and heartbeats only every 30 s, the figures a QueryBackupStorage shows
    right after each reply come from the results of the ops: exact, at once."""
    agent = await stack.start_agent("bs0", "--capacity", str(QUOTA), "--heartbeat-interval", "30")
    assert await available(stack, agent) == QUOTA
    await set_config(stack, "deletionPolicy", "Delay")
    first = await add_ready(stack, [agent], name="first")
    assert first["actualSize"] > 0
    assert await available(stack, agent) == QUOTA - first["actualSize"]
    second = await add_ready(stack, [agent], name="second")
    used = first["actualSize"] + second["actualSize"]
    assert await available(stack, agent) == QUOTA - used

    await delete(stack, first["uuid"])  # Delay: nothing given back
    assert await available(stack, agent) == QUOTA - used
    reply = await stack.call("ExpungeImage", {"uuid": first["uuid"]})
    assert reply["success"], reply
    assert await available(stack, agent) == QUOTA - second["actualSize"]

    await set_config(stack, "deletionPolicy", "Direct")
    await delete(stack, second["uuid"])
    assert await available(stack, agent) == QUOTA
    total = await stack.db.fetchval(
        "SELECT total_capacity FROM backup_storage WHERE uuid = $1", agent.uuid
    )
    assert total == QUOTA


async def test_sync_image_size_measures_the_file_again(stack: Stack) -> None:
    agent = await stack.start_agent("bs0")
    inventory = await add_ready(stack, [agent], name="measured")
    image_uuid = inventory["uuid"]
    await stack.db.execute(
        "UPDATE image SET actual_size = 2, virtual_size = 3 WHERE uuid = $1", image_uuid
    )
    reply = await stack.call("SyncImageSize", {"uuid": image_uuid})
    assert reply["success"], reply
    synced = reply["inventory"]
    assert (synced["size"], synced["actualSize"], synced["virtualSize"]) == (
        inventory["size"],
        inventory["actualSize"],
        inventory["virtualSize"],
    )
    # A file of another size than the image's (its md5 pins it) is not the image's file:
    # nothing is recorded from it.
    path = stored(agent, inventory)
    with path.open("ab") as f:
        f.write(b"appended by someone")
    reply = await stack.call("SyncImageSize", {"uuid": image_uuid})
    assert error_of(reply)["code"] == "CHECKSUM_MISMATCH", reply
    row = await stack.image_row(image_uuid)
    assert row is not None
    assert (row["size"], row["actual_size"]) == (inventory["size"], inventory["actualSize"])
    agent.proc.kill()
    await wait_disconnected(stack, agent)
    reply = await stack.call("SyncImageSize", {"uuid": image_uuid})
    assert error_of(reply)["code"] == "NO_BACKUP_STORAGE"
    reply = await stack.call("SyncImageSize", {"uuid": uuid.uuid4().hex})
    assert error_of(reply)["code"] == "RESOURCE_NOT_FOUND"


# === templates =============================================================================


async def publish_volume(stack: Stack, path: str, *, root_image_uuid: str | None) -> str:
    vol = uuid.uuid4().hex
    body = {
        "uuid": vol,
        "name": f"vol-{vol[:6]}",
        "type": "Root",
        "vmInstanceUuid": uuid.uuid4().hex,
        "rootImageUuid": root_image_uuid,
        "primaryStorageUuid": uuid.uuid4().hex,
        "installPath": path,
        "format": "qcow2",
        "size": MiB,
    }
    await stack.publish_event(f"volume.created.{vol}", body)

    async def known() -> bool:
        row = await stack.db.fetchrow("SELECT uuid FROM volume WHERE uuid = $1", vol)
        return row is not None

    await wait_for(known, timeout=10)
    return vol


async def test_templates_inherit_platform_and_guest_os_type(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    vroot.mkdir()
    agent = await stack.start_agent("bs0", "--volume-root", str(vroot))
    root_image = await add_ready(
        stack, [agent], name="win", platform="Windows", guestOsType="Windows Server 2019"
    )
    volume = vroot / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(volume), "1M"], check=True)
    vol = await publish_volume(stack, f"file://{volume}", root_image_uuid=root_image["uuid"])

    inherited = await stack.call(
        "CreateRootVolumeTemplateFromRootVolume", {"name": "tpl", "rootVolumeUuid": vol}
    )
    assert inherited["success"], inherited
    assert (inherited["inventory"]["platform"], inherited["inventory"]["guestOsType"]) == (
        "Windows",
        "Windows Server 2019",
    )
    given = await stack.call(
        "CreateRootVolumeTemplateFromRootVolume",
        {"name": "tpl2", "rootVolumeUuid": vol, "platform": "Linux", "guestOsType": "Debian 12"},
    )
    assert (given["inventory"]["platform"], given["inventory"]["guestOsType"]) == (
        "Linux",
        "Debian 12",
    )
    partly = await stack.call(
        "CreateRootVolumeTemplateFromRootVolume",
        {"name": "tpl3", "rootVolumeUuid": vol, "guestOsType": "Windows 11"},
    )
    assert (partly["inventory"]["platform"], partly["inventory"]["guestOsType"]) == (
        "Windows",
        "Windows 11",
    )
    orphan = await publish_volume(stack, f"file://{volume}", root_image_uuid=None)
    plain = await stack.call(
        "CreateRootVolumeTemplateFromRootVolume", {"name": "tpl4", "rootVolumeUuid": orphan}
    )
    assert (plain["inventory"]["platform"], plain["inventory"]["guestOsType"]) == ("Linux", None)


# === several replicas ======================================================================


async def delete_all_under_never(stack: Stack, agents: list[Agent], count: int) -> list[str]:
    await set_config(stack, "deletionPolicy", "Never")
    await set_config(stack, "expungePeriod", 0)
    images = [(await add_ready(stack, agents, name=f"img{i}"))["uuid"] for i in range(count)]
    for image_uuid in images:
        await delete(stack, image_uuid)
    return images


async def test_three_replicas_expunge_each_reference_exactly_once(
    stack: Stack, events_recorder: Any
) -> None:
    recorder: EventRecorder = events_recorder()
    await stack.client.subscribe(["image.deleted.*", BARRIER_BINDING], recorder)
    stack.start_service()
    stack.start_service()
    agents = [await stack.start_agent(f"bs{i}") for i in range(2)]
    images = await delete_all_under_never(stack, agents, 12)
    # The deletions went to whichever replica took each: every one of them applied Never.
    rows = await stack.db.fetch("SELECT DISTINCT status::text FROM image_backup_storage_ref")
    assert [r[0] for r in rows] == ["Deleted"]
    assert all(len(a.files()) == len(images) for a in agents)

    # Every replica's expunger wakes on the same NOTIFY and races for the same references.
    await set_config(stack, "deletionPolicy", "Delay")
    for image_uuid in images:
        await wait_gone(stack, image_uuid, timeout=30)
    await wait_no_files(*agents)
    ops = await delete_ops(stack)
    assert set(ops) == {(i, a.uuid) for i in images for a in agents}
    assert set(ops.values()) == {1}, ops
    for agent in agents:
        assert journalled_deletes(agent) == dict.fromkeys(images, 1)
    await events_delivered(stack, recorder)
    assert sorted(k.rsplit(".", 1)[1] for k, _ in recorder.events if "deleted" in k) == sorted(
        images
    )
    assert all(p.running for p in stack.services)


async def test_a_replica_killed_mid_expunge_loses_nothing(stack: Stack) -> None:
    stack.start_service()
    agent = await stack.start_agent("bs0", "--capacity", str(QUOTA))
    images = await delete_all_under_never(stack, [agent], 8)
    assert await available(stack, agent) < QUOTA
    # The agent is frozen: the expunges are claimed, their commands sent, no result comes.
    assert agent.proc.process is not None
    os.kill(agent.proc.process.pid, signal.SIGSTOP)
    try:
        await set_config(stack, "deletionPolicy", "Delay")

        async def all_claimed() -> bool:
            claimed = await stack.db.fetchval(
                "SELECT count(*) FROM image_backup_storage_ref WHERE ref_op IS NOT NULL"
            )
            return int(claimed) == len(images)

        await wait_for(all_claimed, timeout=15)
        # Kill -9 the replica that claimed them (the first that logged it).
        claimer = next((p for p in stack.services if "expunging" in p.log()), stack.services[0])
        claimer.kill()
    finally:
        os.kill(agent.proc.process.pid, signal.SIGCONT)
    for image_uuid in images:
        await wait_gone(stack, image_uuid, timeout=30)
    await wait_no_files(agent)
    assert set((await delete_ops(stack)).values()) == {1}
    assert journalled_deletes(agent) == dict.fromkeys(images, 1)
    assert await available(stack, agent) == QUOTA
    survivors = [p for p in stack.services if p.running]
    assert survivors, "one replica must be left"


async def listen_backends(stack: Stack) -> list[int]:
    rows = await stack.db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN%'"
    )
    return sorted(r["pid"] for r in rows)


async def test_a_cut_listen_connection_is_made_again(stack: Stack) -> None:
    agent = await stack.start_agent("bs0")
    await set_config(stack, "deletionPolicy", "Never")
    await set_config(stack, "expungePeriod", 0)
    inventory = await add_ready(stack, [agent], name="heard")
    await delete(stack, inventory["uuid"])
    before = await wait_for(lambda: listen_backends(stack), timeout=10)
    cut = await stack.db.fetch(
        "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", before
    )
    assert all(r[0] for r in cut)

    async def listening_again() -> list[int]:
        now = await listen_backends(stack)
        return now if now and not set(now) & set(before) else []

    await wait_for(listening_again, timeout=15)
    # The expunger, asleep for up to 60 s under Never, hears the switch on the new connection.
    await set_config(stack, "deletionPolicy", "Delay")
    await wait_gone(stack, inventory["uuid"], timeout=10)
    assert stack.services[0].running


async def test_a_replayed_download_result_keeps_the_file_of_a_deleted_reference(
    stack: Stack,
) -> None:
    """An agent publishes a result again after a restart, and the service asks again after
    an outage: a success that arrives once more after a Delay deletion must leave the kept
    file alone (it is a Deleted reference's, not a stray one)."""
    agent = await stack.start_agent("bs0")
    await set_config(stack, "deletionPolicy", "Delay")
    inventory = await add_ready(stack, [agent], name="kept")
    image_uuid = inventory["uuid"]
    original = await stack.db.fetchval(
        "SELECT result::text FROM op WHERE image_uuid = $1 AND kind = 'download'", image_uuid
    )
    await delete(stack, image_uuid)
    await publish_result(stack.names, agent.uuid, original.encode())

    # The replay has been handled once a delete op shows up, or once a later result has been
    # applied after it: a second image's AddImage is that marker.
    await add_ready(stack, [agent], name="marker")
    assert (
        await stack.db.fetchval(
            "SELECT count(*) FROM op WHERE kind = 'delete' AND image_uuid = $1", image_uuid
        )
        == 0
    )
    assert stored(agent, inventory).exists()
    reply = await stack.call("RecoverImage", {"uuid": image_uuid})
    assert reply["success"] and reply["inventory"]["status"] == "Ready", reply


async def test_ops_committed_after_their_backup_storage_went_away_are_released(
    stack: Stack,
) -> None:
    """A RecoverImage that saw its holder Connected, committed just after the holder was
    handled as Disconnected (or deleted), would wait for good: the monitor releases it. The
    race is set up by changing the backup storage's row behind the service's back, as the
    other transaction would have."""
    agents = [await stack.start_agent(f"bs{i}", "--heartbeat-interval", "30") for i in range(2)]
    await set_config(stack, "deletionPolicy", "Never")
    for agent, how in zip(agents, ("Disconnected", "deleted"), strict=True):
        inventory = await add_ready(stack, [agent], name=f"stranded-{how}")
        await delete(stack, inventory["uuid"])
        assert agent.proc.process is not None
        os.kill(agent.proc.process.pid, signal.SIGSTOP)
        try:
            recovering = asyncio.ensure_future(
                stack.call("RecoverImage", {"uuid": inventory["uuid"]}, timeout=30)
            )

            async def pending() -> bool:
                n = await stack.db.fetchval(
                    "SELECT count(*) FROM op WHERE kind = 'inspect' AND status = 'Pending'"
                )
                return bool(n)

            await wait_for(pending, timeout=10)
            if how == "Disconnected":
                await stack.db.execute(
                    "UPDATE backup_storage SET status = 'Disconnected' WHERE uuid = $1", agent.uuid
                )
                expected = "INVALID_STATE"
            else:
                await stack.db.execute("DELETE FROM backup_storage WHERE uuid = $1", agent.uuid)
                expected = "OPERATION_ERROR"
            error = error_of(await recovering)
            assert error["code"] == expected, error
        finally:
            os.kill(agent.proc.process.pid, signal.SIGCONT)
    rows = await stack.db.fetch(
        "SELECT ref_op FROM image_backup_storage_ref WHERE ref_op IS NOT NULL"
    )
    assert rows == [], "a released recovery leaves no claim behind"


# === the store, without processes ==========================================================


async def test_the_options_in_the_database_are_those_of_the_code(pg: PgStack) -> None:
    rows = await pg.db.fetch("SELECT * FROM global_config")
    assert {
        r["id"]: (r["category"], r["name"], r["value"], r["default_value"], r["description"])
        for r in rows
    } == {o.id: (o.category, o.name, o.default, o.default, o.description) for o in OPTIONS.values()}


async def test_only_a_newer_capacity_measurement_counts(pg: PgStack) -> None:
    bs = uuid.uuid4().hex

    async def beat(available: int, seq: int | None) -> None:
        async with pg.store.transaction() as tx:
            assert (
                await tx.backup_storages.heartbeat(
                    uuid=bs,
                    name="bs",
                    url="/srv/bs",
                    hostname="h",
                    total_capacity=1000,
                    available_capacity=available,
                    heartbeat_interval=1.0,
                    agent_user="agent",
                    capacity_seq=seq,
                )
                is not None
            )

    async def record(available: int, seq: int) -> bool:
        async with pg.store.transaction() as tx:
            return await tx.backup_storages.record_capacity(bs, Capacity(1000, available, seq))

    async def current() -> int:
        value = await pg.db.fetchval(
            "SELECT available_capacity FROM backup_storage WHERE uuid = $1", bs
        )
        return int(value)

    await beat(900, 10)
    assert not await record(100, 5) and await current() == 900, "an older result"
    assert await record(800, 11) and await current() == 800
    await beat(950, 9)  # a heartbeat measured before the result, delivered after it
    assert await current() == 800
    await beat(700, 12)
    assert await current() == 700
    await beat(600, None)  # an agent from before section 10: its heartbeats always count
    assert await current() == 600


# === forged results ========================================================================


async def test_forged_results_neither_recover_nor_move_capacity(stack: Stack) -> None:
    """Results that pass the broker's checks (sent as the agent's own broker user, as a stolen
    agent password could) still recover nothing whose bytes do not match, and a capacity
    counts only on the result of a real op of that backup storage."""
    agent = await stack.start_agent("bs0", "--capacity", str(QUOTA), "--heartbeat-interval", "30")
    await set_config(stack, "deletionPolicy", "Never")
    inventory = await add_ready(stack, [agent], name="target")
    image_uuid = inventory["uuid"]
    await delete(stack, image_uuid)
    expected = QUOTA - inventory["actualSize"]
    assert await available(stack, agent) == expected
    unknown_op = {
        "opId": str(uuid.uuid4()),
        "backupStorageUuid": agent.uuid,
        "success": True,
        "totalCapacity": 10**15,
        "availableCapacity": 10**15,
        "capacitySeq": 2**62,
    }
    await publish_result(stack.names, agent.uuid, json.dumps(unknown_op).encode())

    assert agent.proc.process is not None
    pid = agent.proc.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        recovering = asyncio.ensure_future(stack.call("RecoverImage", {"uuid": image_uuid}))

        async def inspect_op() -> str | None:
            value = await stack.db.fetchval(
                "SELECT op_id::text FROM op WHERE kind = 'inspect' AND status = 'Pending'"
            )
            return str(value) if value is not None else None

        op_id = await wait_for(inspect_op, timeout=10)
        forged = {
            "opId": op_id,
            "backupStorageUuid": agent.uuid,
            "success": True,
            "inspected": {
                "size": inventory["size"],
                "actualSize": inventory["actualSize"],
                "virtualSize": inventory["virtualSize"],
                "md5Sum": "0" * 32,
                "sha256Sum": "0" * 64,
            },
        }
        await publish_result(stack.names, agent.uuid, json.dumps(forged).encode())
        error = error_of(await recovering)
        assert error["code"] == "CHECKSUM_MISMATCH", error
        assert "0" * 32 in error["details"] and inventory["md5Sum"] in error["details"]
    finally:
        os.kill(pid, signal.SIGCONT)
    left = await query_image(stack, image_uuid)
    assert left is not None and left["status"] == "Deleted"
    # The agent's own (late) result for that op changes nothing either; a new RecoverImage,
    # answered by the agent itself, recovers the untouched file.
    reply = await stack.call("RecoverImage", {"uuid": image_uuid})
    assert reply["success"] and reply["inventory"]["status"] == "Ready", reply
    assert md5_of(stored(agent, inventory)) == inventory["md5Sum"]
    assert await available(stack, agent) == expected
