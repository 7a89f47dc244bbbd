"""The agent's path rules: an install path is honoured only inside ROOT/templates/<uuid>/."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from backup_agent.layout import Layout, PathRejected


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "root")
    layout.prepare()
    return layout


IMAGE = uuid.uuid4().hex


def template_path(layout: Layout, name: str = "CentOS7") -> str:
    return f"{layout.root}/templates/{IMAGE}/{name}.template"


def test_a_template_path_is_accepted(layout: Layout) -> None:
    path = template_path(layout)
    assert layout.resolve_install_path(path, IMAGE) == Path(path)


def test_a_path_in_another_images_directory_is_rejected(layout: Layout) -> None:
    """A command about one image never names another's file (contract section 8)."""
    with pytest.raises(PathRejected, match="not in the directory of image"):
        layout.resolve_install_path(template_path(layout), uuid.uuid4().hex)


def test_a_template_path_under_a_symlinked_root_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    layout = Layout(tmp_path / "link")
    layout.prepare()
    image = uuid.uuid4().hex
    resolved = layout.resolve_install_path(f"{tmp_path}/link/templates/{image}/a.template", image)
    assert resolved == tmp_path / "real" / "templates" / image / "a.template"


def test_a_relative_template_path_is_taken_from_the_root(layout: Layout) -> None:
    image = uuid.uuid4().hex
    resolved = layout.resolve_install_path(f"templates/{image}/a.template", image)
    assert resolved == layout.root / "templates" / image / "a.template"


def test_a_path_that_stays_inside_after_normalising_is_accepted(layout: Layout) -> None:
    image = uuid.uuid4().hex
    path = f"{layout.root}/templates/other/../{image}/./a.template"
    assert layout.resolve_install_path(path, image) == layout.templates / image / "a.template"


@pytest.mark.parametrize(
    "suffix",
    [
        "templates/../.agent/identity.json",
        "templates/{u}/../../.agent/ops/x.json",
        "templates/{u}/../../../escape.template",
        "templates/../../etc/passwd",
        ".agent/partial/{u}",
        "elsewhere/{u}/a.template",
    ],
)
def test_dot_dot_escapes_are_rejected(layout: Layout, suffix: str) -> None:
    image = uuid.uuid4().hex
    path = f"{layout.root}/{suffix.format(u=image)}"
    with pytest.raises(PathRejected):
        layout.resolve_install_path(path, image)
    with pytest.raises(PathRejected):
        layout.resolve_install_path(suffix.format(u=image), image)


@pytest.mark.parametrize("path", ["/etc/passwd", "/tmp/templates/x/a.template", "/", ""])
def test_absolute_paths_outside_the_root_are_rejected(layout: Layout, path: str) -> None:
    with pytest.raises(PathRejected):
        layout.resolve_install_path(path, IMAGE)


def test_a_sibling_root_with_the_same_prefix_is_rejected(tmp_path: Path, layout: Layout) -> None:
    sibling = Layout(Path(f"{layout.root}2"))
    sibling.prepare()
    with pytest.raises(PathRejected):
        layout.resolve_install_path(template_path(sibling), IMAGE)


def test_a_symlinked_image_directory_pointing_outside_is_rejected(
    tmp_path: Path, layout: Layout
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    image = uuid.uuid4().hex
    (layout.templates / image).symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathRejected):
        layout.resolve_install_path(f"{layout.templates}/{image}/a.template", image)


def test_a_symlink_deeper_in_templates_pointing_outside_is_rejected(
    tmp_path: Path, layout: Layout
) -> None:
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (layout.templates / "escape").symlink_to(outside)
    with pytest.raises(PathRejected):
        layout.resolve_install_path(f"{layout.templates}/escape/deep/a.template", "escape")
    with pytest.raises(PathRejected):
        layout.resolve_install_path("templates/escape/deep/a.template", "escape")


def test_a_symlink_to_the_agent_state_is_rejected(layout: Layout) -> None:
    (layout.templates / "state").symlink_to(layout.state)
    with pytest.raises(PathRejected):
        layout.resolve_install_path(f"{layout.templates}/state/identity.json", "state")


def test_a_symlink_that_stays_inside_templates_resolves_to_its_target(layout: Layout) -> None:
    image = uuid.uuid4().hex
    (layout.templates / image).mkdir()
    (layout.templates / "alias").symlink_to(layout.templates / image)
    resolved = layout.resolve_install_path(f"{layout.templates}/alias/a.template", image)
    assert resolved == layout.templates / image / "a.template"


@pytest.mark.parametrize("name", ["a.template", "", ".", "..", "identity.json"])
def test_a_path_directly_at_templates_level_is_rejected(layout: Layout, name: str) -> None:
    with pytest.raises(PathRejected):
        layout.resolve_install_path(f"{layout.templates}/{name}", IMAGE)


def test_the_templates_directory_itself_is_rejected(layout: Layout) -> None:
    with pytest.raises(PathRejected):
        layout.resolve_install_path(str(layout.templates), IMAGE)
    with pytest.raises(PathRejected):
        layout.resolve_install_path("templates", IMAGE)


# --- identity and capacity ---------------------------------------------------------------


def test_identity_is_created_once_and_kept(layout: Layout) -> None:
    first = layout.identity()
    assert len(first) == 32 and int(first, 16) >= 0 and first == first.lower()
    assert layout.identity() == first
    assert Layout(layout.root).identity() == first
    assert (layout.state / "identity.json").exists()


def test_identity_differs_between_roots(tmp_path: Path) -> None:
    a, b = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    a.prepare()
    b.prepare()
    assert a.identity() != b.identity()


def test_identity_write_leaves_no_temporary_file(layout: Layout) -> None:
    layout.identity()
    assert sorted(p.name for p in layout.state.iterdir()) == ["identity.json", "ops", "partial"]


def test_partial_paths_are_named_by_a_real_op_id(layout: Layout) -> None:
    op_id = str(uuid.uuid4())
    assert layout.partial_path(op_id) == layout.partial / op_id
    with pytest.raises(ValueError):
        layout.partial_path("../../templates/x")


def _store(layout: Layout, size: int) -> Path:
    directory = layout.templates / uuid.uuid4().hex
    directory.mkdir()
    path = directory / "a.template"
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())  # so the blocks are allocated when st_blocks is read
    return path


def test_capacity_with_a_quota_counts_what_templates_hold(layout: Layout) -> None:
    quota = 16 << 20
    empty = layout.capacity(quota)
    assert empty.total == quota and empty.available == quota
    _store(layout, 1 << 20)
    used = layout.used_bytes()
    assert used >= 1 << 20
    after = layout.capacity(quota)
    assert after.total == quota
    assert after.available == quota - used


def test_capacity_ignores_files_outside_templates(layout: Layout) -> None:
    quota = 16 << 20
    (layout.partial / str(uuid.uuid4())).write_bytes(os.urandom(1 << 20))
    assert layout.capacity(quota).available == quota


def test_capacity_never_goes_negative(layout: Layout) -> None:
    _store(layout, 1 << 20)
    assert layout.capacity(4096).available == 0


def test_capacity_never_exceeds_the_free_disk(layout: Layout) -> None:
    huge = 1 << 62
    capacity = layout.capacity(huge)
    assert capacity.total == huge
    assert capacity.available <= os.statvfs(layout.root).f_bavail * os.statvfs(layout.root).f_frsize


def test_capacity_without_a_quota_is_the_file_systems(layout: Layout) -> None:
    capacity = layout.capacity(None)
    stat = os.statvfs(layout.root)
    assert capacity.total == stat.f_blocks * stat.f_frsize
    assert 0 < capacity.available <= capacity.total
