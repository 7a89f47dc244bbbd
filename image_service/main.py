"""`image-service`: run the service; `image-service migrate` only creates or migrates the schema;
`image-service set-password ACCOUNT` sets a portal account's password (read from standard input,
or asked twice on a terminal) and ends the account's sessions. The portal's first admin password
comes from the environment only (IMAGE_ADMIN_PASSWORD; default "password"), never a flag."""

from __future__ import annotations

import asyncio
import getpass
import logging
import signal
import sys
from typing import NamedTuple

from image_service.config import ServiceSettings
from image_service.portal.accounts import set_password
from image_service.protocol.config import exit_with, options_parser, settings_from
from image_service.protocol.transport import WrongBrokerUser
from image_service.service import ListenFailed, run_forever
from image_service.store import LATEST_VERSION, SchemaTooNew, Store

PROG = "image-service"


class Invocation(NamedTuple):
    command: str  # run, migrate or set-password
    settings: ServiceSettings
    account: str | None  # set-password's ACCOUNT
    create: bool  # set-password --create


def parse_args(argv: list[str] | None = None) -> Invocation:
    parser = options_parser(ServiceSettings, prog=PROG, description=__doc__)
    parser.add_argument(
        "command", nargs="?", choices=["run", "migrate", "set-password"], default="run"
    )
    parser.add_argument("account", nargs="?", help="set-password: the account")
    parser.add_argument(
        "--create", action="store_true", help="set-password: create the account if it is new"
    )
    args = parser.parse_args(argv)
    if args.command == "set-password" and not args.account:
        parser.error("set-password needs the ACCOUNT")
    if args.command != "set-password" and (args.account or args.create):
        parser.error("ACCOUNT and --create go with set-password only")
    settings = settings_from(ServiceSettings, parser, args)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return Invocation(str(args.command), settings, args.account, bool(args.create))


def _read_password() -> str:
    """A new password: asked twice on a terminal, else the first line of standard input."""
    if sys.stdin.isatty():
        first = getpass.getpass("new password: ")
        if first != getpass.getpass("again: "):
            exit_with(PROG, "the two passwords differ", 1)
        password = first
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        exit_with(PROG, "the password is empty", 1)
    return password


async def _set_password(settings: ServiceSettings, account: str, create: bool) -> None:
    password = _read_password()
    store = await Store.open(settings.database_url, min_size=1, max_size=1)
    try:
        await store.migrate()
        async with store.transaction() as tx:
            created = await set_password(tx, account, password, create=create)
    except LookupError:
        exit_with(PROG, f"no account {account!r} (--create makes it)", 1)
    except ValueError as exc:
        exit_with(PROG, str(exc), 2)
    finally:
        await store.close()
    what = "created" if created else "password changed; its sessions are ended"
    print(f"account {account!r}: {what}")


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
    command, settings, account, create = parse_args(argv)
    try:
        if command == "set-password":
            assert account is not None
            asyncio.run(_set_password(settings, account, create))
        elif command == "migrate":
            applied = asyncio.run(_migrate(settings))
            done = ", ".join(str(v) for v in applied) if applied else "none pending"
            logging.getLogger(PROG).info("schema at version %d (applied: %s)", LATEST_VERSION, done)
        else:
            asyncio.run(_run(settings))
    except SchemaTooNew as exc:
        exit_with(PROG, str(exc))
    except WrongBrokerUser as exc:
        exit_with(PROG, str(exc), 2)
    except ListenFailed as exc:
        exit_with(PROG, str(exc), 2)


if __name__ == "__main__":
    main()
