"""Accounts and sessions of the HTTP portal (portal/accounts.py decides; this stores)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from image_service.store.group import QueryGroup, Record


@dataclass(frozen=True, slots=True)
class AccountRow:
    uuid: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class SessionRow:
    uuid: str
    account_uuid: str
    created_at: datetime
    expires_at: datetime


def _session(row: Record | None) -> SessionRow | None:
    return SessionRow(**row) if row is not None else None


class Accounts(QueryGroup, sql_file="accounts.sql"):
    __slots__ = ()

    async def ensure(self, *, uuid: str, name: str, password_hash: str) -> None:
        await self._execute("account_ensure", uuid=uuid, name=name, password_hash=password_hash)

    async def create(self, *, uuid: str, name: str, password_hash: str) -> bool:
        row = await self._row("account_create", uuid=uuid, name=name, password_hash=password_hash)
        return row is not None

    async def set_password(self, *, name: str, password_hash: str) -> str | None:
        """The account's uuid; None when there is no such account."""
        value: str | None = await self._value(
            "account_set_password", name=name, password_hash=password_hash
        )
        return value

    async def by_name(self, name: str) -> AccountRow | None:
        row = await self._row("account_by_name", name=name)
        return AccountRow(**row) if row is not None else None

    async def locked_for(self, *, name: str, address: str) -> float | None:
        """Seconds the name stays locked for the address; None when it is not."""
        value: float | None = await self._value("login_locked_for", name=name, address=address)
        return value

    async def failed(self, *, name: str, address: str, allowed: int, max_lock: float) -> int:
        """Count one failed login; the failures in a row so far."""
        value: int = await self._value(
            "login_failed", name=name, address=address, allowed=allowed, max_lock=max_lock
        )
        return value

    async def succeeded(self, *, name: str, address: str) -> None:
        await self._execute("login_succeeded", name=name, address=address)

    async def clear_failures(self, name: str) -> None:
        await self._execute("login_failures_clear", name=name)

    async def prune_failures(self, *, older_than: float) -> None:
        await self._execute("login_failures_prune", older_than=older_than)

    async def create_session(
        self, *, uuid: str, account_uuid: str, password_hash: str, timeout: float
    ) -> SessionRow | None:
        """A new session; None when the account's password is no longer `password_hash`."""
        row = await self._row(
            "session_create",
            uuid=uuid,
            account_uuid=account_uuid,
            password_hash=password_hash,
            timeout=timeout,
        )
        return _session(row)

    async def use_session(self, *, uuid: str, timeout: float) -> SessionRow | None:
        """The session, kept alive `timeout` seconds more; None when unknown or expired."""
        return _session(await self._row("session_use", uuid=uuid, timeout=timeout))

    async def session_valid(self, uuid: str) -> bool:
        return await self._value("session_valid", uuid=uuid) is not None

    async def end_session(self, uuid: str) -> None:
        await self._execute("session_end", uuid=uuid)

    async def end_sessions_of(self, account_uuid: str) -> None:
        await self._execute("session_end_account", account_uuid=account_uuid)

    async def prune_sessions(self) -> None:
        await self._execute("session_prune")
