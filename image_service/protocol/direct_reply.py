"""Which direct reply-to names are worth a publish (contract section 8: a forged or vanished
`reply_to` costs only that reply).

RabbitMQ 3.x names a direct reply-to target `amq.rabbitmq.reply-to.<PID>.<KEY>`, PID being the
base64 of the Erlang external term of the caller's channel process, whose node is replaced by a
stable alias of the broker node (`reply@<hash>`). Publishing to a name whose PID does not decode,
or names a node the broker does not know, makes the broker close the publishing connection
(INTERNAL_ERROR); a well-formed name whose caller is gone is dropped quietly.

So: a name that is not even a PID term is refused without a publish; a name on a node that has
already taken a direct reply is published on the shared reply connection; a name on a node not
seen yet is tried alone, on a connection of its own, and its node remembered once a reply went
through. (A refusal is not remembered: it may have been the broker going away, not the name.)
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from enum import Enum

PREFIX = "amq.rabbitmq.reply-to."
_VERSION_MAGIC = 131
# NEW_PID_EXT and PID_EXT, each with the bytes that follow its node atom (ID, Serial, Creation).
_PID_TAIL = {88: 12, 103: 9}
_ATOM_TAGS = {118: 2, 100: 2, 119: 1, 115: 1}  # tag: bytes of the length field
_REMEMBERED = 1024


class Route(Enum):
    SHARED = "shared"  # a node that took a direct reply before
    ALONE = "alone"  # a node not seen yet: try it on a connection of its own
    REFUSE = "refuse"  # not a name the broker can deliver to


def node_of(name: str) -> str | None:
    """The node alias in a direct reply-to name, or None when the name cannot be one."""
    pid_part, dot, key = name.removeprefix(PREFIX).partition(".")
    if not dot or not pid_part or not key:
        return None
    try:
        term = base64.b64decode(pid_part, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(term) < 4 or term[0] != _VERSION_MAGIC or term[1] not in _PID_TAIL:
        return None
    width = _ATOM_TAGS.get(term[2])
    if width is None or len(term) < 3 + width:
        return None
    length = int.from_bytes(term[3 : 3 + width], "big")
    atom = term[3 + width : 3 + width + length]
    if not atom or len(term) != 3 + width + length + _PID_TAIL[term[1]]:
        return None
    return atom.decode("utf-8", errors="replace")


class DirectReplyNodes:
    """The nodes of direct reply-to names that took a reply (the most recent ones)."""

    def __init__(self) -> None:
        self._good: OrderedDict[str, None] = OrderedDict()

    def route(self, name: str, *, check_pid: bool) -> Route:
        """`check_pid`: the broker is a RabbitMQ 3.x, whose name format this module knows;
        with another, every name is tried alone first."""
        node = node_of(name) if check_pid else name.removeprefix(PREFIX).partition(".")[0]
        if node is None:
            return Route.REFUSE
        return Route.SHARED if node in self._good else Route.ALONE

    def delivered(self, name: str, *, check_pid: bool) -> None:
        node = node_of(name) if check_pid else name.removeprefix(PREFIX).partition(".")[0]
        if node is None:
            return
        self._good[node] = None
        self._good.move_to_end(node)
        while len(self._good) > _REMEMBERED:
            self._good.popitem(last=False)
