"""ZStack's API portal, /metrics and health (contract section 11), driven by the real client of
`zstack-mcp-server` (unmodified) and by raw HTTP, against real service and agent processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from zstack_mcp.zstack_client import ZStackClient

from image_service.protocol.inventories import BackupStorageInventory, ImageInventory
from tests.conftest import Proc, Stack
from tests.helpers import closed_port, wait_for
from tests.integration.private_postgres import PrivatePostgres

IMAGE = "org.zstack.header.image."
BACKUP = "org.zstack.header.storage.backup."
IDENTITY = "org.zstack.header.identity."


async def start_portal(stack: Stack, *extra: str) -> tuple[Proc, str]:
    """Replace the stack's first replica with one that serves HTTP; returns it and its URL."""
    if stack.services and stack.services[0].running:
        stack.services[0].terminate()
    port = closed_port()
    proc = stack.start_service("--http-listen", f"127.0.0.1:{port}", *extra)
    url = f"http://127.0.0.1:{port}"
    await wait_ready(url)
    return proc, url


async def wait_ready(url: str, timeout: float = 30) -> None:
    async def ready() -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout)


async def post(url: str, body: Any, *, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/zstack/api/",
            data=data,
            headers={"Content-Type": "application/json"},
            allow_redirects=False,
        ) as response,
    ):
        text = await response.text()
        assert "Traceback" not in text
        return response.status, json.loads(text)


def result_of(envelope: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The one class and body inside a Done envelope's `result` string."""
    assert envelope["state"] == "Done", envelope
    decoded = json.loads(envelope["result"])
    assert isinstance(decoded, dict) and len(decoded) == 1, decoded
    ((cls, body),) = decoded.items()
    return cls, body


async def log_in(url: str, password: str = "password", account: str = "admin") -> dict[str, Any]:
    """The body of APILogInReply for `account` and `password` (sent as ZStack clients do)."""
    status, envelope = await post(
        url,
        {
            f"{IDENTITY}APILogInByAccountMsg": {
                "accountName": account,
                "password": hashlib.sha512(password.encode()).hexdigest(),
            }
        },
    )
    assert status == 200
    cls, body = result_of(envelope)
    assert cls == f"{IDENTITY}APILogInReply", cls
    return body


async def login(url: str, password: str = "password") -> str:
    """A new session of admin."""
    body = await log_in(url, password)
    assert body["success"], body
    return str(body["inventory"]["uuid"])


async def metrics_of(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], series: str, **labels: str
) -> float:
    return metrics.get((series, tuple(sorted(labels.items()))), 0.0)


async def test_the_real_zstack_client_drives_the_portal(stack: Stack) -> None:
    # No wait: every call that writes answers Processing and the client polls, as it would
    # for a large image.
    _proc, url = await start_portal(stack, "--http-wait", "0")
    agent = await stack.start_agent()
    image_url, md5 = stack.http.add_qcow2("centos.qcow2")
    client = ZStackClient(api_url=url, account="admin", password="password")
    polls: list[str] = []
    poll_job = client._poll_job

    async def counted_poll(location: str) -> dict[str, Any]:
        polls.append(location)
        return await poll_job(location)

    client._poll_job = counted_poll  # type: ignore[method-assign]
    try:
        session = await client.login()
        assert len(session.uuid) == 32 and session.account_uuid

        bs = await client.execute(
            "QueryBackupStorage",
            f"{BACKUP}APIQueryBackupStorageMsg",
            {"conditions": [], "replyWithCount": True, "limit": 50},
        )
        assert bs["total"] == 1 and bs["inventories"][0]["uuid"] == agent.uuid
        BackupStorageInventory.model_validate(bs["inventories"][0])

        added = await client.execute(
            "AddImage",
            f"{IMAGE}APIAddImageMsg",
            {
                "name": "CentOS7",
                "url": image_url,
                "format": "qcow2",
                "mediaType": "RootVolumeTemplate",
                "platform": "Linux",
                "backupStorageUuids": [agent.uuid],
                "systemTags": [],
            },
            is_async=True,
        )
        image = added["inventory"]
        assert image["status"] == "Ready" and image["md5Sum"] == md5
        assert polls and polls[-1].startswith(f"{url}/zstack/api/result/")
        ImageInventory.model_validate(image)  # the published schema is what is sent
        other = await client.execute(
            "AddImage",
            f"{IMAGE}APIAddImageMsg",
            {
                "name": "ubuntu",
                "url": image_url,
                "format": "qcow2",
                "backupStorageUuids": [agent.uuid],
            },
        )
        other_uuid = other["inventory"]["uuid"]

        async def query(*conditions: dict[str, Any]) -> dict[str, Any]:
            return await client.execute(
                "QueryImage",
                f"{IMAGE}APIQueryImageMsg",
                {"conditions": list(conditions), "replyWithCount": True, "limit": 50},
            )

        by_name = await query({"name": "name", "op": "=", "value": "CentOS7"})
        assert [i["uuid"] for i in by_name["inventories"]] == [image["uuid"]]
        assert by_name["total"] == 1
        like = await query({"name": "name", "op": "like", "value": "%ent%"})
        assert [i["uuid"] for i in like["inventories"]] == [image["uuid"]]
        both = await query({"name": "uuid", "op": "in", "value": f"{image['uuid']},{other_uuid}"})
        assert both["total"] == 2 and len(both["inventories"]) == 2

        updated = await client.execute(
            "UpdateImage",
            f"{IMAGE}APIUpdateImageMsg",
            {"uuid": image["uuid"], "name": "CentOS7.9", "description": "golden"},
        )
        assert updated["inventory"]["name"] == "CentOS7.9"
        disabled = await client.execute(
            "ChangeImageState",
            f"{IMAGE}APIChangeImageStateMsg",
            {"uuid": image["uuid"], "stateEvent": "disable"},
        )
        assert disabled["inventory"]["state"] == "Disabled"

        # A stale session: the client logs in again and retries, unaided.
        old = client.session
        assert old is not None
        await stack.db.execute(
            "UPDATE session SET expires_at = now() - interval '1 second' WHERE uuid = $1",
            old.uuid,
        )
        again = await query({"name": "state", "op": "=", "value": "Disabled"})
        assert [i["uuid"] for i in again["inventories"]] == [image["uuid"]]
        assert client.session is not None and client.session.uuid != old.uuid

        deleted = await client.execute(
            "DeleteImage", f"{IMAGE}APIDeleteImageMsg", {"uuid": other_uuid}
        )
        assert deleted.get("success") is True
        gone = await query({"name": "uuid", "op": "=", "value": other_uuid})
        assert gone["total"] == 0

        current = client.session.uuid
    finally:
        await client.logout()
    assert await stack.db.fetchval("SELECT count(*) FROM session WHERE uuid = $1", current) == 0
    # The AddImage calls went through the inbox like any API message: each once.
    assert (
        await stack.db.fetchval(
            "SELECT count(*) FROM inbox WHERE message_id LIKE 'portal-%' AND api = 'AddImage'"
        )
        == 2
    )


async def test_bad_http_input_gets_zstack_errors_and_changes_nothing(stack: Stack) -> None:
    _proc, url = await start_portal(stack)
    before = await stack.db.fetchval("SELECT count(*) FROM inbox")

    status, body = await post(url, None, raw=b"x" * (1024 * 1024 + 1))
    assert status == 413 and body["success"] is False and body["error"]["code"] == "SYS.1007"
    status, body = await post(url, None, raw=b"{not json")
    assert status == 400 and body["error"]["code"] == "SYS.1007"
    assert "not JSON" in body["error"]["details"]
    status, body = await post(url, None, raw=b"\xff\xfe")
    assert status == 400
    status, body = await post(url, None, raw=b"[" * 100000)
    assert status == 400
    status, body = await post(
        url, {f"{IMAGE}APIQueryImageMsg": {}, f"{IMAGE}APIDeleteImageMsg": {}}
    )
    assert status == 400 and "exactly one key" in body["error"]["details"]
    status, body = await post(url, {"org.zstack.header.vm.APIDestroyVmInstanceMsg": {}})
    assert status == 400 and body["error"]["code"] == "SYS.1008"
    status, body = await post(url, {f"{IMAGE}APIQueryImageMsg": []})
    assert status == 400 and body["error"]["code"] == "SYS.1007"
    # A lone surrogate, NaN, UTF-16: not JSON as the portal reads it (strict UTF-8).
    for raw in (
        b'{"\\ud800": {}}',
        b'{"org.zstack.header.identity.APILogInByAccountMsg": {"accountName": "\\ud800",'
        b' "password": "x"}}',
        b'{"org.zstack.header.image.APIQueryImageMsg": {"limit": NaN}}',
        '{"a": 1}'.encode("utf-16"),
    ):
        status, body = await post(url, None, raw=raw)
        assert status == 400 and body["error"]["code"] == "SYS.1007", raw
    status, body = await post(url, {f"{IMAGE}APIQueryImageMsg": {"session": "s"}})
    assert status == 200 and result_of(body)[1]["error"]["code"] == "ID.1001"
    # A body over the limit without a Content-Length (chunked) is cut off all the same.

    async def chunks() -> Any:
        for _ in range(70):
            yield b" " * 16384

    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/zstack/api/", data=chunks()) as response,
    ):
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "SYS.1007"
    # Login fields of the wrong type, or absurd: ID.1000 or SYS.1007, never a crash.
    for fields in (
        {"accountName": ["admin"], "password": "x"},
        {"accountName": "admin", "password": {"$ne": None}},
        {"accountName": "a" * 100000, "password": "x"},
        {"accountName": "admin' OR '1'='1", "password": "x"},
        {"accountName": "ad\x00min", "password": "x"},
    ):
        status, envelope = await post(url, {f"{IDENTITY}APILogInByAccountMsg": fields})
        assert status == 200
        _cls, reply = result_of(envelope)
        assert reply["success"] is False
        assert reply["error"]["code"] in ("ID.1000", "SYS.1007"), reply

    # No session, a forged one, an expired one: ID.1001 inside a Done reply of the class.
    for session in (None, {"uuid": "0" * 32}, {"uuid": "'; DROP TABLE image; --"}):
        params: dict[str, Any] = {"conditions": []}
        if session is not None:
            params["session"] = session
        status, envelope = await post(url, {f"{IMAGE}APIQueryImageMsg": params})
        assert status == 200
        cls, reply = result_of(envelope)
        assert cls == f"{IMAGE}APIQueryImageReply"
        assert reply["success"] is False and reply["error"]["code"] == "ID.1001"

    # A wrong password: ID.1000; the account locks after five failures in a row, and even
    # the right password is refused until the lock ends.
    for _ in range(5):
        reply = await log_in(url, "guess")
        assert reply["error"]["code"] == "ID.1000"
        assert "wrong account name or password" in reply["error"]["details"]
    reply = await log_in(url, "password")
    assert reply["error"]["code"] == "ID.1000"
    assert "too many failed logins" in reply["error"]["details"]
    await asyncio.sleep(1.2)  # the first lock lasts one second
    session = await login(url)
    # Correct logins at once are never counted as failures, however many.
    sessions = await asyncio.gather(*(login(url) for _ in range(8)))
    assert len(set(sessions)) == 8
    # A name that does not exist locks the same way: the answers do not tell names apart.
    for attempt in range(6):
        reply = await log_in(url, "x", account="root")
        expected = "wrong account name" if attempt < 5 else "too many failed logins"
        assert expected in reply["error"]["details"], (attempt, reply)
    # The lock is for this name only: admin still logs in from the same address.
    assert await login(url)

    # Parameters: unknown, mistyped, a bad query op: SYS.1007 naming them.
    auth = {"session": {"uuid": session}}
    status, envelope = await post(
        url, {f"{IMAGE}APIUpdateImageMsg": {**auth, "uuid": "a" * 32, "bogus": 1}}
    )
    _cls, reply = result_of(envelope)
    assert reply["error"]["code"] == "SYS.1007" and "bogus" in reply["error"]["details"]
    assert reply["error"]["opaque"]["code"] == "INVALID_ARGUMENT"
    status, envelope = await post(
        url,
        {
            f"{IMAGE}APIQueryImageMsg": {
                **auth,
                "conditions": [{"name": "name", "op": "~=", "value": "x"}],
            }
        },
    )
    _cls, reply = result_of(envelope)
    assert reply["error"]["code"] == "SYS.1007" and "conditions[0].op" in reply["error"]["details"]
    status, envelope = await post(
        url,
        {
            f"{IMAGE}APIQueryImageMsg": {
                **auth,
                "conditions": [{"name": "nope", "op": "=", "value": "x"}],
            }
        },
    )
    _cls, reply = result_of(envelope)
    assert reply["error"]["code"] == "SYS.1007"
    status, envelope = await post(
        url, {f"{IMAGE}APIUpdateImageMsg": {**auth, "uuid": "a" * 32, "description": "a\u0000b"}}
    )
    _cls, reply = result_of(envelope)
    assert reply["error"]["code"] == "SYS.1007" and "NUL" in reply["error"]["details"]
    status, envelope = await post(
        url, {f"{IMAGE}APIDeleteImageMsg": {**auth, "uuid": "b" * 32, "deleteMode": "Sometimes"}}
    )
    _cls, reply = result_of(envelope)
    assert reply["error"]["code"] == "SYS.1007"
    status, envelope = await post(
        url, {f"{IMAGE}APIChangeImageStateMsg": {**auth, "uuid": "c" * 32, "stateEvent": "enable"}}
    )
    _cls, reply = result_of(envelope)
    assert reply["error"]["code"] == "SYS.1003"

    async with aiohttp.ClientSession() as http:
        for path in (
            "/zstack/api/result/" + "f" * 32,
            "/zstack/api/result/..%2F..%2Fetc",
            "/zstack/api/result/%ED%A0%80",
            "/nothing",
            "/%ED%A0%80%FF",
        ):
            async with http.get(url + path, allow_redirects=False) as response:
                assert response.status == 404
                assert (await response.json())["success"] is False
        async with http.get(url + "/zstack/api", allow_redirects=False) as response:
            assert response.status == 405
            assert (await response.json())["error"]["code"] == "SYS.1007"
        # No redirect, with or without the trailing slash.
        async with http.post(
            url + "/zstack/api",
            json={f"{IDENTITY}APIValidateSessionMsg": {**auth, "sessionUuid": session}},
            allow_redirects=False,
        ) as response:
            assert response.status == 200
            _cls, reply = result_of(await response.json())
            assert reply["validSession"] is True
    # Every call but login needs a valid session: ValidateSession and LogOut too.
    for cls in ("APIValidateSessionMsg", "APILogOutMsg"):
        status, envelope = await post(url, {f"{IDENTITY}{cls}": {"sessionUuid": session}})
        _cls, reply = result_of(envelope)
        assert reply["success"] is False and reply["error"]["code"] == "ID.1001", cls
    other = await login(url)
    status, envelope = await post(
        url, {f"{IDENTITY}APIValidateSessionMsg": {**auth, "sessionUuid": "0" * 32}}
    )
    assert result_of(envelope)[1]["validSession"] is False
    status, envelope = await post(url, {f"{IDENTITY}APILogOutMsg": {**auth, "sessionUuid": other}})
    assert result_of(envelope)[1]["success"] is True
    assert await stack.db.fetchval("SELECT count(*) FROM session WHERE uuid = $1", other) == 0
    status, envelope = await post(url, {f"{IDENTITY}APIValidateSessionMsg": auth})
    assert result_of(envelope)[1]["validSession"] is True  # the caller's own, by default

    assert await stack.db.fetchval("SELECT count(*) FROM image") == 0
    # Refused before any API ran: nothing in the inbox but the five calls the APIs refused
    # (UpdateImage twice, QueryImage, DeleteImage, ChangeImageState).
    assert await stack.db.fetchval("SELECT count(*) FROM inbox") - before == 5


async def test_any_replica_answers_a_poll(stack: Stack) -> None:
    _first, url = await start_portal(stack, "--http-wait", "0")
    port = closed_port()
    stack.start_service("--http-listen", f"127.0.0.1:{port}")
    other = f"http://127.0.0.1:{port}"
    await wait_ready(other)
    agent = await stack.start_agent()
    image_url, _md5 = stack.http.add_qcow2("poll.qcow2")
    session = await login(url)
    status, envelope = await post(
        url,
        {
            f"{IMAGE}APIAddImageMsg": {
                "session": {"uuid": session},
                "name": "poll",
                "url": image_url,
                "format": "qcow2",
                "backupStorageUuids": [agent.uuid],
            }
        },
    )
    assert status == 200 and envelope["state"] == "Processing"
    assert set(envelope) >= {"uuid", "state", "createdDate"}

    async def done() -> dict[str, Any] | None:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{other}/zstack/api/result/{envelope['uuid']}") as response,
        ):
            assert response.status == 200
            polled = await response.json()
        return polled if polled["state"] == "Done" else None

    polled = await wait_for(done, 30)
    cls, reply = result_of(polled)
    assert cls == f"{IMAGE}APIAddImageEvent"
    assert reply["success"] is True and reply["inventory"]["status"] == "Ready"
    assert polled["finishedDate"] and polled["uuid"] == envelope["uuid"]


async def test_metrics_move_with_traffic(stack: Stack) -> None:
    _proc, url = await start_portal(stack)
    agent = await stack.start_agent()
    before = await metrics_of(url)
    session = await login(url)
    image_url, _md5 = stack.http.add_qcow2("metrics.qcow2")
    _status, envelope = await post(
        url,
        {
            f"{IMAGE}APIAddImageMsg": {
                "session": {"uuid": session},
                "name": "m",
                "url": image_url,
                "format": "qcow2",
                "backupStorageUuids": [agent.uuid],
            }
        },
    )
    _cls, reply = result_of(envelope)
    size = reply["inventory"]["size"]
    await stack.call("QueryImage", {})  # over the bus: counted the same way
    await post(url, {f"{IMAGE}APIQueryImageMsg": {"session": {"uuid": session}, "conditions": []}})
    await stack.call("DeleteImage", {"uuid": "d" * 32, "bogus": True})
    after = await metrics_of(url)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("image_api_calls_total", api="AddImage", outcome="success") == 1
    assert moved("image_api_calls_total", api="QueryImage", outcome="success") == 2
    assert moved("image_api_calls_total", api="DeleteImage", outcome="INVALID_ARGUMENT") == 1
    assert moved("image_api_duration_seconds_count", api="AddImage") == 1
    assert moved("image_downloaded_bytes_total") == size
    assert sample(after, "image_backup_storages", status="Connected") == 1
    assert (
        sample(after, "image_backup_storage_total_capacity_bytes", uuid=agent.uuid, name=agent.name)
        > 0
    )
    assert sample(after, "image_database_up") == 1
    assert moved("image_http_requests_total", route="/zstack/api/", status="200") >= 3
    assert ("image_operations_in_flight", (("kind", "download"),)) in after
    assert sample(after, "image_operations_in_flight", kind="download") == 0
    assert moved("image_api_calls_total", api="LogIn", outcome="success") == 1


async def test_agent_serves_metrics_and_health(stack: Stack) -> None:
    port = closed_port()
    agent = await stack.start_agent("bs-m", "--http-listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
        assert response.status == 200
    before = await metrics_of(url)
    image_url, _md5 = stack.http.add_qcow2("agent.qcow2")
    reply = await stack.add_image(image_url, [agent], format="qcow2")
    assert reply["success"], reply
    bad = await stack.add_image(stack.http.url("files/missing"), [agent], format="qcow2")
    assert not bad["success"]
    after = await metrics_of(url)
    assert (
        sample(after, "backup_agent_stored_bytes_total", kind="download")
        - sample(before, "backup_agent_stored_bytes_total", kind="download")
        == reply["inventory"]["size"]
    )
    assert sample(after, "backup_agent_failures_total", code="DOWNLOAD_FAILED") == 1
    assert sample(after, "backup_agent_transfers_in_flight", kind="download") == 0
    assert sample(after, "backup_agent_total_capacity_bytes") > 0
    assert sample(after, "backup_agent_available_capacity_bytes") > 0

    # The agent's HTTP side only reports: hostile requests change nothing and stop nothing.
    files_before = agent.files()
    async with aiohttp.ClientSession() as http:
        for method, path, kwargs in (
            ("POST", "/metrics", {"data": b"x" * (2 * 1024 * 1024)}),
            ("PUT", "/healthz", {"data": b"{}"}),
            ("GET", "/../../.agent/identity.json", {}),
            ("GET", "/%ED%A0%80", {}),
            ("GET", "/metrics", {"headers": {"X-Big": "x" * 100_000}}),
        ):
            async with http.request(method, url + path, **kwargs) as response:
                assert response.status in (400, 404, 405, 413, 431), (method, path)
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
    assert agent.proc.running and agent.files() == files_before
    assert (await stack.wait_connected(agent))["status"] == "Connected"


async def test_set_password(stack: Stack) -> None:
    _proc, url = await start_portal(stack)
    session = await login(url)

    async def set_password(*args: str, stdin: bytes) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "image_service.main",
            "--database-url",
            stack.database_url,
            "set-password",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await process.communicate(stdin)
        return process.returncode or 0, out.decode()

    code, out = await set_password("admin", stdin=b"s3cret\n")
    assert code == 0, out
    stored = await stack.db.fetchval("SELECT password_hash FROM account WHERE name = 'admin'")
    assert stored.startswith("scrypt$") and hashlib.sha512(b"s3cret").hexdigest() not in stored
    # The old sessions end with the old password.
    _status, envelope = await post(
        url, {f"{IMAGE}APIQueryImageMsg": {"session": {"uuid": session}}}
    )
    _cls, reply = result_of(envelope)
    assert reply["error"]["code"] == "ID.1001"
    await login(url, "s3cret")
    code, out = await set_password("operator", stdin=b"x\n")
    assert code == 1 and "--create" in out
    code, out = await set_password("operator", "--create", stdin=b"op-pass\n")
    assert code == 0, out
    code, out = await set_password("admin", stdin=b"\n")
    assert code == 1 and "empty" in out
    client = ZStackClient(api_url=url, account="operator", password="op-pass")
    try:
        assert (await client.login()).account_uuid
    finally:
        await client.logout()


@pytest.mark.parametrize("missing", ["accountName", "password"])
async def test_login_needs_both_fields(stack: Stack, missing: str) -> None:
    _proc, url = await start_portal(stack)
    fields = {"accountName": "admin", "password": hashlib.sha512(b"password").hexdigest()}
    del fields[missing]
    status, envelope = await post(url, {f"{IDENTITY}APILogInByAccountMsg": fields})
    assert status == 200
    _cls, reply = result_of(envelope)
    assert reply["success"] is False and reply["error"]["code"] == "SYS.1007"


async def test_readyz_follows_the_database(stack: Stack) -> None:
    pg = PrivatePostgres()
    try:
        await asyncio.to_thread(pg.init)
        await asyncio.to_thread(pg.start)
        stack.services[0].terminate()
        port = closed_port()
        stack.start_service("--http-listen", f"127.0.0.1:{port}", database_url=pg.url)
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url)

        async def readyz() -> tuple[int, dict[str, Any]]:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as response:
                return response.status, await response.json()

        await asyncio.to_thread(pg.stop)
        status, body = await wait_for(lambda: _status_is(readyz, 503), 20)
        assert "database" in body["reason"]
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
            assert response.status == 200
        assert sample(await metrics_of(url), "image_database_up") == 0
        status, envelope = await post(
            url,
            {f"{IDENTITY}APILogInByAccountMsg": {"accountName": "admin", "password": "x"}},
        )
        assert status == 503 and envelope["error"]["code"] == "SYS.1012"

        await asyncio.to_thread(pg.start)
        await wait_for(lambda: _status_is(readyz, 200), 30)
        assert await login(url)
        assert sample(await metrics_of(url), "image_database_up") == 1
    finally:
        for proc in stack.services[1:]:
            proc.kill()
        await asyncio.to_thread(pg.destroy)


async def _status_is(
    probe: Callable[[], Awaitable[tuple[int, dict[str, Any]]]], expected: int
) -> tuple[int, dict[str, Any]] | None:
    status, body = await probe()
    return (status, body) if status == expected else None


async def test_a_stored_portal_reply_is_notified_at_once(stack: Stack) -> None:
    """The trigger of migration 6: the replica holding the request hears the reply stored by
    whichever replica finished the call (and nothing else)."""
    heard: list[str] = []
    got = asyncio.Event()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        heard.append(payload)
        got.set()

    await stack.db.add_listener("image_portal_finished", on_notify)
    try:
        for message_id in ("portal-" + "1" * 32, "bus-message"):
            await stack.db.execute(
                "INSERT INTO inbox (message_id, api) VALUES ($1, 'AddImage')", message_id
            )
            await stack.db.execute(
                "UPDATE inbox SET reply = '{}'::json WHERE message_id = $1", message_id
            )
        await asyncio.wait_for(got.wait(), 10)
        # A second update of a finished reply says nothing more.
        await stack.db.execute(
            "UPDATE inbox SET reply = '{}'::json WHERE message_id = $1", "portal-" + "1" * 32
        )
        await stack.db.execute("SELECT 1")
    finally:
        await stack.db.remove_listener("image_portal_finished", on_notify)
    assert heard == ["portal-" + "1" * 32]
