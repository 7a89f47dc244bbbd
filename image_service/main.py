"""`image-service`: run the service, or `image-service migrate` to only create/migrate the schema."""

from __future__ import annotations

import asyncio
import logging
import signal

from image_service.config import ServiceSettings
from image_service.protocol.config import exit_with, options_parser, settings_from
from image_service.protocol.transport import WrongBrokerUser
from image_service.service import run_forever
from image_service.store import LATEST_VERSION, SchemaTooNew, Store

PROG = "image-service"


def parse_args(argv: list[str] | None = None) -> tuple[str, ServiceSettings]:
    parser = options_parser(ServiceSettings, prog=PROG, description=__doc__)
    parser.add_argument("command", nargs="?", choices=["run", "migrate"], default="run")
    args = parser.parse_args(argv)
    settings = settings_from(ServiceSettings, parser, args)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return str(args.command), settings


async def _migrate(settings: ServiceSettings) -> list[int]:
    store = await Store.open(settings.database_url, min_size=1, max_size=1)
    try:
        return await store.migrate()
    finally:
        await store.close()


async def _run(settings: ServiceSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_forever(settings, stop)


def main(argv: list[str] | None = None) -> None:
    command, settings = parse_args(argv)
    try:
        if command == "migrate":
            applied = asyncio.run(_migrate(settings))
            done = ", ".join(str(v) for v in applied) if applied else "none pending"
            logging.getLogger(PROG).info("schema at version %d (applied: %s)", LATEST_VERSION, done)
        else:
            asyncio.run(_run(settings))
    except SchemaTooNew as exc:
        exit_with(PROG, str(exc))
    except WrongBrokerUser as exc:
        exit_with(PROG, str(exc), 2)


if __name__ == "__main__":
    main()
