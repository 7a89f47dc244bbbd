"""The state machines, written down once in `image_service.lifecycle`."""

from __future__ import annotations

import pytest

from image_service.lifecycle import (
    BACKUP_STORAGE_STATUS,
    IMAGE_STATE,
    IMAGE_STATUS,
    MACHINES,
    OP_STATUS,
    REF_STATUS,
    BackupStorageStatus,
    ImageState,
    ImageStatus,
    OpStatus,
    RefStatus,
)

TRANSITIONS = IMAGE_STATUS.transitions
Status = ImageStatus
allowed_from = IMAGE_STATUS.allowed_from


def test_ready_is_entered_from_downloading_and_creating() -> None:
    assert sorted(allowed_from(Status.Ready)) == ["Creating", "Downloading"]
    assert sorted(REF_STATUS.allowed_from(RefStatus.Ready)) == ["Creating", "Downloading"]


def test_nothing_leaves_ready() -> None:
    assert TRANSITIONS[Status.Ready] == frozenset()
    for status in Status:
        assert Status.Ready not in allowed_from(status)


@pytest.mark.parametrize("status", [Status.Downloading, Status.Creating])
def test_no_status_returns_to_a_birth_status(status: Status) -> None:
    assert allowed_from(status) == []


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_every_status_has_a_row(machine) -> None:  # type: ignore[no-untyped-def]
    assert set(machine.transitions) == set(machine.states)
    for targets in machine.transitions.values():
        assert targets <= set(machine.states)


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.name)
def test_the_guard_values_are_plain_strings_for_sql(machine) -> None:  # type: ignore[no-untyped-def]
    for state in machine.states:
        assert all(type(value) is str for value in machine.allowed_from(state))


def test_an_op_finishes_once() -> None:
    assert sorted(OP_STATUS.allowed_from(OpStatus.Failed)) == ["Pending"]
    assert sorted(OP_STATUS.allowed_from(OpStatus.Succeeded)) == ["Pending"]
    assert sorted(OP_STATUS.final()) == ["Failed", "Succeeded"]


def test_a_heartbeat_connects_and_silence_disconnects() -> None:
    connected = BACKUP_STORAGE_STATUS.allowed_from(BackupStorageStatus.Connected)
    assert sorted(connected) == ["Connecting", "Disconnected"]
    disconnected = BACKUP_STORAGE_STATUS.allowed_from(BackupStorageStatus.Disconnected)
    assert sorted(disconnected) == ["Connected", "Connecting"]


def test_a_state_change_to_the_same_state_is_no_transition() -> None:
    assert IMAGE_STATE.allowed_from(ImageState.Enabled) == ["Disabled"]
    assert not IMAGE_STATE.allows(ImageState.Enabled, ImageState.Enabled)
