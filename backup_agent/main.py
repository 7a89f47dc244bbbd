"""`backup-agent`: serve one directory as a backup storage of the image service."""

from __future__ import annotations

import asyncio
import logging
import signal

from backup_agent.agent import Agent
from backup_agent.config import AgentSettings
from backup_agent.layout import IdentityMismatch
from image_service.protocol.config import exit_with, options_parser, settings_from
from image_service.protocol.transport import WrongBrokerUser


def parse_args(argv: list[str] | None = None) -> AgentSettings:
    parser = options_parser(AgentSettings, prog="backup-agent", description=__doc__)
    settings = settings_from(AgentSettings, parser, parser.parse_args(argv))
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return settings


async def _run(settings: AgentSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(settings)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()


def main(argv: list[str] | None = None) -> None:
    try:
        asyncio.run(_run(parse_args(argv)))
    except (IdentityMismatch, WrongBrokerUser) as exc:
        exit_with("backup-agent", str(exc), 2)


if __name__ == "__main__":
    main()
