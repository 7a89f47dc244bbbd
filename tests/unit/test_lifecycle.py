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


def test_ready_is_entered_from_a_birth_status_or_by_recovery() -> None:
    assert sorted(allowed_from(Status.Ready)) == ["Creating", "Deleted", "Downloading"]
    assert sorted(REF_STATUS.allowed_from(RefStatus.Ready)) == [
        "Creating",
        "Deleted",
        "Downloading",
    ]


def test_only_a_stored_reference_turns_deleted() -> None:
    # A reference still Downloading or Creating is cancelled and removed, never Deleted.
    assert REF_STATUS.allowed_from(RefStatus.Deleted) == ["Ready"]
    # An image turns Deleted from Ready, or when its creation ends with every stored
    # reference deleted meanwhile.
    assert sorted(allowed_from(Status.Deleted)) == ["Creating", "Downloading", "Ready"]


def test_ready_and_deleted_lead_only_to_each_other() -> None:
    assert TRANSITIONS[Status.Ready] == frozenset({Status.Deleted})
    assert TRANSITIONS[Status.Deleted] == frozenset({Status.Ready})
    assert REF_STATUS.transitions[RefStatus.Ready] == frozenset({RefStatus.Deleted})
    assert REF_STATUS.transitions[RefStatus.Deleted] == frozenset({RefStatus.Ready})


def test_no_status_is_final_any_more() -> None:
    assert IMAGE_STATUS.final() == []
    assert REF_STATUS.final() == []


@pytest.mark.parametrize("status", [Status.Downloading, Status.Creating])
def test_no_status_returns_to_a_birth_status(status: Status) -> None:
    assert allowed_from(status) == []
    assert REF_STATUS.allowed_from(status) == []


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
