"""`image-service`: run the service, or `image-service migrate` to only create/migrate the schema."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from image_service.service import Settings, run_forever
from image_service.store import Store


def parse_args(argv: list[str] | None = None) -> tuple[str | None, Settings]:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="image-service", description=__doc__)
    parser.add_argument("command", nargs="?", choices=["run", "migrate"], default="run")
    parser.add_argument("--amqp-url", default=os.environ.get("IMAGE_AMQP_URL", defaults.amqp_url))
    parser.add_argument(
        "--database-url", default=os.environ.get("IMAGE_DATABASE_URL", defaults.database_url)
    )
    parser.add_argument(
        "--namespace", default=os.environ.get("IMAGE_NAMESPACE", defaults.namespace)
    )
    parser.add_argument(
        "--resend-after",
        type=float,
        default=float(os.environ.get("IMAGE_RESEND_AFTER", defaults.resend_after)),
        help="seconds before an unanswered agent command is sent again (default 30)",
    )
    parser.add_argument(
        "--monitor-interval",
        type=float,
        default=float(os.environ.get("IMAGE_MONITOR_INTERVAL", defaults.monitor_interval)),
        help="seconds between heartbeat checks and lease sweeps (default 1)",
    )
    parser.add_argument("--log-level", default=os.environ.get("IMAGE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings(
        amqp_url=args.amqp_url,
        database_url=args.database_url,
        namespace=args.namespace,
        resend_after=args.resend_after,
        monitor_interval=args.monitor_interval,
    )
    return args.command, settings


async def _migrate(settings: Settings) -> None:
    store = await Store.open(settings.database_url, min_size=1, max_size=1)
    try:
        await store.migrate()
    finally:
        await store.close()


async def _run(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_forever(settings, stop)


def main(argv: list[str] | None = None) -> None:
    command, settings = parse_args(argv)
    if command == "migrate":
        asyncio.run(_migrate(settings))
        logging.getLogger("image_service").info("schema is up to date")
    else:
        asyncio.run(_run(settings))


if __name__ == "__main__":
    main()
