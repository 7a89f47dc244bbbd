"""The backbone end to end: two agents, an http image, Ready with real md5 and files."""

from __future__ import annotations

import hashlib
import os

from tests.conftest import Stack


async def test_add_qcow2_to_two_backup_storages_then_delete(stack: Stack) -> None:
    bs1 = await stack.start_agent("bs1")
    bs2 = await stack.start_agent("bs2")
    url, md5 = stack.http.add_qcow2("centos.qcow2", "128M")
    reply = await stack.add_image(url, [bs1, bs2], name="CentOS7", format="qcow2")
    assert reply["success"], reply
    inv = reply["inventory"]
    assert inv["status"] == "Ready" and inv["state"] == "Enabled"
    assert inv["md5Sum"] == md5
    assert inv["virtualSize"] == 128 * 2**20
    assert inv["size"] == os.path.getsize(stack.http.directory / "centos.qcow2")
    assert (inv["mediaType"], inv["platform"], inv["system"], inv["type"]) == (
        "RootVolumeTemplate",
        "Linux",
        False,
        "zstack",
    )
    refs = {r["backupStorageUuid"]: r for r in inv["backupStorageRefs"]}
    assert set(refs) == {bs1.uuid, bs2.uuid}
    for agent in (bs1, bs2):
        path = refs[agent.uuid]["installPath"]
        assert path == f"{agent.root}/templates/{inv['uuid']}/CentOS7.template"
        assert refs[agent.uuid]["status"] == "Ready"
        assert hashlib.md5(open(path, "rb").read()).hexdigest() == md5

    reply = await stack.call("DeleteImage", {"uuid": inv["uuid"], "backupStorageUuids": [bs1.uuid]})
    assert reply["success"], reply
    assert [r["backupStorageUuid"] for r in reply["inventory"]["backupStorageRefs"]] == [bs2.uuid]
    assert bs1.files() == [] and len(bs2.files()) == 1

    reply = await stack.call("DeleteImage", {"uuid": inv["uuid"]})
    assert reply == {"success": True, "api": "DeleteImage"}
    assert bs2.files() == []
    query = await stack.call("QueryImage", {"conditions": [], "count": True})
    assert query["total"] == 0
