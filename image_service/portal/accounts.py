"""Accounts and sessions of the HTTP portal (contract section 11).

ZStack clients send the SHA-512 hex of the password, not the password. Stored as it is, that
hex would be the password itself for anyone who reads the table, so the store keeps only a
salted scrypt of it. Checking costs about 50 ms of CPU and 16 MiB, which is the point against
guessing; the checks run in threads, a few at a time, so that a flood of logins cannot take the
event loop or the memory with it.

Failed logins are counted in the database (every replica sees them) per account name and
client address: from the fifth failure in a row that name is locked for that address for 1, 2,
4 ... seconds, at most 5 minutes, and its password is not even checked. Per address, so that a
stranger cannot lock `admin` out for everyone; names that do not exist are counted and locked
the same way, so the answers do not tell which names exist. A correct login is never counted
as a failure, however many run at once. Checks wait for a turn (two at a time); when too many
wait, a login is refused at once ("busy") rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import uuid
from dataclasses import dataclass
from datetime import datetime

from image_service.pipeline import Transactions
from image_service.portal.zstack import ID_AUTHENTICATION, PortalError, zstack_date
from image_service.store import Tx
from image_service.store.accounts import SessionRow

ADMIN = "admin"
# scrypt's cost: N=2^14, r=8 (16 MiB), p=1, as OWASP's minimum for scrypt suggests.
_N, _R, _P, _DKLEN = 2**14, 8, 1, 32
_MAXMEM = 64 * 1024 * 1024
# Failures in a row before the account locks, and the longest lock.
ALLOWED_FAILURES = 5
MAX_LOCK = 300.0
# Password checks at once in this process (each holds 16 MiB and a core for ~50 ms), and how
# many may wait for a turn before further logins are refused as busy.
_CHECKS = asyncio.Semaphore(2)
MAX_WAITING = 32
_waiting = 0


MAX_NAME = 255
MAX_WIRE = 1024


def account_name_problem(name: object) -> str | None:
    """Why `name` cannot be an account's name (None when it can)."""
    if not isinstance(name, str) or not name:
        return "accountName: a non-empty string"
    if len(name) > MAX_NAME:
        return f"accountName: at most {MAX_NAME} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "accountName: no control characters"
    try:
        name.encode()
    except UnicodeEncodeError:
        return "accountName: not valid Unicode (a lone surrogate)"
    return None


def wire_form(password: str) -> str:
    """What a ZStack client sends for `password`: the SHA-512 hex of its UTF-8."""
    return hashlib.sha512(password.encode()).hexdigest()


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=_DKLEN, maxmem=_MAXMEM
    )


def _normalise(wire: str) -> str:
    # Hex digests compare case-insensitively; anything else is compared as it is.
    if len(wire) == 128 and all(c in "0123456789abcdefABCDEF" for c in wire):
        return wire.lower()
    return wire


def hash_wire(wire: str) -> str:
    """The stored form of a wire password: `scrypt$N$r$p$salt$hash` (hex)."""
    salt = os.urandom(16)
    digest = _scrypt(_normalise(wire), salt)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def verify_wire(stored: str, wire: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            _normalise(wire).encode(),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest) // 2,
            maxmem=_MAXMEM,
        )
    except ValueError:
        return False
    return hmac.compare_digest(computed.hex(), digest)


# A stored hash no password matches: a login that names no account is checked against it, so
# that it takes as long as one that does.
_NOBODY = f"scrypt${_N}${_R}${_P}${'00' * 16}${'00' * _DKLEN}"


class Busy(Exception):
    """Too many logins wait for a password check in this process."""


async def _verify(stored: str, wire: str) -> bool:
    global _waiting
    if _waiting >= MAX_WAITING:
        raise Busy()
    _waiting += 1
    try:
        async with _CHECKS:
            return await asyncio.to_thread(verify_wire, stored, wire)
    finally:
        _waiting -= 1


async def hash_wire_async(wire: str) -> str:
    async with _CHECKS:
        return await asyncio.to_thread(hash_wire, wire)


@dataclass(frozen=True, slots=True)
class Session:
    uuid: str
    account_uuid: str
    created_at: datetime
    expires_at: datetime

    def inventory(self) -> dict[str, str | None]:
        """ZStack's SessionInventory (an account's login: its user is the account)."""
        return {
            "uuid": self.uuid,
            "accountUuid": self.account_uuid,
            "userUuid": self.account_uuid,
            "expiredDate": zstack_date(self.expires_at),
            "createDate": zstack_date(self.created_at),
        }


def _of(row: SessionRow) -> Session:
    return Session(row.uuid.strip(), row.account_uuid.strip(), row.created_at, row.expires_at)


async def ensure_admin(tx: Tx, password: str) -> None:
    """Create `admin` with `password` when it does not exist (the first start). The hash is
    computed only then: it costs a tenth of a second at every start otherwise."""
    if await tx.accounts.by_name(ADMIN) is not None:
        return
    await tx.accounts.ensure(
        uuid=uuid.uuid4().hex, name=ADMIN, password_hash=await hash_wire_async(wire_form(password))
    )


async def set_password(tx: Tx, name: str, password: str, *, create: bool) -> bool:
    """Set `name`'s password and end its sessions; True when the account was created.
    ValueError when `name` cannot be an account's name."""
    problem = account_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    stored = await hash_wire_async(wire_form(password))
    await tx.accounts.clear_failures(name)
    account_uuid = await tx.accounts.set_password(name=name, password_hash=stored)
    if account_uuid is not None:
        await tx.accounts.end_sessions_of(account_uuid)
        return False
    if not create:
        raise LookupError(name)
    await tx.accounts.create(uuid=uuid.uuid4().hex, name=name, password_hash=stored)
    return True


async def log_in(
    transactions: Transactions, account_name: str, wire: str, *, address: str, timeout: float
) -> Session:
    """A new session for the account, or PortalError ID.1000 (wrong, or locked for this
    client address). Raises Busy when too many logins wait for a check."""
    async with transactions.open() as ctx:
        locked = await ctx.tx.accounts.locked_for(name=account_name, address=address)
        account = await ctx.tx.accounts.by_name(account_name) if locked is None else None
    if locked is not None:
        raise PortalError(
            ID_AUTHENTICATION,
            f"too many failed logins from this address: try again in {max(locked, 0.1):.1f} s",
        )
    # A name that does not exist is checked against a hash nothing matches: the same cost.
    ok = await _verify(account.password_hash if account else _NOBODY, wire)
    async with transactions.open() as ctx:
        if ok and account is not None:
            await ctx.tx.accounts.succeeded(name=account_name, address=address)
            row = await ctx.tx.accounts.create_session(
                uuid=uuid.uuid4().hex,
                account_uuid=account.uuid,
                password_hash=account.password_hash,
                timeout=timeout,
            )
            if row is not None:
                return _of(row)
        else:
            await ctx.tx.accounts.failed(
                name=account_name, address=address, allowed=ALLOWED_FAILURES, max_lock=MAX_LOCK
            )
    raise PortalError(ID_AUTHENTICATION, "wrong account name or password")


async def use_session(tx: Tx, session_uuid: str | None, *, timeout: float) -> Session | None:
    """The caller's session, kept alive; None when it is missing, unknown or expired."""
    if not session_uuid or not _is_uuid(session_uuid):
        return None
    row = await tx.accounts.use_session(uuid=session_uuid.lower(), timeout=timeout)
    return _of(row) if row is not None else None


async def session_valid(tx: Tx, session_uuid: str | None) -> bool:
    if not session_uuid or not _is_uuid(session_uuid):
        return False
    return await tx.accounts.session_valid(session_uuid.lower())


async def log_out(tx: Tx, session_uuid: str | None) -> None:
    """End the session; ending one that is unknown or already over changes nothing."""
    if session_uuid and _is_uuid(session_uuid):
        await tx.accounts.end_session(session_uuid.lower())


def _is_uuid(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value)
