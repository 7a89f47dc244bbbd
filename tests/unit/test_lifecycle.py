"""The image status machine, written down once in `lifecycle.TRANSITIONS`."""

from __future__ import annotations

import pytest

from image_service.lifecycle import TRANSITIONS, Status, allowed_from


def test_ready_is_entered_from_downloading_and_creating() -> None:
    assert sorted(allowed_from(Status.Ready)) == ["Creating", "Downloading"]


def test_nothing_leaves_ready() -> None:
    assert TRANSITIONS[Status.Ready] == frozenset()
    for status in Status:
        assert Status.Ready not in allowed_from(status)


@pytest.mark.parametrize("status", [Status.Downloading, Status.Creating])
def test_no_status_returns_to_a_birth_status(status: Status) -> None:
    assert allowed_from(status) == []


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(Status)


def test_the_guard_values_are_plain_strings_for_sql() -> None:
    assert all(type(value) is str for value in allowed_from(Status.Ready))
