"""Templates from volumes and snapshots, sftp sources and GetImageSource, through the real
broker, database, service and agent processes (issue 4; contract §4 and §7).

Volumes and snapshots are made known to the service the way the volume service does it: by
publishing `volume.*` / `volumeSnapshot.*` events on `NS.events`. Their files are real qcow2
chains built with qemu-img; sftp sources are served by a real asyncssh server in this process,
with key authentication and a known_hosts file for the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from tests.conftest import Agent, EventRecorder, Stack, wait_for
from tests.helpers import (
    closed_port,
    error_of,
    events_delivered,
    image_count,
    install_path,
    md5_of,
    pending_ops,
    qemu_img,
    qemu_info,
    query_image,
    vmdk_descriptor,
    wait_disconnected,
    wait_no_files,
    wait_no_pending_ops,
    with_cd001,
)

MiB = 1 << 20
VIRTUAL = 32 * MiB

# --- disk images --------------------------------------------------------------------------


def qemu_io(path: Path, fmt: str, command: str) -> None:
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, str(path)], check=True, capture_output=True
    )


def same_content(a: Path | str, fmt_a: str, b: Path | str, fmt_b: str) -> bool:
    """`qemu-img compare` reads both images through their backing chains."""
    result = subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, str(a), str(b)], capture_output=True
    )
    return result.returncode == 0


def make_chain(directory: Path, *, relative: bool = False, prefix: str = "") -> Path:
    """base.qcow2 (32 MiB virtual, data at 0 and at 8 MiB) <- top.qcow2 (data over both)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = directory / f"{prefix}base.qcow2"
    top = directory / f"{prefix}top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "32M")
    qemu_io(base, "qcow2", "write -P 0x5a 0 1M")
    qemu_io(base, "qcow2", "write -P 0x11 8M 1M")
    backing = base.name if relative else str(base)
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", str(top))
    qemu_io(top, "qcow2", "write -P 0xa5 512k 1M")
    return top


# --- the volume service's events ----------------------------------------------------------


async def volume_row(stack: Stack, volume_uuid: str) -> Any:
    return await stack.db.fetchrow("SELECT * FROM volume WHERE uuid = $1", volume_uuid)


async def snapshot_row(stack: Stack, snapshot_uuid: str) -> Any:
    return await stack.db.fetchrow("SELECT * FROM volume_snapshot WHERE uuid = $1", snapshot_uuid)


async def add_volume(
    stack: Stack,
    install_path: str,
    *,
    type_: str = "Root",
    fmt: str = "qcow2",
    volume_uuid: str | None = None,
    action: str = "created",
    wait: bool = True,
) -> str:
    """Publish `volume.<action>.UUID` and wait until the read model holds it."""
    vol = volume_uuid or uuid.uuid4().hex
    body = {
        "uuid": vol,
        "name": f"vol-{vol[:6]}",
        "type": type_,
        "vmInstanceUuid": uuid.uuid4().hex,
        "primaryStorageUuid": uuid.uuid4().hex,
        "installPath": install_path,
        "format": fmt,
        "size": VIRTUAL,
    }
    await stack.publish_event(f"volume.{action}.{vol}", body)
    if wait:

        async def known() -> bool:
            row = await volume_row(stack, vol)
            return row is not None and not row["deleted"] and row["install_path"] == install_path

        await wait_for(known, timeout=10)
    return vol


async def add_snapshot(stack: Stack, install_path: str, *, fmt: str = "qcow2") -> str:
    snap = uuid.uuid4().hex
    body = {
        "uuid": snap,
        "volumeUuid": uuid.uuid4().hex,
        "installPath": install_path,
        "format": fmt,
        "size": VIRTUAL,
    }
    await stack.publish_event(f"volumeSnapshot.created.{snap}", body)

    async def known() -> bool:
        row = await snapshot_row(stack, snap)
        return row is not None and not row["deleted"]

    await wait_for(known, timeout=10)
    return snap


# --- API helpers -------------------------------------------------------------------------


async def root_template(stack: Stack, vol: str, **params: Any) -> dict[str, Any]:
    body = {"name": params.pop("name", "tpl"), "rootVolumeUuid": vol, **params}
    return await stack.call("CreateRootVolumeTemplateFromRootVolume", body)


async def data_template(stack: Stack, vol: str, **params: Any) -> dict[str, Any]:
    body = {"name": params.pop("name", "data"), "volumeUuid": vol, **params}
    return await stack.call("CreateDataVolumeTemplateFromVolume", body)


def the_ref(inv: dict[str, Any]) -> dict[str, Any]:
    refs = inv["backupStorageRefs"]
    assert len(refs) == 1, refs
    ref: dict[str, Any] = refs[0]
    return ref


async def assert_failed_and_gone(
    stack: Stack, reply: dict[str, Any], image_uuid: str, agents: list[Agent], code: str | None
) -> dict[str, Any]:
    """A failed creation: the expected code, no image record, no file on any agent."""
    error = error_of(reply)
    if code is not None:
        assert error["code"] == code, reply
    assert await stack.image_row(image_uuid) is None
    assert await query_image(stack, image_uuid) is None
    for agent in agents:
        assert agent.files() == [], agent.files()
        assert not (agent.root / "templates" / image_uuid).exists()
        assert list((agent.root / ".agent" / "partial").iterdir()) == []
    return error


def assert_flattened_copy(
    stored: Path, fmt: str, source: Path, source_fmt: str, inv: dict[str, Any]
) -> None:
    """The stored template is a standalone image with the source's content; the inventory's
    md5, size, actualSize and virtualSize are those of the stored file."""
    info = qemu_info(stored, fmt)
    assert "backing-filename" not in info and "full-backing-filename" not in info, info
    assert same_content(stored, fmt, source, source_fmt)
    assert inv["md5Sum"] == md5_of(stored)
    assert inv["size"] == stored.stat().st_size
    assert inv["actualSize"] == stored.stat().st_blocks * 512
    assert inv["virtualSize"] == info["virtual-size"]
    assert inv["format"] == fmt


# --- a real SFTP server -------------------------------------------------------------------


@dataclass
class Gate:
    """Reads of files whose name contains 'gated' wait for `opened`; `reading` tells that the
    agent has started fetching one."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    reading: asyncio.Event = field(default_factory=asyncio.Event)
    # Reads of files whose name contains 'drop': the first at or past this offset drops the
    # connection instead (once); `offsets` records where each read of them started.
    drop_once_at: int | None = None
    offsets: list[int] = field(default_factory=list)


class GatedSFTPServer(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel, gate: Gate) -> None:
        super().__init__(chan)
        self._gate = gate

    async def read(self, file_obj: Any, offset: int, size: int) -> bytes:  # type: ignore[override]
        if b"drop" in os.fsencode(file_obj.name):
            self._gate.offsets.append(offset)
            if self._gate.drop_once_at is not None and offset >= self._gate.drop_once_at:
                self._gate.drop_once_at = None
                self.connection.abort()
                return b""
        if b"gated" in os.fsencode(file_obj.name):
            self._gate.reading.set()
            await self._gate.opened.wait()
        data = super().read(file_obj, offset, size)
        assert isinstance(data, bytes)
        return data


@dataclass
class SftpHost:
    port: int
    key_file: Path
    known_hosts: Path
    private_key: str
    server_key: asyncssh.SSHKey
    gate: Gate
    # Connections the server accepted.
    connections: list[int] = field(default_factory=list)

    def url(self, path: Path | str, user: str = "user") -> str:
        return f"sftp://{user}@127.0.0.1:{self.port}{path}"

    def known_hosts_line(self, key: asyncssh.SSHKey | None = None) -> str:
        key = key or self.server_key
        return f"[127.0.0.1]:{self.port} " + key.export_public_key().decode()

    def agent_flags(self) -> tuple[str, ...]:
        return ("--ssh-key", str(self.key_file), "--known-hosts", str(self.known_hosts))

    def assert_no_secret(self, text: str) -> None:
        """Neither the private key (nor any line of it) nor its path appears in `text`."""
        assert str(self.key_file) not in text
        for line in self.private_key.splitlines():
            if len(line) >= 16 and "PRIVATE KEY" not in line:
                assert line not in text


@contextlib.asynccontextmanager
async def sftp_host(tmp_path: Path) -> AsyncIterator[SftpHost]:
    server_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir(exist_ok=True)
    key_file = ssh_dir / "id_ed25519"
    private_key = client_key.export_private_key().decode()
    key_file.write_text(private_key)
    key_file.chmod(0o600)
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    gate = Gate()
    gate.opened.set()
    connections: list[int] = []

    class Counting(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            connections.append(1)

    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[server_key],
        authorized_client_keys=authorized,
        server_factory=Counting,
        sftp_factory=lambda chan: GatedSFTPServer(chan, gate),
    )
    try:
        port = server.sockets[0].getsockname()[1]
        host = SftpHost(
            port, key_file, ssh_dir / "known_hosts", private_key, server_key, gate, connections
        )
        host.known_hosts.write_text(host.known_hosts_line())
        yield host
    finally:
        gate.opened.set()
        server.close()
        await server.wait_closed()


# === root volume templates from file:// volumes ==========================================


async def test_root_template_from_qcow2_overlay_is_flattened(stack: Stack, tmp_path: Path) -> None:
    recorder = EventRecorder()
    await stack.client.subscribe(["image.#"], recorder)
    vroot = tmp_path / "vols"
    top = make_chain(vroot)
    before = md5_of(top), md5_of(vroot / "base.qcow2")
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    vol = await add_volume(stack, f"file://{top}")
    image_uuid = uuid.uuid4().hex

    reply = await root_template(
        stack,
        vol,
        name="CentOS7-tpl",
        platform="Paravirtualization",
        guestOsType="CentOS 7",
        system=True,
        description="from a root volume",
        resourceUuid=image_uuid,
    )
    assert reply["success"], reply
    assert reply["api"] == "CreateRootVolumeTemplateFromRootVolume"
    inv = reply["inventory"]
    assert inv["uuid"] == image_uuid
    assert (inv["status"], inv["state"], inv["type"]) == ("Ready", "Enabled", "zstack")
    assert inv["url"] == f"volume://{vol}"
    assert inv["mediaType"] == "RootVolumeTemplate"
    assert (inv["platform"], inv["guestOsType"], inv["system"]) == (
        "Paravirtualization",
        "CentOS 7",
        True,
    )
    assert (inv["name"], inv["description"]) == ("CentOS7-tpl", "from a root volume")
    assert inv["virtualSize"] == VIRTUAL
    ref = the_ref(inv)
    stored = install_path(agent, image_uuid, "CentOS7-tpl")
    assert (ref["backupStorageUuid"], ref["status"], ref["imageUuid"]) == (
        agent.uuid,
        "Ready",
        image_uuid,
    )
    assert ref["installPath"] == str(stored)
    assert agent.files() == [stored]
    assert_flattened_copy(stored, "qcow2", top, "qcow2", inv)
    # The flattened template holds the data of both layers.
    qemu_io(stored, "qcow2", "read -P 0x5a 0 512k")
    qemu_io(stored, "qcow2", "read -P 0xa5 512k 1M")
    qemu_io(stored, "qcow2", "read -P 0x11 8M 1M")
    # The volume itself is left alone.
    assert (md5_of(top), md5_of(vroot / "base.qcow2")) == before
    assert qemu_info(top, "qcow2")["backing-filename"] == str(vroot / "base.qcow2")
    # The query sees the same Ready image.
    queried = await query_image(stack, image_uuid)
    assert queried is not None
    assert (queried["status"], queried["md5Sum"], queried["url"]) == (
        "Ready",
        inv["md5Sum"],
        f"volume://{vol}",
    )
    # Monitoring saw the image appear Creating and turn Ready.

    async def both_statuses() -> list[tuple[Any, Any]]:
        seen = [(e["oldStatus"], e["newStatus"]) for e in recorder.of(f"image.status.{image_uuid}")]
        return seen if len(seen) >= 2 else []

    assert await wait_for(both_statuses, timeout=5) == [(None, "Creating"), ("Creating", "Ready")]
    creating = recorder.of(f"image.status.{image_uuid}")[0]["inventory"]
    assert (creating["status"], creating["url"]) == ("Creating", f"volume://{vol}")


async def test_root_template_with_relative_backing_file(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    top = make_chain(vroot / "sub", relative=True)
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    vol = await add_volume(stack, f"file://{top}")
    reply = await root_template(stack, vol)
    assert reply["success"], reply
    inv = reply["inventory"]
    assert inv["platform"] == "Linux" and inv["system"] is False
    assert_flattened_copy(Path(the_ref(inv)["installPath"]), "qcow2", top, "qcow2", inv)
    assert len(agent.files()) == 1


async def test_data_templates_from_root_and_data_volumes(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    top = make_chain(vroot)
    data_disk = vroot / "data.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(data_disk), "16M")
    qemu_io(data_disk, "qcow2", "write -P 0x77 4M 2M")
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    root_vol = await add_volume(stack, f"file://{top}")
    data_vol = await add_volume(stack, f"file://{data_disk}", type_="Data")

    reply = await data_template(stack, root_vol, name="from-root")
    assert reply["success"], reply
    inv = reply["inventory"]
    assert (inv["mediaType"], inv["url"], inv["status"]) == (
        "DataVolumeTemplate",
        f"volume://{root_vol}",
        "Ready",
    )
    assert inv["virtualSize"] == VIRTUAL
    assert_flattened_copy(install_path(agent, inv["uuid"], "from-root"), "qcow2", top, "qcow2", inv)

    reply = await data_template(stack, data_vol, name="from-data", description="d")
    assert reply["success"], reply
    inv = reply["inventory"]
    assert (inv["mediaType"], inv["url"], inv["status"], inv["description"]) == (
        "DataVolumeTemplate",
        f"volume://{data_vol}",
        "Ready",
        "d",
    )
    assert inv["virtualSize"] == 16 * MiB
    stored = install_path(agent, inv["uuid"], "from-data")
    assert_flattened_copy(stored, "qcow2", data_disk, "qcow2", inv)
    assert len(agent.files()) == 2

    # A data volume is not a root volume.
    reply = await root_template(stack, data_vol)
    error = error_of(reply)
    assert error["code"] == "INVALID_ARGUMENT", reply
    assert "rootVolumeUuid" in error["details"]
    assert await image_count(stack, through_api=True) == 2

    # The root-template parameters do not belong to a data template.
    reply = await data_template(stack, data_vol, platform="Linux")
    assert error_of(reply)["code"] == "INVALID_ARGUMENT"
    assert "platform" in error_of(reply)["details"]


async def test_raw_volume_gives_raw_template(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    vroot.mkdir()
    raw = vroot / "disk.raw"
    payload = os.urandom(3 * MiB) + bytes(5 * MiB)
    raw.write_bytes(payload)
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    vol = await add_volume(stack, f"file://{raw}", fmt="raw")
    reply = await root_template(stack, vol, name="rawtpl")
    assert reply["success"], reply
    inv = reply["inventory"]
    assert inv["format"] == "raw"
    assert inv["virtualSize"] == len(payload)
    stored = install_path(agent, inv["uuid"], "rawtpl")
    assert stored.read_bytes() == payload
    assert inv["md5Sum"] == hashlib.md5(payload).hexdigest()
    assert inv["size"] == len(payload)

    reply = await data_template(stack, vol, name="rawdata")
    assert reply["success"], reply
    assert reply["inventory"]["format"] == "raw"
    assert reply["inventory"]["md5Sum"] == hashlib.md5(payload).hexdigest()


async def test_missing_volume_or_snapshot_is_not_found(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    vroot.mkdir()
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    missing = uuid.uuid4().hex
    for api, key in [
        ("CreateRootVolumeTemplateFromRootVolume", "rootVolumeUuid"),
        ("CreateDataVolumeTemplateFromVolume", "volumeUuid"),
        ("CreateRootVolumeTemplateFromVolumeSnapshot", "snapshotUuid"),
    ]:
        reply = await stack.call(api, {"name": "x", key: missing})
        error = error_of(reply)
        assert error["code"] == "RESOURCE_NOT_FOUND", reply
        assert missing in error["details"]
        reply = await stack.call(api, {"name": "x", key: "not-a-uuid"})
        assert error_of(reply)["code"] == "INVALID_ARGUMENT"
        assert key in error_of(reply)["details"]
        reply = await stack.call(api, {"name": "x"})
        assert error_of(reply)["code"] == "INVALID_ARGUMENT"
        assert key in error_of(reply)["details"]
    # A volume in a format that cannot become a template: refused, nothing created.
    odd = vroot / "disk.vmdk"
    odd.write_bytes(b"x" * 1024)
    vol = await add_volume(stack, f"file://{odd}", fmt="vmdk")
    reply = await root_template(stack, vol)
    assert not reply["success"], reply
    assert await image_count(stack, through_api=True) == 0
    assert agent.files() == []


# === snapshots ===========================================================================


async def test_root_template_from_snapshot(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    top = make_chain(vroot)
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    snap = await add_snapshot(stack, f"file://{top}")
    reply = await stack.call(
        "CreateRootVolumeTemplateFromVolumeSnapshot",
        {"name": "snaptpl", "snapshotUuid": snap, "platform": "Windows", "guestOsType": "Win10"},
    )
    assert reply["success"], reply
    inv = reply["inventory"]
    assert (inv["status"], inv["url"], inv["mediaType"]) == (
        "Ready",
        f"volumeSnapshot://{snap}",
        "RootVolumeTemplate",
    )
    assert (inv["platform"], inv["guestOsType"], inv["system"]) == ("Windows", "Win10", False)
    assert inv["virtualSize"] == VIRTUAL
    stored = install_path(agent, inv["uuid"], "snaptpl")
    assert_flattened_copy(stored, "qcow2", top, "qcow2", inv)

    # A deleted snapshot can no longer be used, and a replayed `created` does not revive it.
    await stack.publish_event(f"volumeSnapshot.deleted.{snap}", {"uuid": snap})

    async def deleted() -> bool:
        row = await snapshot_row(stack, snap)
        return row is not None and row["deleted"]

    await wait_for(deleted, timeout=10)
    body = {"uuid": snap, "installPath": f"file://{top}", "format": "qcow2", "size": 1}
    await stack.publish_event(f"volumeSnapshot.created.{snap}", body)
    await add_snapshot(stack, f"file://{top}")  # a later event: the replay was handled first
    reply = await stack.call(
        "CreateRootVolumeTemplateFromVolumeSnapshot", {"name": "again", "snapshotUuid": snap}
    )
    assert error_of(reply)["code"] == "RESOURCE_NOT_FOUND", reply
    assert await image_count(stack, through_api=True) == 1


# === choice of backup storages ===========================================================


async def test_backup_storage_choice(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    top = make_chain(vroot)
    bs1 = await stack.start_agent("bs1", "--volume-root", str(vroot))
    bs2 = await stack.start_agent("bs2", "--volume-root", str(vroot))
    vol = await add_volume(stack, f"file://{top}")

    # Omitted: exactly one of the Connected backup storages is chosen.
    reply = await root_template(stack, vol, name="one")
    assert reply["success"], reply
    inv = reply["inventory"]
    chosen = the_ref(inv)["backupStorageUuid"]
    assert chosen in (bs1.uuid, bs2.uuid)
    holder, other = (bs1, bs2) if chosen == bs1.uuid else (bs2, bs1)
    assert holder.files() == [install_path(holder, inv["uuid"], "one")]
    assert other.files() == []
    assert "causes" not in reply

    # Both named: stored on both, the same bytes on each.
    reply = await root_template(stack, vol, name="both", backupStorageUuids=[bs1.uuid, bs2.uuid])
    assert reply["success"], reply
    inv = reply["inventory"]
    refs = {r["backupStorageUuid"]: r for r in inv["backupStorageRefs"]}
    assert set(refs) == {bs1.uuid, bs2.uuid}
    for agent in (bs1, bs2):
        stored = install_path(agent, inv["uuid"], "both")
        assert refs[agent.uuid]["installPath"] == str(stored)
        assert refs[agent.uuid]["status"] == "Ready"
        assert md5_of(stored) == inv["md5Sum"]
        assert same_content(stored, "qcow2", top, "qcow2")

    # One Disabled: only the other is used, and the causes name the Disabled one.
    reply = await stack.call(
        "ChangeBackupStorageState", {"uuid": bs2.uuid, "stateEvent": "disable"}
    )
    assert reply["success"], reply
    reply = await root_template(stack, vol, name="skip", backupStorageUuids=[bs1.uuid, bs2.uuid])
    assert reply["success"], reply
    inv = reply["inventory"]
    assert [r["backupStorageUuid"] for r in inv["backupStorageRefs"]] == [bs1.uuid]
    causes = reply.get("causes") or []
    assert [c["backupStorageUuid"] for c in causes] == [bs2.uuid], reply
    assert causes[0]["code"] == "INVALID_STATE"
    assert not (bs2.root / "templates" / inv["uuid"]).exists()

    # Omitted: a Disabled backup storage is never chosen.
    for i in range(3):
        reply = await data_template(stack, vol, name=f"d{i}")
        assert reply["success"], reply
        assert the_ref(reply["inventory"])["backupStorageUuid"] == bs1.uuid

    # None usable: NO_BACKUP_STORAGE and nothing created.
    count = await image_count(stack, through_api=True)
    reply = await root_template(stack, vol, name="none", backupStorageUuids=[bs2.uuid])
    assert error_of(reply)["code"] == "NO_BACKUP_STORAGE", reply
    reply = await stack.call(
        "ChangeBackupStorageState", {"uuid": bs1.uuid, "stateEvent": "disable"}
    )
    assert reply["success"], reply
    reply = await root_template(stack, vol, name="none")
    assert error_of(reply)["code"] == "NO_BACKUP_STORAGE", reply
    assert await image_count(stack, through_api=True) == count


# === sources the agent must refuse or cannot read ========================================


async def test_file_source_outside_volume_root_is_refused(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    vroot.mkdir()
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    stray = outside / "disk.raw"
    stray.write_bytes(os.urandom(64 * 1024))
    link = vroot / "link.raw"
    link.symlink_to(stray)
    sneaky = f"file://{vroot}/../elsewhere/disk.raw"
    for path, fmt in [
        ("file:///etc/hostname", "raw"),
        (f"file://{stray}", "raw"),
        (f"file://{link}", "raw"),
        (sneaky, "raw"),
        (f"file://{tmp_path / 'vols-sibling' / 'x.qcow2'}", "qcow2"),
    ]:
        vol = await add_volume(stack, path, fmt=fmt)
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "URL_NOT_ALLOWED")
    # A qcow2 inside the root whose backing file is outside it.
    top = make_chain(outside)
    inner = vroot / "inner.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2", str(inner))
    vol = await add_volume(stack, f"file://{inner}")
    image_uuid = uuid.uuid4().hex
    reply = await data_template(stack, vol, resourceUuid=image_uuid)
    await assert_failed_and_gone(stack, reply, image_uuid, [agent], "URL_NOT_ALLOWED")
    # Schemes other than file:// and sftp:// are refused.
    for path in ["http://127.0.0.1:1/x.qcow2", "ftp://127.0.0.1/x.qcow2", "/abs/no/scheme"]:
        vol = await add_volume(stack, path)
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "URL_NOT_ALLOWED")
    assert await image_count(stack, through_api=True) == 0


async def test_source_that_is_not_a_disk_image_or_missing(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    vroot.mkdir()
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    text = vroot / "notes.qcow2"
    text.write_text("this is not a disk image\n" * 100)
    vol = await add_volume(stack, f"file://{text}")
    image_uuid = uuid.uuid4().hex
    reply = await root_template(stack, vol, resourceUuid=image_uuid)
    error = await assert_failed_and_gone(stack, reply, image_uuid, [agent], "UNSAFE_IMAGE")
    assert error["details"]

    # A qcow2 overlay declared raw: copied as bytes, it is a qcow2 posing as raw.
    top = make_chain(vroot / "chain")
    vol = await add_volume(stack, f"file://{top}", fmt="raw")
    image_uuid = uuid.uuid4().hex
    reply = await root_template(stack, vol, resourceUuid=image_uuid)
    await assert_failed_and_gone(stack, reply, image_uuid, [agent], "UNSAFE_IMAGE")

    # A missing file: an error, the image removed.
    vol = await add_volume(stack, f"file://{vroot / 'gone.qcow2'}")
    image_uuid = uuid.uuid4().hex
    reply = await root_template(stack, vol, resourceUuid=image_uuid)
    error = await assert_failed_and_gone(stack, reply, image_uuid, [agent], None)
    assert "gone.qcow2" in error["details"], reply
    assert await image_count(stack, through_api=True) == 0
    assert await pending_ops(stack) == 0


def make_data_file_image(image: Path, data_file: Path, secret: bytes) -> None:
    """A qcow2 whose guest data lives in an external raw data file (`data_file_raw`)."""
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"data_file={data_file},data_file_raw=on",
        str(image),
        str(len(secret)),
    )
    data_file.write_bytes(secret)  # qemu-img create truncated it; now it holds the secret


async def test_external_data_file_outside_volume_root_is_refused(
    stack: Stack, tmp_path: Path
) -> None:
    """A volume event must not make the agent copy a host file into a template: a qcow2 under
    the volume root whose external data file lies outside it is refused like a backing file."""
    vroot = tmp_path / "vols"
    vroot.mkdir()
    outside = tmp_path / "host-private"
    outside.mkdir()
    secret = os.urandom(MiB)
    volume = vroot / "vol.qcow2"
    make_data_file_image(volume, outside / "secret.raw", secret)
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    vol = await add_volume(stack, f"file://{volume}")
    image_uuid = uuid.uuid4().hex
    reply = await root_template(stack, vol, resourceUuid=image_uuid)
    leaked = [p for p in agent.root.rglob("*") if p.is_file() and secret[:4096] in p.read_bytes()]
    assert leaked == [], f"the host file was copied into {leaked}"
    await assert_failed_and_gone(stack, reply, image_uuid, [agent], None)
    assert reply["error"]["code"] in ("URL_NOT_ALLOWED", "UNSAFE_IMAGE"), reply


async def test_capacity_exceeded_template_leaves_nothing(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    vroot.mkdir()
    raw = vroot / "disk.raw"
    raw.write_bytes(os.urandom(4 * MiB))
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot), "--capacity", str(MiB))
    vol = await add_volume(stack, f"file://{raw}", fmt="raw")
    image_uuid = uuid.uuid4().hex
    reply = await root_template(stack, vol, resourceUuid=image_uuid)
    await assert_failed_and_gone(stack, reply, image_uuid, [agent], "CAPACITY_EXCEEDED")


# === the volume read model ===============================================================


async def test_volume_events_read_model(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    top = make_chain(vroot)
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))

    # Garbage first: each is dropped and the consumer keeps going.
    bad_uuid = uuid.uuid4().hex
    await stack.publish_event(f"volume.created.{bad_uuid}", b"\x00\xffnot json")
    await stack.publish_event(f"volume.created.{bad_uuid}", b"[1, 2, 3]")
    await stack.publish_event(f"volume.created.{bad_uuid}", {"uuid": "../../etc"})
    await stack.publish_event(f"volume.created.{bad_uuid}", {"uuid": bad_uuid, "type": "Swap"})
    await stack.publish_event(f"volume.created.{bad_uuid}", {"uuid": bad_uuid, "size": -1})
    other = uuid.uuid4().hex
    await stack.publish_event(
        f"volume.created.{bad_uuid}",
        {"uuid": other, "type": "Root", "installPath": f"file://{top}", "format": "qcow2"},
    )
    await stack.publish_event(f"volumeSnapshot.created.{bad_uuid}", b"{")
    await stack.publish_event(f"volume.exploded.{bad_uuid}", {"uuid": bad_uuid})

    # A good event after them is applied.
    vol = await add_volume(stack, f"file://{vroot / 'old.qcow2'}")
    assert await volume_row(stack, bad_uuid) is None
    assert await volume_row(stack, other) is None  # body uuid differs from the routing key

    # `updated` moves the volume: the template is made from the new path.
    await add_volume(stack, f"file://{top}", volume_uuid=vol, action="updated")
    reply = await root_template(stack, vol, name="moved")
    assert reply["success"], reply
    stored = install_path(agent, reply["inventory"]["uuid"], "moved")
    assert same_content(stored, "qcow2", top, "qcow2")

    # A replayed `created` changes nothing.
    await add_volume(stack, f"file://{top}", volume_uuid=vol)

    # `deleted`: the volume can no longer be used.
    await stack.publish_event(f"volume.deleted.{vol}", {"uuid": vol})

    async def deleted() -> bool:
        row = await volume_row(stack, vol)
        return row is not None and row["deleted"]

    await wait_for(deleted, timeout=10)
    reply = await root_template(stack, vol, name="after-delete")
    assert error_of(reply)["code"] == "RESOURCE_NOT_FOUND", reply
    reply = await data_template(stack, vol, name="after-delete")
    assert error_of(reply)["code"] == "RESOURCE_NOT_FOUND", reply

    # A replayed `created` (and an `updated`) after `deleted` do not revive it.
    # Published before the sentinel, they were delivered before it: the sentinel in the read
    # model is the sign that they have been handled (they leave no trace of their own).
    await add_volume(stack, f"file://{top}", volume_uuid=vol, wait=False)
    await add_volume(stack, f"file://{top}", volume_uuid=vol, action="updated", wait=False)
    sentinel = await add_volume(stack, f"file://{top}")
    row = await volume_row(stack, vol)
    assert row is not None and row["deleted"]
    reply = await root_template(stack, vol, name="revived")
    assert error_of(reply)["code"] == "RESOURCE_NOT_FOUND", reply
    # A volume deleted before it was ever created stays unknown.
    early = uuid.uuid4().hex
    await stack.publish_event(f"volume.deleted.{early}", {"uuid": early})
    await add_volume(stack, f"file://{top}", volume_uuid=early, wait=False)
    await add_volume(stack, f"file://{vroot / 'base.qcow2'}")  # processed after the two above

    async def tombstoned() -> bool:
        row = await volume_row(stack, early)
        return row is not None and row["deleted"]

    await wait_for(tombstoned, timeout=10)
    reply = await root_template(stack, early, name="early")
    assert error_of(reply)["code"] == "RESOURCE_NOT_FOUND", reply

    # Later good events still work.
    reply = await root_template(stack, sentinel, name="sentinel")
    assert reply["success"], reply
    assert await image_count(stack, through_api=True) == 2


# === sftp sources =========================================================================


async def test_sftp_add_image_and_template_from_remote_chain(stack: Stack, tmp_path: Path) -> None:
    recorder = EventRecorder()
    await stack.client.subscribe(["#"], recorder)
    remote = tmp_path / "hypervisor"
    remote.mkdir()
    img = remote / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "48M")
    qemu_io(img, "qcow2", "write -P 0x42 1M 2M")
    # A three-layer chain: base <- mid (absolute backing path) <- top (relative backing path).
    make_chain(remote / "chain", prefix="m-")
    mid = remote / "chain" / "m-top.qcow2"
    base = remote / "chain" / "m-base.qcow2"
    top = remote / "chain" / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "m-top.qcow2", "-F", "qcow2", str(top))
    qemu_io(top, "qcow2", "write -P 0x3c 2M 2M")

    async with sftp_host(tmp_path) as host:
        agent = await stack.start_agent("bs1", *host.agent_flags())

        reply = await stack.add_image(host.url(img), [agent], name="remote", format="qcow2")
        assert reply["success"], reply
        inv = reply["inventory"]
        ready = [inv["uuid"]]
        assert inv["status"] == "Ready" and inv["md5Sum"] == md5_of(img)
        assert inv["size"] == img.stat().st_size and inv["virtualSize"] == 48 * MiB
        assert inv["url"] == host.url(img)
        expected = [install_path(agent, inv["uuid"], "remote")]
        assert md5_of(expected[0]) == md5_of(img)
        host.assert_no_secret(json.dumps(reply))

        vol = await add_volume(stack, host.url(top))
        reply = await root_template(stack, vol, name="remote-tpl")
        assert reply["success"], reply
        inv = reply["inventory"]
        ready.append(inv["uuid"])
        assert (inv["status"], inv["url"]) == ("Ready", f"volume://{vol}")
        assert inv["virtualSize"] == VIRTUAL
        stored = install_path(agent, inv["uuid"], "remote-tpl")
        expected.append(stored)
        assert_flattened_copy(stored, "qcow2", top, "qcow2", inv)
        qemu_io(stored, "qcow2", "read -P 0x11 8M 1M")  # from the bottom layer
        qemu_io(stored, "qcow2", "read -P 0x3c 2M 2M")  # from the top layer
        host.assert_no_secret(json.dumps(reply))

        reply = await data_template(stack, vol, name="remote-data")
        assert reply["success"], reply
        ready.append(reply["inventory"]["uuid"])
        host.assert_no_secret(json.dumps(reply))
        expected.append(install_path(agent, reply["inventory"]["uuid"], "remote-data"))
        assert agent.files() == sorted(expected)
        # No scratch copy of the chain is left behind.
        assert list((agent.root / ".agent" / "partial").iterdir()) == []

        query = await stack.call("QueryImage", {"conditions": []})
        assert query["success"] and len(query["inventories"]) == 3
        host.assert_no_secret(json.dumps(query))

        # The events of all three images, up to their turning Ready, have arrived.
        async def all_ready() -> bool:
            return all(
                any(e["newStatus"] == "Ready" for e in recorder.of(f"image.status.{u}"))
                for u in ready
            )

        await wait_for(all_ready, timeout=10)
        assert recorder.events
        host.assert_no_secret(json.dumps(recorder.events))
        for proc in [*stack.services, agent.proc]:
            host.assert_no_secret(proc.log())
        assert mid.exists() and base.exists()


async def test_sftp_data_file_naming_an_agent_host_file_is_refused(
    stack: Stack, tmp_path: Path
) -> None:
    """A remote qcow2 whose external data file names a path: read on the agent's host, that
    path would copy one of the agent host's files into the template."""
    remote = tmp_path / "hypervisor"
    remote.mkdir()
    agent_private = tmp_path / "agent-host-private"
    agent_private.mkdir()
    secret = os.urandom(MiB)
    image = remote / "vol.qcow2"
    make_data_file_image(image, agent_private / "secret.raw", secret)
    async with sftp_host(tmp_path) as host:
        agent = await stack.start_agent("bs1", *host.agent_flags())
        vol = await add_volume(stack, host.url(image))
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        leaked = [
            p for p in agent.root.rglob("*") if p.is_file() and secret[:4096] in p.read_bytes()
        ]
        assert leaked == [], f"the agent host's file was copied into {leaked}"
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], None)
        assert reply["error"]["code"] in ("UNSAFE_IMAGE", "URL_NOT_ALLOWED"), reply
        # The same file through AddImage is refused too (a qcow2 naming a data file).
        image_uuid = uuid.uuid4().hex
        reply = await stack.add_image(
            host.url(image), [agent], name="df", format="qcow2", resourceUuid=image_uuid
        )
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "UNSAFE_IMAGE")


async def test_sftp_password_in_url_is_not_exposed(stack: Stack, tmp_path: Path) -> None:
    """Credentials never appear in replies, inventories, events or logs: a password written
    into an sftp url is either refused or kept out of all of them."""
    recorder = EventRecorder()
    await stack.client.subscribe(["#"], recorder)
    password = "pw-" + uuid.uuid4().hex[:12]
    remote = tmp_path / "hypervisor"
    remote.mkdir()
    img = remote / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    async with sftp_host(tmp_path) as host:
        agent = await stack.start_agent("bs1", *host.agent_flags())
        url = f"sftp://user:{password}@127.0.0.1:{host.port}{img}"
        reply = await stack.add_image(url, [agent], name="pw", format="qcow2")
        assert password not in json.dumps(reply), reply
        query = await stack.call("QueryImage", {"conditions": []})
        assert password not in json.dumps(query), query
        await events_delivered(stack, recorder)  # whatever the service published is in
        assert password not in json.dumps(recorder.events)
        for proc in [*stack.services, agent.proc]:
            assert password not in proc.log(), proc.name


async def test_sftp_failures(stack: Stack, tmp_path: Path) -> None:
    remote = tmp_path / "hypervisor"
    remote.mkdir()
    img = remote / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    notes = remote / "notes.qcow2"
    notes.write_text("not an image\n")
    async with sftp_host(tmp_path) as host:
        agent = await stack.start_agent("bs1", *host.agent_flags())

        async def add(url: str) -> tuple[dict[str, Any], str]:
            image_uuid = uuid.uuid4().hex
            reply = await stack.add_image(
                url, [agent], name="img", format="qcow2", resourceUuid=image_uuid
            )
            host.assert_no_secret(json.dumps(reply))
            return reply, image_uuid

        # A missing remote file.
        reply, image_uuid = await add(host.url(remote / "missing.qcow2"))
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "DOWNLOAD_FAILED")
        vol = await add_volume(stack, host.url(remote / "missing.qcow2"))
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "DOWNLOAD_FAILED")

        # A remote file that is not a disk image.
        vol = await add_volume(stack, host.url(notes))
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "UNSAFE_IMAGE")

        # A host key that known_hosts does not list: refused before any byte is read.
        host.known_hosts.write_text(
            host.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519"))
        )
        reply, image_uuid = await add(host.url(img))
        error = await assert_failed_and_gone(stack, reply, image_uuid, [agent], "DOWNLOAD_FAILED")
        assert "127.0.0.1" in error["details"]
        vol = await add_volume(stack, host.url(img))
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "DOWNLOAD_FAILED")

        # No known_hosts entry at all is no better (never trust on first use silently).
        host.known_hosts.write_text("")
        reply, image_uuid = await add(host.url(img))
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "DOWNLOAD_FAILED")

        # Bad credentials: a key the server does not authorize.
        host.known_hosts.write_text(host.known_hosts_line())
        good_key = host.key_file.read_text()
        host.key_file.write_text(
            asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode()
        )
        reply, image_uuid = await add(host.url(img))
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "DOWNLOAD_FAILED")
        host.key_file.write_text(good_key)

        # An unreachable host.
        reply, image_uuid = await add(f"sftp://user@127.0.0.1:{closed_port()}{img}")
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "DOWNLOAD_FAILED")

        # With the right settings back, the same agent downloads fine.
        reply, image_uuid = await add(host.url(img))
        assert reply["success"], reply
        assert reply["inventory"]["md5Sum"] == md5_of(img)
        assert await image_count(stack, through_api=True) == 1
        for proc in [*stack.services, agent.proc]:
            host.assert_no_secret(proc.log())


async def test_sftp_trust_on_first_use_is_explicit_and_records_the_key(
    stack: Stack, tmp_path: Path
) -> None:
    """Only with --trust-on-first-use is an unlisted host accepted; its key is then recorded
    and checked from the next connection on."""
    remote = tmp_path / "hypervisor"
    remote.mkdir()
    img = remote / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    other_key = asyncssh.generate_private_key("ssh-ed25519")
    other = f"[elsewhere.example]:2222 {other_key.export_public_key().decode().strip()}"
    async with sftp_host(tmp_path) as host:
        # Another host pinned on a last line without a newline: it must stay intact.
        host.known_hosts.write_text(other)
        agent = await stack.start_agent("bs1", *host.agent_flags(), "--trust-on-first-use")
        first = await stack.add_image(host.url(img), [agent], name="tofu", format="qcow2")
        assert first["success"], first
        recorded = host.known_hosts.read_text().splitlines()
        assert recorded == [other, host.known_hosts_line().strip()]
        pinned = asyncssh.read_known_hosts(str(host.known_hosts))
        assert pinned.match("elsewhere.example", "", 2222)[0] == [other_key.convert_to_public()]
        assert "trust on first use" in agent.proc.log()
        # From now on the recorded key is checked: a different key listed for the host fails.
        host.known_hosts.write_text(
            host.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519"))
        )
        image_uuid = uuid.uuid4().hex
        reply = await stack.add_image(
            host.url(img), [agent], name="tofu2", format="qcow2", resourceUuid=image_uuid
        )
        assert error_of(reply)["code"] == "DOWNLOAD_FAILED", reply
        assert "127.0.0.1" in json.dumps(reply["error"]), reply
        assert await stack.image_row(image_uuid) is None
        assert not (agent.root / "templates" / image_uuid).exists()
        assert list((agent.root / ".agent" / "partial").iterdir()) == []
        assert [p.name for p in agent.files()] == ["tofu.template"]
        # A known_hosts file that cannot be parsed is never taken for an empty one.
        host.known_hosts.write_text("shortline\n")
        reply = await stack.add_image(host.url(img), [agent], name="tofu3", format="qcow2")
        assert error_of(reply)["code"] == "DOWNLOAD_FAILED", reply
        assert host.known_hosts.read_text() == "shortline\n"


async def test_creating_is_visible_then_ready(stack: Stack, tmp_path: Path) -> None:
    remote = tmp_path / "hypervisor"
    remote.mkdir()
    gated = remote / "gated.raw"
    payload = os.urandom(6 * MiB)
    gated.write_bytes(payload)
    async with sftp_host(tmp_path) as host:
        agent = await stack.start_agent("bs1", *host.agent_flags())
        vol = await add_volume(stack, host.url(gated), fmt="raw")
        image_uuid = uuid.uuid4().hex
        host.gate.opened.clear()
        call = asyncio.create_task(root_template(stack, vol, name="slow", resourceUuid=image_uuid))
        await asyncio.wait_for(host.gate.reading.wait(), 15)
        try:
            inv = await query_image(stack, image_uuid)
            assert inv is not None
            assert (inv["status"], inv["url"], inv["format"]) == (
                "Creating",
                f"volume://{vol}",
                "raw",
            )
            assert [r["status"] for r in inv["backupStorageRefs"]] == ["Creating"]
            reply = await stack.call(
                "QueryImage", {"conditions": [{"name": "status", "op": "=", "value": "Creating"}]}
            )
            assert [i["uuid"] for i in reply["inventories"]] == [image_uuid]
            reply = await stack.call("GetImageSource", {"uuid": image_uuid})
            assert error_of(reply)["code"] == "INVALID_STATE", reply
            reply = await stack.call("DeleteImage", {"uuid": image_uuid})
            assert error_of(reply)["code"] == "INVALID_STATE", reply
            assert not call.done()
        finally:
            host.gate.opened.set()
        reply = await asyncio.wait_for(call, 30)
        assert reply["success"], reply
        inv = reply["inventory"]
        assert inv["status"] == "Ready" and inv["md5Sum"] == hashlib.md5(payload).hexdigest()
        assert install_path(agent, image_uuid, "slow").read_bytes() == payload
        reply = await stack.call("GetImageSource", {"uuid": image_uuid})
        assert reply["success"], reply


# === crash rules ==========================================================================


async def test_agent_killed_while_creating_fails_cleanly(stack: Stack, tmp_path: Path) -> None:
    remote = tmp_path / "hypervisor"
    remote.mkdir()
    gated = remote / "gated.raw"
    gated.write_bytes(os.urandom(8 * MiB))
    async with sftp_host(tmp_path) as host:
        agent = await stack.start_agent("bs1", *host.agent_flags())
        vol = await add_volume(stack, host.url(gated), fmt="raw")
        image_uuid = uuid.uuid4().hex
        host.gate.opened.clear()
        call = asyncio.create_task(root_template(stack, vol, name="big", resourceUuid=image_uuid))
        await asyncio.wait_for(host.gate.reading.wait(), 15)
        row = await stack.image_row(image_uuid)
        assert row is not None and row["status"] == "Creating"

        agent.proc.kill()
        killed_at = time.monotonic()
        reply = await asyncio.wait_for(call, 30)
        assert not reply["success"], reply
        assert time.monotonic() - killed_at < 10
        causes = reply["error"].get("causes") or []
        assert [c["backupStorageUuid"] for c in causes] == [agent.uuid], reply
        assert await stack.image_row(image_uuid) is None
        assert await query_image(stack, image_uuid) is None
        assert await stack.bs_status(agent.uuid, "Disconnected") is not None
        # The agent comes back: whatever it had started is cleaned up, nothing is revived.
        op_id = await stack.db.fetchval(
            "SELECT op_id FROM op WHERE image_uuid = $1 AND kind = 'create'", image_uuid
        )
        host.gate.opened.set()
        stack.restart(agent.proc)
        await stack.wait_connected(agent)

        # The agent resumes the op it had journalled and reports its end, which the service no
        # longer wants: once that has arrived and been cleaned up after, the op is over.
        async def clean() -> bool:
            stale = f"stale result for op {op_id}" in stack.services[0].log()
            partial = list((agent.root / ".agent" / "partial").iterdir())
            return stale and agent.files() == [] and partial == [] and await pending_ops(stack) == 0

        await wait_for(clean, timeout=20)
        assert await stack.image_row(image_uuid) is None
        assert agent.files() == []
        assert await image_count(stack, through_api=True) == 0


async def test_service_killed_while_creating_finishes_or_fails_cleanly(
    stack: Stack, tmp_path: Path
) -> None:
    remote = tmp_path / "hypervisor"
    remote.mkdir()
    gated = remote / "gated.raw"
    payload = os.urandom(4 * MiB)
    gated.write_bytes(payload)
    async with sftp_host(tmp_path) as host:
        agent = await stack.start_agent("bs1", *host.agent_flags())
        vol = await add_volume(stack, host.url(gated), fmt="raw")
        image_uuid = uuid.uuid4().hex
        host.gate.opened.clear()
        call = asyncio.create_task(root_template(stack, vol, name="svc", resourceUuid=image_uuid))
        await asyncio.wait_for(host.gate.reading.wait(), 15)
        stack.services[0].kill()
        host.gate.opened.set()
        stack.restart(stack.services[0])
        reply = await asyncio.wait_for(call, 40)
        if reply["success"]:
            inv = reply["inventory"]
            assert inv["status"] == "Ready"
            assert inv["md5Sum"] == hashlib.md5(payload).hexdigest()
            assert agent.files() == [install_path(agent, image_uuid, "svc")]
        else:
            assert await stack.image_row(image_uuid) is None
            await wait_no_files(agent, timeout=15)
        await wait_no_pending_ops(stack, timeout=15)
        row = await stack.image_row(image_uuid)
        assert row is None or row["status"] == "Ready"


# === GetImageSource =======================================================================


async def test_get_image_source(stack: Stack) -> None:
    bs1 = await stack.start_agent("bs1")
    bs2 = await stack.start_agent("bs2")
    url, _ = stack.http.add_qcow2("linux.qcow2", "64M")
    reply = await stack.add_image(url, [bs1, bs2], name="linux", format="qcow2")
    assert reply["success"], reply
    linux = reply["inventory"]
    raw_url, _ = stack.http.add("disk.raw", os.urandom(256 * 1024))
    reply = await stack.add_image(raw_url, [bs2], name="rawimg", format="raw")
    assert reply["success"], reply
    raw = reply["inventory"]

    bs_rows = await stack.call("QueryBackupStorage", {"conditions": []})
    hostnames = {b["uuid"]: b["hostname"] for b in bs_rows["inventories"]}

    reply = await stack.call("GetImageSource", {"uuid": linux["uuid"]})
    assert reply["success"], reply
    assert reply["api"] == "GetImageSource"
    assert reply["inventory"]["uuid"] == linux["uuid"]
    assert reply["inventory"]["status"] == "Ready"
    assert reply["paravirtualization"] is True
    assert reply["volumeFormat"] == "qcow2"
    refs = {r["backupStorageUuid"]: r["installPath"] for r in linux["backupStorageRefs"]}
    assert sorted(reply["sources"], key=lambda s: s["backupStorageUuid"]) == sorted(
        (
            {"backupStorageUuid": u, "hostname": hostnames[u], "installPath": refs[u]}
            for u in (bs1.uuid, bs2.uuid)
        ),
        key=lambda s: s["backupStorageUuid"],
    )

    reply = await stack.call("GetImageSource", {"uuid": raw["uuid"]})
    assert reply["success"], reply
    assert reply["volumeFormat"] == "qcow2"
    assert reply["inventory"]["format"] == "raw"
    assert [s["backupStorageUuid"] for s in reply["sources"]] == [bs2.uuid]

    for platform, paravirtual in [
        ("Windows", False),
        ("Other", False),
        ("Paravirtualization", True),
        ("Linux", True),
    ]:
        reply = await stack.call("UpdateImage", {"uuid": linux["uuid"], "platform": platform})
        assert reply["success"], reply
        reply = await stack.call("GetImageSource", {"uuid": linux["uuid"]})
        assert reply["success"], reply
        assert reply["paravirtualization"] is paravirtual, platform

    # Disabled: refused; enabled again: served.
    reply = await stack.call("ChangeImageState", {"uuid": linux["uuid"], "stateEvent": "disable"})
    assert reply["success"], reply
    for params in ({}, {"forSystemVm": True}):
        reply = await stack.call("GetImageSource", {"uuid": linux["uuid"], **params})
        assert error_of(reply)["code"] == "INVALID_STATE", reply
    reply = await stack.call("ChangeImageState", {"uuid": linux["uuid"], "stateEvent": "enable"})
    assert reply["success"], reply
    assert (await stack.call("GetImageSource", {"uuid": linux["uuid"]}))["success"]

    # A system image serves appliance VMs only.
    reply = await stack.call("UpdateImage", {"uuid": linux["uuid"], "system": True})
    assert reply["success"], reply
    reply = await stack.call("GetImageSource", {"uuid": linux["uuid"]})
    assert error_of(reply)["code"] == "INVALID_STATE", reply
    reply = await stack.call("GetImageSource", {"uuid": linux["uuid"], "forSystemVm": False})
    assert error_of(reply)["code"] == "INVALID_STATE", reply
    reply = await stack.call("GetImageSource", {"uuid": linux["uuid"], "forSystemVm": True})
    assert reply["success"], reply
    assert len(reply["sources"]) == 2

    # Missing image; bad parameters.
    reply = await stack.call("GetImageSource", {"uuid": uuid.uuid4().hex})
    assert error_of(reply)["code"] == "RESOURCE_NOT_FOUND", reply
    for params in ({}, {"uuid": "nope"}, {"uuid": linux["uuid"], "forSystemVm": "yes"}):
        reply = await stack.call("GetImageSource", params)
        assert error_of(reply)["code"] == "INVALID_ARGUMENT", reply

    # The agent of bs2 dies: it is no longer a source, and an image only it holds has none.
    bs2.proc.kill()
    await wait_disconnected(stack, bs2)
    reply = await stack.call("GetImageSource", {"uuid": linux["uuid"], "forSystemVm": True})
    assert reply["success"], reply
    assert [s["backupStorageUuid"] for s in reply["sources"]] == [bs1.uuid]
    reply = await stack.call("GetImageSource", {"uuid": raw["uuid"]})
    assert error_of(reply)["code"] == "NO_BACKUP_STORAGE", reply


async def test_get_image_source_of_a_template(stack: Stack, tmp_path: Path) -> None:
    vroot = tmp_path / "vols"
    top = make_chain(vroot)
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    vol = await add_volume(stack, f"file://{top}")
    reply = await root_template(stack, vol, name="sys", system=True, platform="Other")
    assert reply["success"], reply
    inv = reply["inventory"]
    reply = await stack.call("GetImageSource", {"uuid": inv["uuid"]})
    assert error_of(reply)["code"] == "INVALID_STATE", reply
    reply = await stack.call("GetImageSource", {"uuid": inv["uuid"], "forSystemVm": True})
    assert reply["success"], reply
    assert reply["paravirtualization"] is False
    assert reply["volumeFormat"] == "qcow2"
    assert reply["sources"] == [
        {
            "backupStorageUuid": agent.uuid,
            "hostname": reply["sources"][0]["hostname"],
            "installPath": str(install_path(agent, inv["uuid"], "sys")),
        }
    ]
    assert reply["sources"][0]["hostname"]


# === section 9: templates pass the rules downloads pass ==================================


async def test_a_raw_volume_whose_guest_wrote_a_disk_header_is_unsafe(
    stack: Stack, tmp_path: Path
) -> None:
    """A guest owns its raw disk's bytes: it can write a VMDK descriptor naming a host file
    (with CD001 at 0x8001) or a qcow2 header with a backing file. Stored as raw, any consumer
    that opened it without -f would read host files through it."""
    vroot = tmp_path / "vols"
    vroot.mkdir()
    descriptor = vroot / "descriptor.raw"
    descriptor.write_bytes(with_cd001(vmdk_descriptor("/etc/passwd"), 1 * MiB))
    backed = vroot / "backed.raw"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(backed), "1M")
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    for volume in (descriptor, backed):
        vol = await add_volume(stack, f"file://{volume}", fmt="raw")
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        error = await assert_failed_and_gone(stack, reply, image_uuid, [agent], "UNSAFE_IMAGE")
        assert "/etc/passwd" not in json.dumps(reply), error
        assert ".agent" not in json.dumps(reply), error


async def test_a_volume_beyond_the_virtual_size_limit_is_refused_before_conversion(
    stack: Stack, tmp_path: Path
) -> None:
    vroot = tmp_path / "vols"
    vroot.mkdir()
    big = vroot / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(big), "64M")
    agent = await stack.start_agent(
        "bs1", "--volume-root", str(vroot), "--max-virtual-size", str(32 * MiB)
    )
    vol = await add_volume(stack, f"file://{big}")
    image_uuid = uuid.uuid4().hex
    reply = await root_template(stack, vol, resourceUuid=image_uuid)
    error = await assert_failed_and_gone(stack, reply, image_uuid, [agent], "UNSAFE_IMAGE")
    assert "--max-virtual-size" in error["details"], error


HUGE = 40 << 30


async def _hashing_a_huge_sparse_template(
    stack: Stack, tmp_path: Path
) -> tuple[Agent, str, asyncio.Task[dict[str, Any]]]:
    """A 40 GiB sparse raw volume: qemu-img convert skips its holes in a moment, then the
    agent hashes 40 GiB of zeros (about a minute). Returns once that hashing runs. (Its
    apparent size must stay below the disk's free space, which the agent checks.)"""
    vroot = tmp_path / "vols"
    vroot.mkdir()
    sparse = vroot / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(HUGE)
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    vol = await add_volume(stack, f"file://{sparse}", fmt="raw")
    image_uuid = uuid.uuid4().hex
    call = asyncio.create_task(root_template(stack, vol, resourceUuid=image_uuid))
    partial = agent.root / ".agent" / "partial"

    async def hashing() -> bool:
        files = [p for p in partial.iterdir() if p.is_file()]
        if not files or files[0].stat().st_size != HUGE:
            return False
        # qemu-img has finished (no process of it is left): what runs now is the hashing.
        done = subprocess.run(["pgrep", "-f", f"qemu-img convert.*{vroot}"], capture_output=True)
        return done.returncode == 1

    await wait_for(hashing, timeout=30)
    await asyncio.sleep(0.5)
    assert not call.done(), call.result()  # still hashing: 40 GiB take about a minute
    return agent, image_uuid, call


async def test_sigterm_stops_the_hashing_of_a_huge_template_within_5s(
    stack: Stack, tmp_path: Path
) -> None:
    agent, _image_uuid, call = await _hashing_a_huge_sparse_template(stack, tmp_path)
    started = time.monotonic()
    code = agent.proc.terminate(timeout=30)
    elapsed = time.monotonic() - started
    assert code == 0, agent.proc.log()
    assert elapsed < 5, f"the agent took {elapsed:.1f}s to stop"
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)


async def test_an_enforcing_delete_cancels_the_hashing_within_5s(
    stack: Stack, tmp_path: Path
) -> None:
    agent, image_uuid, call = await _hashing_a_huge_sparse_template(stack, tmp_path)
    started = time.monotonic()
    reply = await stack.call("DeleteImage", {"uuid": image_uuid, "deleteMode": "Enforcing"})
    assert reply["success"], reply
    failed = await asyncio.wait_for(call, 30)
    assert not failed["success"], failed
    await wait_no_files(agent, timeout=5)
    assert list((agent.root / ".agent" / "partial").iterdir()) == []
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"cancelling took {elapsed:.1f}s"


async def test_an_sftp_source_on_a_denied_address_is_never_contacted(
    stack: Stack, tmp_path: Path
) -> None:
    """The network policy holds for sftp as for http: 127.0.0.1 falls back to the default
    loopback denial when only 127.0.0.2 is allowed, for a download and for a template."""
    remote = tmp_path / "remote"
    remote.mkdir()
    img = remote / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "16M")
    async with sftp_host(tmp_path) as host:
        agent = await stack.start_agent(
            "bs1", *host.agent_flags(), "--allow-networks", "127.0.0.2/32"
        )
        for url in (host.url(img), host.url(img).replace("127.0.0.1", "localhost")):
            image_uuid = uuid.uuid4().hex
            reply = await stack.add_image(
                url, [agent], name="img", format="qcow2", resourceUuid=image_uuid
            )
            await assert_failed_and_gone(stack, reply, image_uuid, [agent], "URL_NOT_ALLOWED")
            assert "127.0.0.1" in json.dumps(reply) or "::1" in json.dumps(reply), reply
        vol = await add_volume(stack, host.url(img))
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], "URL_NOT_ALLOWED")
        assert host.connections == []


async def test_a_backing_file_of_a_probed_or_foreign_format_is_refused(
    stack: Stack, tmp_path: Path
) -> None:
    """A layer whose backing format is not named is probed by qemu: a VMDK descriptor there
    (inside the volume root) would make the conversion read any file its extent names. Both
    that and a backing file named as vmdk are UNSAFE_IMAGE, and the secret is never copied."""
    vroot = tmp_path / "vols"
    vroot.mkdir()
    outside = tmp_path / "host-private"
    outside.mkdir()
    secret = os.urandom(MiB)
    (outside / "secret.bin").write_bytes(secret)
    (vroot / "desc.vmdk").write_bytes(vmdk_descriptor(str(outside / "secret.bin")))
    probed = vroot / "probed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "desc.vmdk", "-F", "raw", str(probed), "1M")
    header = bytearray(probed.read_bytes())
    at = header.find(b"\xe2\x79\x2a\xca")  # the backing-format header extension: removed
    assert at > 0
    header[at : at + 4] = bytes(4)
    probed.write_bytes(header)
    named = vroot / "named.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "desc.vmdk", "-F", "vmdk", str(named), "1M")
    agent = await stack.start_agent("bs1", "--volume-root", str(vroot))
    for volume in (probed, named):
        vol = await add_volume(stack, f"file://{volume}")
        image_uuid = uuid.uuid4().hex
        reply = await root_template(stack, vol, resourceUuid=image_uuid)
        leaked = [
            p for p in agent.root.rglob("*") if p.is_file() and secret[:4096] in p.read_bytes()
        ]
        assert leaked == [], f"the host file was copied into {leaked}"
        await assert_failed_and_gone(stack, reply, image_uuid, [agent], None)
        assert reply["error"]["code"] in ("UNSAFE_IMAGE", "URL_NOT_ALLOWED"), reply


async def test_an_sftp_download_dropped_half_way_resumes_where_it_stopped(
    stack: Stack, tmp_path: Path
) -> None:
    """sftp resumes at the offset it had when the file's size and mtime are unchanged."""
    remote = tmp_path / "remote"
    remote.mkdir()
    payload = os.urandom(16 * MiB)
    (remote / "drop.raw").write_bytes(payload)
    async with sftp_host(tmp_path) as host:
        host.gate.drop_once_at = 8 * MiB
        agent = await stack.start_agent("bs1", *host.agent_flags())
        reply = await stack.add_image(
            host.url(remote / "drop.raw"), [agent], name="dropped", format="raw"
        )
        assert reply["success"], reply
        assert reply["inventory"]["md5Sum"] == hashlib.md5(payload).hexdigest()
        assert len(host.connections) == 2, host.connections
        # Only the first connection read from offset 0: the second went on where it stopped.
        assert host.gate.offsets.count(0) == 1, host.gate.offsets
