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

    async def attempt(self, *, name: str, allowed: int, max_lock: float) -> AccountRow | None:
        """Count one login attempt; None when the account does not exist or is locked."""
        row = await self._row("account_attempt", name=name, allowed=allowed, max_lock=max_lock)
        return AccountRow(**row) if row is not None else None

    async def locked_for(self, name: str) -> float | None:
        value: float | None = await self._value("account_locked_for", name=name)
        return value

    async def succeeded(self, account_uuid: str) -> None:
        await self._execute("account_succeeded", uuid=account_uuid)

    async def create_session(self, *, uuid: str, account_uuid: str, timeout: float) -> SessionRow:
        row = await self._row(
            "session_create", uuid=uuid, account_uuid=account_uuid, timeout=timeout
        )
        session = _session(row)
        assert session is not None
        return session

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
