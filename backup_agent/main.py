"""`backup-agent`: serve one directory as a backup storage of the image service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

from backup_agent.agent import Agent, AgentSettings
from backup_agent.fetchers import FetchSettings


def parse_args(argv: list[str] | None = None) -> AgentSettings:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="backup-agent", description=__doc__)
    parser.add_argument("--root", required=True, type=Path, help="where images are stored")
    parser.add_argument("--name", required=True, help="the backup storage's name")
    parser.add_argument(
        "--amqp-url", default=env("IMAGE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--namespace", default=env("IMAGE_NAMESPACE", "image"))
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--ssh-key", help="private key used for sftp sources")
    parser.add_argument(
        "--known-hosts",
        default="~/.ssh/known_hosts",
        help="known_hosts file of the sftp hosts trusted (default: %(default)s)",
    )
    parser.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="accept the host key of an sftp host not in --known-hosts yet, and record it there",
    )
    parser.add_argument(
        "--hostname", default=socket.getfqdn(), help="how volume services reach this host"
    )
    parser.add_argument(
        "--capacity", type=int, help="bytes this backup storage may hold (default: the disk)"
    )
    parser.add_argument("--max-downloads", type=int, default=4)
    parser.add_argument(
        "--volume-root",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="a directory whose volumes (file:// sources) may become templates; repeatable",
    )
    parser.add_argument("--connect-timeout", type=float, default=15.0, metavar="SECONDS")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a source that sends nothing for this long fails the download",
    )
    parser.add_argument("--log-level", default=env("IMAGE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    if args.heartbeat_interval <= 0:
        parser.error("--heartbeat-interval must be positive")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return AgentSettings(
        root=args.root,
        name=args.name,
        amqp_url=args.amqp_url,
        namespace=args.namespace,
        heartbeat_interval=args.heartbeat_interval,
        hostname=args.hostname,
        capacity=args.capacity,
        max_downloads=args.max_downloads,
        volume_roots=tuple(Path(os.path.realpath(p)) for p in args.volume_root),
        fetch=FetchSettings(
            connect_timeout=args.connect_timeout,
            stall_timeout=args.stall_timeout,
            ssh_key=args.ssh_key,
            known_hosts=args.known_hosts,
            trust_on_first_use=args.trust_on_first_use,
        ),
    )


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
    asyncio.run(_run(parse_args(argv)))


if __name__ == "__main__":
    main()
