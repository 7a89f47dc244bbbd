"""Contract section 10 in the shared models and pure code: the inspect command and its result,
the capacity every result carries and how measurements are ordered, the global configuration's
options and their values, and the new APIs' parameters."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from backup_agent.layout import Gauge, Layout, allocated
from image_service import params
from image_service.cli import build_params
from image_service.globalconfig import (
    DELETION_POLICY,
    EXPUNGE_PERIOD,
    OPTIONS,
    DeletionPolicy,
    option,
)
from image_service.protocol.agent import AgentResult, Heartbeat, InspectCommand, parse_command

OP = str(uuid.uuid4())
IMG = "a" * 32
BS = "b" * 32
PATH = f"/srv/bs/templates/{IMG}/x.template"


def inspect(**changes: object) -> str:
    body = {
        "command": "inspect",
        "opId": OP,
        "imageUuid": IMG,
        "backupStorageUuid": BS,
        "installPath": PATH,
        "format": "qcow2",
        "checksums": True,
        "size": 10,
        **changes,
    }
    return json.dumps(body)


def test_the_inspect_command() -> None:
    command = parse_command(inspect())
    assert isinstance(command, InspectCommand)
    assert (command.checksums, command.size, command.format) == (True, 10, "qcow2")
    plain = parse_command(inspect(checksums=False, size=None))
    assert isinstance(plain, InspectCommand) and plain.size is None
    for bad in ({"checksums": "yes"}, {"size": -1}, {"format": "vmdk"}, {"installPath": ""}):
        with pytest.raises(ValidationError):
            parse_command(inspect(**bad))


def result(**changes: object) -> dict[str, object]:
    return {"opId": OP, "backupStorageUuid": BS, "success": True, **changes}


FACTS = {"size": 10, "actualSize": 4096, "virtualSize": 1 << 20, "md5Sum": "c" * 32}


def test_an_inspection_result_carries_its_findings_on_success_only() -> None:
    found = AgentResult.model_validate_json(json.dumps(result(inspected=FACTS)))
    assert found.inspected is not None and found.inspected.md5Sum == "c" * 32
    assert found.stored is None
    with pytest.raises(ValidationError, match="inspected"):
        AgentResult.model_validate_json(
            json.dumps(result(success=False, code="X", inspected=FACTS))
        )
    with pytest.raises(ValidationError):
        AgentResult.model_validate_json(json.dumps(result(inspected={**FACTS, "md5Sum": "x"})))


def test_capacity_comes_whole_or_not_at_all() -> None:
    full = result(totalCapacity=100, availableCapacity=40, capacitySeq=7)
    capacity = AgentResult.model_validate_json(json.dumps(full)).capacity
    assert capacity is not None and (capacity.total, capacity.available, capacity.seq) == (
        100,
        40,
        7,
    )
    assert AgentResult.model_validate_json(json.dumps(result())).capacity is None
    for partial in (
        result(totalCapacity=100, availableCapacity=40),
        result(capacitySeq=7),
        result(totalCapacity=100, availableCapacity=-1, capacitySeq=7),
        result(totalCapacity=100, availableCapacity="40", capacitySeq=7),
    ):
        with pytest.raises(ValidationError):
            AgentResult.model_validate_json(json.dumps(partial))
    beat = Heartbeat.model_validate(
        {
            "uuid": BS,
            "name": "bs",
            "url": "/srv",
            "hostname": "h",
            "totalCapacity": 1,
            "availableCapacity": 1,
            "capacitySeq": 3,
        }
    )
    assert beat.capacitySeq == 3


def test_measurements_are_numbered_in_order_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path)
    layout.prepare()

    async def measure_twice(quota: int) -> list[int]:
        gauge = Gauge(layout, quota)
        first, second = await asyncio.gather(gauge.measure(), gauge.measure())
        assert first.total == quota and first.available <= quota
        return [first.seq, second.seq]

    before = asyncio.run(measure_twice(1 << 30))
    after = asyncio.run(measure_twice(1 << 30))  # a restart of the agent
    assert before[0] < before[1] < after[0] < after[1]
    assert max(after) < 2**63
    # A directory replaced or restored from a backup (its count lost or set back), a minute
    # later, still numbers after everything the service saw: the clock is the floor.
    later = time.time() + 60
    monkeypatch.setattr("backup_agent.layout.time.time", lambda: later)
    (tmp_path / ".agent" / "incarnation.json").write_text('{"incarnation": 1}')
    restored = asyncio.run(measure_twice(1 << 30))
    assert restored[0] > after[1]
    monkeypatch.setattr("backup_agent.layout.time.time", lambda: later + 60)
    (tmp_path / ".agent" / "incarnation.json").write_text("not json")
    assert asyncio.run(measure_twice(1 << 30))[0] > restored[1]


def test_the_options_and_their_values() -> None:
    assert set(OPTIONS) == {"image.deletionPolicy", "image.expungePeriod"}
    assert (DELETION_POLICY.default, EXPUNGE_PERIOD.default) == ("Direct", "86400")
    assert option("image", "deletionPolicy") is DELETION_POLICY
    assert option("Image", "deletionPolicy") is None
    assert [DELETION_POLICY.parse(p) for p in ("Direct", " Delay ", "Never")] == list(
        DeletionPolicy
    )
    assert EXPUNGE_PERIOD.parse("0") == "0"
    assert EXPUNGE_PERIOD.parse(" 007 ") == "7"
    assert EXPUNGE_PERIOD.parse(str(2**31 - 1)) == str(2**31 - 1)
    for bad in ("delay", "", "Direct\x00"):
        with pytest.raises(ValueError, match="deletion policy"):
            DELETION_POLICY.parse(bad)
    for bad in ("-1", "1e3", "1.5", "٣", str(2**31), "", "9" * 30, "+5"):
        with pytest.raises(ValueError, match="seconds"):
            EXPUNGE_PERIOD.parse(bad)


def test_update_global_config_parameters() -> None:
    text = params.UpdateGlobalConfig.model_validate(
        {"category": "image", "name": "expungePeriod", "value": 60}
    )
    assert text.text == "60"
    for bad in (True, None, 1.5, ["1"], {"a": 1}, "x" * 2000, 2**64):
        with pytest.raises(ValidationError):
            params.UpdateGlobalConfig.model_validate_json(
                json.dumps({"category": "image", "name": "expungePeriod", "value": bad})
            )
    assert build_params(
        "UpdateGlobalConfig", ["category=image", "name=deletionPolicy", "value=Delay"]
    ) == {"category": "image", "name": "deletionPolicy", "value": "Delay"}
    query = build_params("QueryGlobalConfig", ["category=image", "value!=Direct"])
    assert query["conditions"] == [
        {"name": "category", "op": "=", "value": "image"},
        {"name": "value", "op": "!=", "value": "Direct"},
    ]
    listed = build_params("ExpungeImage", [f"uuid={IMG}", f"backupStorageUuids={BS},{IMG}"])
    assert listed["backupStorageUuids"] == [BS, IMG]


def test_the_gauge_tracks_what_the_agent_changes_and_walks_for_the_rest(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.prepare()
    quota = 1 << 30

    async def scenario() -> None:
        gauge = Gauge(layout, quota)
        assert (await gauge.measure()).available == layout.capacity(quota).available
        directory = layout.templates / IMG
        directory.mkdir()
        stored = directory / "x.template"
        async with gauge.changing() as changed:
            stored.write_bytes(os.urandom(3 * 4096))
            changed(allocated(stored))
        assert (await gauge.measure()).available == quota - allocated(stored)
        # A file changed behind the agent's back counts from the next walk on.
        outside = directory / "outside"
        outside.write_bytes(os.urandom(8192))
        assert (await gauge.measure()).available == quota - allocated(stored)
        gauge.REWALK_AFTER = 0.0
        assert (await gauge.measure()).available == layout.capacity(quota).available
        gauge.REWALK_AFTER = 3600.0
        async with gauge.changing() as changed:
            freed = allocated(stored)
            stored.unlink()
            changed(-freed)
        assert (await gauge.measure()).available == quota - allocated(outside)

    asyncio.run(scenario())
