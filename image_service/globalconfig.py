"""The global configuration options (contract section 10): what each one means, its default and
which values it takes.

Values are stored as text in `global_config` (migration 5 inserts each option's row with its
default) and read inside the transaction that acts on them, so an update applies in every
replica from the moment it commits; the update also NOTIFYs `CONFIG_CHANNEL`, which wakes the
loops that wait on a value (the expunger) at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from image_service.store import Tx

# PostgreSQL NOTIFY channels: an option changed; a reference turned Deleted.
CONFIG_CHANNEL = "image_global_config"
DELETED_CHANNEL = "image_ref_deleted"


class DeletionPolicy(StrEnum):
    Direct = "Direct"
    Delay = "Delay"
    Never = "Never"


# ASCII digits only (str.isdigit accepts other scripts' digits too).
_SECONDS = re.compile(r"[0-9]{1,10}")
MAX_EXPUNGE_PERIOD = 2**31 - 1


def _policy(value: str) -> str:
    try:
        return DeletionPolicy(value.strip()).value
    except ValueError:
        raise ValueError(
            f"{value!r} is not a deletion policy: one of {', '.join(DeletionPolicy)}"
        ) from None


def _seconds(value: str) -> str:
    text = value.strip()
    if not _SECONDS.fullmatch(text) or int(text) > MAX_EXPUNGE_PERIOD:
        raise ValueError(f"{value!r} is not a number of seconds from 0 to {MAX_EXPUNGE_PERIOD}")
    return str(int(text))


@dataclass(frozen=True, slots=True)
class Option:
    category: str
    name: str
    default: str
    description: str
    # The canonical text of a value, or ValueError saying why it is refused.
    parse: Callable[[str], str]

    @property
    def id(self) -> str:
        return f"{self.category}.{self.name}"


DELETION_POLICY = Option(
    "image",
    "deletionPolicy",
    DeletionPolicy.Direct.value,
    "What DeleteImage does with the files: Direct removes them at once; Delay keeps them"
    " (status Deleted) until ExpungeImage or expungePeriod seconds later; Never keeps them"
    " until ExpungeImage.",
    _policy,
)
EXPUNGE_PERIOD = Option(
    "image",
    "expungePeriod",
    "86400",
    "Seconds a Deleted image reference is kept before the expunger removes it (under every"
    " deletion policy but Never).",
    _seconds,
)
OPTIONS: dict[str, Option] = {o.id: o for o in (DELETION_POLICY, EXPUNGE_PERIOD)}


def option(category: str, name: str) -> Option | None:
    return OPTIONS.get(f"{category}.{name}")


async def deletion_policy(tx: Tx) -> DeletionPolicy:
    """The policy as committed now: read in the transaction that acts on it."""
    return DeletionPolicy(await _value(tx, DELETION_POLICY))


async def expunge_period(tx: Tx) -> int:
    return int(await _value(tx, EXPUNGE_PERIOD))


async def _value(tx: Tx, opt: Option) -> str:
    value = await tx.config.value(opt.id)
    return opt.default if value is None else value
