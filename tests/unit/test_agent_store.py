"""The agent never replaces a stored file (contract section 8, agent hygiene), except the one
its own op was moving into place when the agent stopped: the journal records that move first,
so a resumed op finishes it. Runs the real `Work._store` and `qemu-img` on a temporary root."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from backup_agent.agent import Agent
from backup_agent.config import AgentSettings
from backup_agent.fetchers import OpFailure
from backup_agent.inspection import ImageFacts
from image_service.protocol.agent import DownloadCommand

# What inspection found; these tests are about placing the file, not about inspecting it.
FACTS = ImageFacts(virtual_size=5000, actual_size=8192)


def command(root: Path, image: str, op_id: str) -> DownloadCommand:
    return DownloadCommand(
        opId=op_id,
        imageUuid=image,
        backupStorageUuid="b" * 32,
        installPath=f"{root}/templates/{image}/a.template",
        url="http://127.0.0.1/a.raw",
        format="raw",
    )


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    settings = AgentSettings(root=tmp_path / "root", name="bs")  # type: ignore[call-arg]
    agent = Agent(settings)
    agent.layout.prepare()
    agent.uuid = "b" * 32
    agent.work = agent._make_work()
    return agent


async def store(agent: Agent, cmd: DownloadCommand, data: bytes) -> Path:
    partial = agent.layout.partial_path(cmd.opId)
    partial.write_bytes(data)
    final = agent.layout.resolve_install_path(cmd.installPath, cmd.imageUuid)
    agent.journal.begin(cmd.opId, cmd.model_dump(mode="json"))
    await agent.work._store(cmd, partial, final, len(data), "0" * 32, "0" * 64, FACTS)
    return final


def test_a_stored_file_is_never_replaced_by_another_op(agent: Agent) -> None:
    image = uuid.uuid4().hex
    first = command(agent.layout.root, image, str(uuid.uuid4()))
    final = asyncio.run(store(agent, first, b"golden" * 1000))
    second = command(agent.layout.root, image, str(uuid.uuid4()))
    with pytest.raises(OpFailure, match="already holds a stored image"):
        asyncio.run(store(agent, second, b"evil" * 1000))
    assert final.read_bytes() == b"golden" * 1000


def test_an_op_resumed_after_a_crash_in_its_move_may_finish_it(agent: Agent) -> None:
    """The agent stopped after the move and before the result was journalled: the file is
    there, the journal says this op was placing it, and the resumed op succeeds."""
    image = uuid.uuid4().hex
    cmd = command(agent.layout.root, image, str(uuid.uuid4()))
    final = asyncio.run(store(agent, cmd, b"image" * 1000))
    agent.journal.placing(cmd.opId, cmd.model_dump(mode="json"), str(final))  # as at the crash
    partial = agent.layout.partial_path(cmd.opId)
    partial.write_bytes(b"image" * 1000)
    result = asyncio.run(agent.work._store(cmd, partial, final, 5000, "0" * 32, "0" * 64, FACTS))
    assert result.success and final.read_bytes() == b"image" * 1000
