"""The format inspector against real images made by qemu-img, and against crafted heads.

Every image qemu-img can write is made by qemu-img; the rest (bochs, cloop, VMDK3, VMDK text
descriptors, ISO) are built byte by byte and, where qemu can open them, checked against qemu's
own probe (`qemu-img info` without -f, run only on files made here) so that the inspector and
qemu agree on what each file is.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backup_agent.format_inspector import (
    HEAD_SIZE,
    Detected,
    HeadCollector,
    UnsafeContent,
    check_head,
    detect,
)
from tests.helpers import luks1_header, vmdk_descriptor, with_cd001

TIB = 1 << 40
GIB = 1 << 30
DEFAULT_MAX = 16 * TIB
SECRET = ["--object", "secret,id=sec0,data=x"]

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


# --- building images ---------------------------------------------------------------------------


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, timeout=60, check=False
    )


def create(
    path: Path, fmt: str, size: str, *options: str, objects: list[str] | None = None
) -> Path:
    args = ["create", "-q", "-f", fmt, *(objects or [])]
    if options:
        args += ["-o", ",".join(options)]
    result = qemu_img(*args, str(path), size)
    assert result.returncode == 0, result.stderr
    return path


def create_with_key(path: Path, fmt: str, size: str, *options: str) -> Path | None:
    """LUKS key derivation benchmarks the CPU first; on a loaded VM qemu-img sometimes gives up
    ("Unable to get accurate CPU usage"), so try a few times before falling back."""
    for _ in range(20):
        result = qemu_img(
            "create", "-q", "-f", fmt, *SECRET, "-o", ",".join(options), str(path), size
        )
        if result.returncode == 0:
            return path
    return None


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def plain_qcow2(d: Path) -> Path:
    return create(d / "plain.qcow2", "qcow2", "1G")


def with_backing(path: Path, fmt: str) -> Path:
    base = path.with_name("base.qcow2")
    if not base.exists():
        create(base, "qcow2", "1G")
    return create(path, fmt, "1G", f"backing_file={base.name}", "backing_fmt=qcow2")


def build_luks(d: Path) -> Path:
    made = create_with_key(d / "disk.luks", "luks", "16M", "key-secret=sec0", "iter-time=10")
    if made is not None:
        return made
    return write(d / "disk.luks", luks1_header())


def build_qcow2_luks(d: Path) -> Path:
    made = create_with_key(
        d / "luks.qcow2",
        "qcow2",
        "1G",
        "encrypt.format=luks",
        "encrypt.key-secret=sec0",
        "encrypt.iter-time=10",
    )
    if made is not None:
        return made
    head = bytearray(create(d / "to-encrypt.qcow2", "qcow2", "1G").read_bytes())
    struct.pack_into(">I", head, 32, 2)  # crypt_method 2: LUKS
    return write(d / "luks.qcow2", bytes(head))


def build_bochs(d: Path) -> Path:
    header = bytearray(512)
    header[0:22] = b"Bochs Virtual HD Image"
    header[32:39] = b"Redolog"
    header[48:55] = b"Growing"
    # version 2, header size, catalog entries, bitmap size, extent size, reserved, disk size
    struct.pack_into("<IIIIIIQ", header, 64, 0x20000, 512, 2, 512, 4096, 0, 8192)
    return write(d / "disk.bochs", bytes(header) + b"\xff" * 8)


def build_cloop(d: Path) -> Path:
    preamble = (
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
    )
    block = zlib.compress(bytes(512))
    first = 128 + 8 + 16
    offsets = struct.pack(">QQ", first, first + len(block))
    data = preamble.ljust(128, b"\0") + struct.pack(">II", 512, 1) + offsets + block
    return write(d / "disk.cloop", data)


def build_cowd(d: Path) -> Path:
    # VMDK3: version, flags, disk sectors, granularity, l1dir offset, l1dir size, file sectors
    header = b"COWD" + struct.pack("<IIIIIII", 1, 3, 4096, 8, 4, 1, 8)
    return write(d / "esx.vmdk", header.ljust(2048, b"\0"))


def build_parallels_v1(d: Path) -> Path:
    header = bytearray(64)
    header[0:16] = b"WithoutFreeSpace"
    # version, heads, cylinders, tracks, catalog entries, then a sector count whose upper half
    # the old format ignores
    struct.pack_into("<IIIIIQ", header, 16, 2, 16, 2, 32, 1, (7 << 32) | 2048)
    return write(d / "old.hdd", bytes(header).ljust(4096, b"\0"))


def build_passwd_descriptor_iso(d: Path) -> Path:
    """The attack: a VMDK descriptor whose extent is a host file, disguised as an ISO."""
    return write(d / "trick.iso", with_cd001(vmdk_descriptor("/etc/passwd")))


def build_local_descriptor_iso(d: Path) -> Path:
    """The same trick with a harmless extent, so that qemu's own probe can be asked about it."""
    (d / "extent.raw").write_bytes(bytes(2048 * 512))
    return write(d / "local-trick.iso", with_cd001(vmdk_descriptor("extent.raw")))


def build_iso(d: Path) -> Path:
    return write(d / "clean.iso", with_cd001(b"", size=0x10000 + 4096))


def build_raw(d: Path) -> Path:
    return write(d / "random.raw", random.Random(20240618).randbytes(256 * 1024))


@dataclass(frozen=True)
class Case:
    name: str
    format: str
    build: Callable[[Path], Path]
    qemu_probe: bool = True  # whether `qemu-img info` without -f may be run on it

    def __str__(self) -> str:
        return self.name


# Formats that must never pass as raw or iso (and, but for the good qcow2s, never as qcow2).
FOREIGN = [
    Case("qcow2-v3", "qcow2", plain_qcow2),
    Case("qcow2-v2", "qcow2", lambda d: create(d / "v2.qcow2", "qcow2", "1G", "compat=0.10")),
    Case("qcow2-backing", "qcow2", lambda d: with_backing(d / "child.qcow2", "qcow2")),
    Case(
        "qcow2-data-file",
        "qcow2",
        lambda d: create(d / "df.qcow2", "qcow2", "1G", f"data_file={d / 'df.data'}"),
    ),
    Case(
        "qcow2-aes",
        "qcow2",
        lambda d: create(
            d / "aes.qcow2",
            "qcow2",
            "1G",
            "encrypt.format=aes",
            "encrypt.key-secret=sec0",
            objects=SECRET,
        ),
    ),
    Case("qcow2-luks", "qcow2", build_qcow2_luks),
    Case("qcow1", "qcow", lambda d: create(d / "old.qcow", "qcow", "1G")),
    Case("qcow1-backing", "qcow", lambda d: with_backing(d / "child.qcow", "qcow")),
    Case("qed", "qed", lambda d: create(d / "disk.qed", "qed", "1G")),
    Case("vmdk-sparse", "vmdk", lambda d: create(d / "sparse.vmdk", "vmdk", "1G")),
    Case(
        "vmdk-stream",
        "vmdk",
        lambda d: create(d / "stream.vmdk", "vmdk", "1G", "subformat=streamOptimized"),
    ),
    Case(
        "vmdk-descriptor",
        "vmdk",
        lambda d: create(d / "flat.vmdk", "vmdk", "1M", "subformat=monolithicFlat"),
    ),
    Case("vmdk3-cowd", "vmdk", build_cowd, qemu_probe=False),
    Case("vmdk-descriptor-cd001-passwd", "vmdk", build_passwd_descriptor_iso, qemu_probe=False),
    Case("vmdk-descriptor-cd001", "vmdk", build_local_descriptor_iso),
    Case("vpc", "vpc", lambda d: create(d / "disk.vhd", "vpc", "1G")),
    Case("vhdx", "vhdx", lambda d: create(d / "disk.vhdx", "vhdx", "1G")),
    Case("vdi", "vdi", lambda d: create(d / "disk.vdi", "vdi", "1G")),
    Case("parallels", "parallels", lambda d: create(d / "disk.hdd", "parallels", "1G")),
    Case("parallels-v1", "parallels", build_parallels_v1, qemu_probe=False),
    Case("luks", "luks", build_luks),
    Case("bochs", "bochs", build_bochs),
    Case("cloop", "cloop", build_cloop),
]
CLEAN = [
    Case("raw", "raw", build_raw),
    Case("iso", "iso", build_iso),
]
GOOD_QCOW2 = {"qcow2-v3", "qcow2-v2"}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    yield tmp_path_factory.mktemp("images")


_built: dict[tuple[Path, str], Path] = {}


def built(case: Case, image_dir: Path) -> Path:
    key = (image_dir, case.name)
    if key not in _built:
        _built[key] = case.build(image_dir)
    return _built[key]


@dataclass(frozen=True)
class Head:
    data: bytes
    complete: bool


def head_of(path: Path) -> Head:
    """What the download would have collected: HEAD_SIZE bytes, or the whole shorter file."""
    with path.open("rb") as stream:
        data = stream.read(HEAD_SIZE)
    return Head(data, complete=len(data) < HEAD_SIZE)


def assert_refused(head: Head, declared: str, fmt: str, match: str | None = None) -> str:
    with pytest.raises(UnsafeContent) as caught:
        check_head(head.data, declared, max_virtual_size=DEFAULT_MAX, complete=head.complete)
    message = str(caught.value)
    assert fmt in message, message
    assert "/etc/passwd" not in message
    if match is not None:
        assert match in message, message
    return message


# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", FOREIGN + CLEAN, ids=str)
def test_detect_names_the_format(case: Case, image_dir: Path) -> None:
    found = detect(head_of(built(case, image_dir)).data)
    assert found.format == case.format
    assert "passwd" not in found.description


@pytest.mark.parametrize("case", [c for c in FOREIGN + CLEAN if c.qemu_probe], ids=str)
def test_detect_agrees_with_qemus_own_probe(case: Case, image_dir: Path) -> None:
    """qemu-img without -f is exactly the consumer the inspector protects; on files made here it
    is safe to ask, and its answer must be the inspector's."""
    path = built(case, image_dir)
    if path.read_bytes() == luks1_header():
        pytest.skip(
            "qemu-img failed to create a LUKS volume 20 times on this machine (its key"
            " derivation benchmark); the stand-in header is no whole volume to open"
        )
    result = qemu_img("info", "--output=json", str(path))
    assert result.returncode == 0, result.stderr
    probed = json.loads(result.stdout)["format"]
    ours = detect(head_of(path).data).format
    assert probed == ("raw" if ours in ("raw", "iso") else ours)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("qcow2-v3", GIB),
        ("qcow2-v2", GIB),
        ("qcow1", GIB),
        ("qed", GIB),
        ("vmdk-sparse", GIB),
        ("vmdk-stream", GIB),
        ("vmdk3-cowd", 4096 * 512),
        ("vdi", GIB),
        ("parallels", GIB),
        ("parallels-v1", 2048 * 512),
        ("bochs", 8192),
    ],
)
def test_virtual_size_is_read_from_the_header(name: str, size: int, image_dir: Path) -> None:
    case = next(c for c in FOREIGN if c.name == name)
    assert detect(head_of(built(case, image_dir)).data).virtual_size == size


def test_vhd_virtual_size_is_the_footers_current_size(image_dir: Path) -> None:
    """qemu rounds a VHD's size to its CHS geometry; the inspector reports what the footer says,
    which is what qemu-img reports too."""
    path = built(next(c for c in FOREIGN if c.name == "vpc"), image_dir)
    info = json.loads(qemu_img("info", "--output=json", "-f", "vpc", str(path)).stdout)
    assert detect(head_of(path).data).virtual_size == info["virtual-size"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"version=1\n", id="bare-version-line"),
        pytest.param(b"# comment\n   \r\n# another\nversion=3\r\n", id="qemu-skips-comments"),
        pytest.param(b"  \n#\nversion=2\nCID=1\n", id="space-line-first"),
        pytest.param(b"\xef\xbb\xbf  # Disk DescriptorFile\r\n", id="bom-and-first-line"),
        pytest.param(b"#disk descriptorfile\n", id="first-line-any-case"),
        pytest.param(b"\n\n\t\n# x\nversion = 1\n", id="blank-lines-then-version"),
        pytest.param(b'garbage\nRDONLY 8 SPARSE "x.vmdk"\n', id="extent-line-only"),
        pytest.param(b"x" * 3000 + b'\n  RW 2048 VMFS "y"\n', id="extent-line-within-4k"),
        pytest.param(b"x\nNOACCESS 1 ZERO\n", id="zero-extent"),
    ],
)
def test_vmdk_text_descriptors_are_recognised(text: bytes) -> None:
    assert detect(text).format == "vmdk"
    assert detect(with_cd001(text)).format == "vmdk"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello world\n", id="text"),
        pytest.param(b"x" * 5000 + b'\nRW 2048 FLAT "y" 0\n', id="extent-line-after-4k"),
        pytest.param(b"RW 2048 FLATTER\n", id="not-an-extent-type"),
        pytest.param(b"\x00" * 512 + b"QFI\xfb", id="magic-not-at-zero"),
        pytest.param(b"\xfa\x31\xc0" + bytes(507) + b"\x55\xaa", id="mbr-boot-sector"),
    ],
)
def test_ordinary_content_is_raw(text: bytes) -> None:
    assert detect(text).format == "raw"


def test_iso_needs_cd001_at_0x8001() -> None:
    assert detect(with_cd001(b"")).format == "iso"
    shifted = bytearray(0x9000)
    shifted[0x8002:0x8007] = b"CD001"
    assert detect(bytes(shifted)).format == "raw"


def test_a_disk_format_wins_over_iso(image_dir: Path) -> None:
    qcow2 = built(FOREIGN[0], image_dir).read_bytes()[:HEAD_SIZE]
    assert detect(with_cd001(qcow2[:0x8000], size=HEAD_SIZE)).format == "qcow2"


def test_pathological_heads_are_inspected_quickly() -> None:
    heads = [
        b" " * HEAD_SIZE,
        b"\n" * HEAD_SIZE,
        b" \n" * (HEAD_SIZE // 2),
        b"#" * HEAD_SIZE,
        b"#\n" * (HEAD_SIZE // 2),
        b"RW 1 " * (HEAD_SIZE // 5),
        b"\t\r" * (HEAD_SIZE // 2),
    ]
    started = time.monotonic()
    for head in heads:
        detect(head)
    assert time.monotonic() - started < 2.0


# --- the declared-format matrix ----------------------------------------------------------------


@pytest.mark.parametrize("case", FOREIGN, ids=str)
def test_foreign_formats_are_refused_as_raw(case: Case, image_dir: Path) -> None:
    assert_refused(head_of(built(case, image_dir)), "raw", case.format, "declared raw")


@pytest.mark.parametrize("case", FOREIGN, ids=str)
def test_foreign_formats_are_refused_as_iso(case: Case, image_dir: Path) -> None:
    assert_refused(head_of(built(case, image_dir)), "iso", case.format, "declared iso")


@pytest.mark.parametrize("case", FOREIGN + CLEAN, ids=str)
def test_only_a_sane_standalone_qcow2_passes_as_qcow2(case: Case, image_dir: Path) -> None:
    head = head_of(built(case, image_dir))
    if case.name in GOOD_QCOW2:
        found = check_head(head.data, "qcow2", max_virtual_size=DEFAULT_MAX, complete=False)
        assert found.format == "qcow2"
        assert found.virtual_size == GIB
    else:
        assert_refused(head, "qcow2", case.format)


def test_clean_raw_passes_as_raw_only(image_dir: Path) -> None:
    head = head_of(built(CLEAN[0], image_dir))
    found = check_head(head.data, "raw", max_virtual_size=DEFAULT_MAX, complete=head.complete)
    assert found == Detected("raw", "no known disk image format", None)
    assert_refused(head, "iso", "raw", "declared iso but the content is not ISO 9660")


def test_clean_iso_passes_as_iso_and_as_raw(image_dir: Path) -> None:
    head = head_of(built(CLEAN[1], image_dir))
    for declared in ("iso", "raw"):
        found = check_head(head.data, declared, max_virtual_size=DEFAULT_MAX, complete=False)
        assert found.format == "iso"


def test_a_short_complete_file_is_judged_whole() -> None:
    assert check_head(b"tiny", "raw", max_virtual_size=DEFAULT_MAX, complete=True).format == "raw"
    assert check_head(b"", "raw", max_virtual_size=DEFAULT_MAX, complete=True).format == "raw"
    assert_refused(Head(b"tiny", complete=True), "iso", "raw", "not ISO 9660")


def test_the_descriptor_with_cd001_trick_is_refused(image_dir: Path) -> None:
    case = next(c for c in FOREIGN if c.name == "vmdk-descriptor-cd001-passwd")
    head = head_of(built(case, image_dir))
    assert head.data[0x8001:0x8006] == b"CD001"
    for declared in ("iso", "raw", "qcow2"):
        message = assert_refused(head, declared, "vmdk", "VMDK text descriptor")
        assert "passwd" not in message


def test_qemu_would_really_open_the_trick_as_vmdk(image_dir: Path) -> None:
    """Why the trick matters: qemu's probe ignores the ISO and follows the descriptor."""
    case = next(c for c in FOREIGN if c.name == "vmdk-descriptor-cd001")
    result = qemu_img("info", "--output=json", str(built(case, image_dir)))
    assert json.loads(result.stdout)["format"] == "vmdk"


# --- qcow2 header checks -----------------------------------------------------------------------


@pytest.fixture
def qcow2_head(image_dir: Path) -> bytearray:
    return bytearray(head_of(built(FOREIGN[0], image_dir)).data)


def refuse_qcow2(head: bytes | bytearray, match: str, *, complete: bool = False) -> None:
    assert_refused(Head(bytes(head), complete), "qcow2", "qcow2", match)


def test_a_truncated_qcow2_header_is_refused(qcow2_head: bytearray) -> None:
    refuse_qcow2(qcow2_head[:50], "truncated qcow2 header", complete=True)
    refuse_qcow2(qcow2_head[:6], "truncated qcow2 header", complete=True)
    refuse_qcow2(qcow2_head[:100], "truncated qcow2 header", complete=True)


def test_a_partial_head_is_a_caller_error(qcow2_head: bytearray) -> None:
    with pytest.raises(ValueError, match="needs"):
        check_head(bytes(qcow2_head[:50]), "qcow2", max_virtual_size=DEFAULT_MAX, complete=False)
    with pytest.raises(ValueError, match="unknown declared format"):
        check_head(bytes(qcow2_head), "vmdk", max_virtual_size=DEFAULT_MAX, complete=False)


def test_qcow2_virtual_size_limit(qcow2_head: bytearray) -> None:
    head = bytes(qcow2_head)
    assert check_head(head, "qcow2", max_virtual_size=GIB, complete=False).virtual_size == GIB
    message = assert_refused_limit(head, GIB - 1)
    assert message == (
        f"the qcow2 image's virtual size {GIB} bytes exceeds the limit of {GIB - 1} bytes"
    )


def assert_refused_limit(head: bytes, limit: int) -> str:
    with pytest.raises(UnsafeContent) as caught:
        check_head(head, "qcow2", max_virtual_size=limit, complete=False)
    return str(caught.value)


def test_a_petabyte_qcow2_is_refused_and_16_tib_is_not(image_dir: Path) -> None:
    huge = create(image_dir / "huge.qcow2", "qcow2", "1P")
    message = assert_refused(head_of(huge), "qcow2", "qcow2", "virtual size")
    assert f"{1 << 50} bytes exceeds the limit of {DEFAULT_MAX}" in message
    exact = create(image_dir / "exact.qcow2", "qcow2", "16T")
    found = check_head(head_of(exact).data, "qcow2", max_virtual_size=DEFAULT_MAX, complete=False)
    assert found.virtual_size == DEFAULT_MAX


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("qcow2-backing", "the qcow2 image names a backing file"),
        ("qcow2-data-file", "the qcow2 image names an external data file"),
        ("qcow2-aes", "the qcow2 image is encrypted"),
        ("qcow2-luks", "the qcow2 image is encrypted"),
    ],
)
def test_qcow2_that_reaches_outside_itself_is_refused(
    name: str, match: str, image_dir: Path
) -> None:
    case = next(c for c in FOREIGN if c.name == name)
    assert_refused(head_of(built(case, image_dir)), "qcow2", "qcow2", match)


def test_a_backing_file_size_alone_is_refused(qcow2_head: bytearray) -> None:
    struct.pack_into(">I", qcow2_head, 16, 9)
    refuse_qcow2(qcow2_head, "names a backing file")


def test_a_data_file_extension_alone_is_refused(qcow2_head: bytearray) -> None:
    header_length = struct.unpack_from(">I", qcow2_head, 100)[0]
    struct.pack_into(">II", qcow2_head, header_length, 0x44415441, 8)
    refuse_qcow2(qcow2_head, "names an external data file")


def test_a_header_extension_past_the_cluster_is_refused(qcow2_head: bytearray) -> None:
    header_length = struct.unpack_from(">I", qcow2_head, 100)[0]
    struct.pack_into(">II", qcow2_head, header_length, 0x12345678, 1 << 20)
    refuse_qcow2(qcow2_head, "runs past the first cluster")


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "match"),
    [
        (4, ">I", 4, "unsupported qcow2 version 4"),
        (4, ">I", 0, "unsupported qcow2 version 0"),
        (20, ">I", 8, "cluster_bits 8"),
        (20, ">I", 22, "cluster_bits 22"),
        (72, ">Q", 1 << 1, "marked corrupt"),
        (72, ">Q", 1 << 2, "external data file"),
        (72, ">Q", 1 << 5, "unknown incompatible features 0x20"),
        (72, ">Q", 1 << 63, "unknown incompatible features"),
        (96, ">I", 7, "refcount_order 7"),
        (100, ">I", 96, "header length 96 is too short"),
        (100, ">I", 1 << 17, "does not fit"),
        (104, ">B", 1, "compression type 1"),
        (104, ">B", 9, "compression type 9"),
    ],
)
def test_insane_qcow2_headers_are_refused(
    qcow2_head: bytearray, offset: int, fmt: str, value: int, match: str
) -> None:
    struct.pack_into(fmt, qcow2_head, offset, value)
    refuse_qcow2(qcow2_head, match)


@pytest.mark.parametrize("bits", [1 << 0, 1 << 3, 1 << 4])
def test_known_harmless_qcow2_features_pass(qcow2_head: bytearray, bits: int) -> None:
    """dirty, compression type (zlib here) and extended L2: qemu-img check judges the rest."""
    struct.pack_into(">Q", qcow2_head, 72, bits)
    check_head(bytes(qcow2_head), "qcow2", max_virtual_size=DEFAULT_MAX, complete=False)


def test_vmdk_binary_capacity_above_the_limit_names_vmdk(image_dir: Path) -> None:
    head = head_of(built(next(c for c in FOREIGN if c.name == "vmdk-sparse"), image_dir))
    with pytest.raises(UnsafeContent, match="vmdk"):
        check_head(head.data, "raw", max_virtual_size=1, complete=False)


# --- fuzzing -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096), st.sampled_from(["raw", "iso", "qcow2"]))
def test_any_bytes_give_a_verdict_or_a_clean_refusal(data: bytes, declared: str) -> None:
    found = detect(data)
    try:
        check_head(data, declared, max_virtual_size=DEFAULT_MAX, complete=True)
    except UnsafeContent as refused:
        assert found.format in str(refused)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=112, max_size=1024))
def test_any_qcow2_like_header_gives_a_verdict_or_a_clean_refusal(tail: bytes) -> None:
    data = b"QFI\xfb\x00\x00\x00\x03" + tail
    try:
        check_head(data, "qcow2", max_virtual_size=DEFAULT_MAX, complete=True)
    except UnsafeContent as refused:
        assert "qcow2" in str(refused)


# --- HeadCollector -----------------------------------------------------------------------------

STREAM = random.Random(7).randbytes(3 * HEAD_SIZE + 123)


def test_collector_with_many_small_chunks() -> None:
    collector = HeadCollector()
    verdicts = [collector.feed(STREAM[i : i + 1000]) for i in range(0, len(STREAM), 1000)]
    assert verdicts.count(True) == 1
    assert verdicts.index(True) == (HEAD_SIZE - 1) // 1000
    assert collector.full
    assert collector.head == STREAM[:HEAD_SIZE]


def test_collector_with_one_chunk_bigger_than_the_head() -> None:
    collector = HeadCollector()
    assert collector.feed(STREAM) is True
    assert collector.head == STREAM[:HEAD_SIZE]
    assert collector.feed(STREAM) is False
    assert collector.head == STREAM[:HEAD_SIZE]


def test_collector_of_a_short_stream_holds_it_all() -> None:
    collector = HeadCollector()
    assert collector.feed(b"") is False
    assert collector.feed(STREAM[:100]) is False
    assert collector.feed(memoryview(STREAM)[100:300]) is False
    assert not collector.full
    assert collector.head == STREAM[:300]


def test_collector_reset_starts_from_byte_zero() -> None:
    collector = HeadCollector()
    collector.feed(STREAM)
    collector.reset()
    assert not collector.full
    assert collector.head == b""
    other = STREAM[::-1]
    assert collector.feed(other[: HEAD_SIZE - 1]) is False
    assert collector.feed(other[HEAD_SIZE - 1 :]) is True
    assert collector.head == other[:HEAD_SIZE]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=HEAD_SIZE // 3), max_size=12))
def test_collector_head_is_the_prefix_whatever_the_chunking(cuts: list[int]) -> None:
    collector = HeadCollector()
    position, fulls = 0, 0
    for size in cuts:
        fulls += collector.feed(STREAM[position : position + size])
        position += size
    assert collector.head == STREAM[: min(position, HEAD_SIZE)]
    assert collector.full == (position >= HEAD_SIZE)
    assert fulls == int(collector.full)
