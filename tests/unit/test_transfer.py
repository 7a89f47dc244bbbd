"""Streaming to disk while hashing (`HashingWriter`) and the format sniffing before qemu-img."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backup_agent import transfer
from backup_agent.fetchers import OpFailure
from backup_agent.inspection import check_content
from backup_agent.transfer import HashingWriter, Received
from image_service.protocol.errors import ErrorCode


async def write_in_chunks(path: Path, data: bytes, sizes: list[int]) -> Received:
    """Feed `data` to a writer in chunks of the given sizes (cycled), then finish."""
    writer = HashingWriter(path)
    offset, index = 0, 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        await writer.write(data[offset : offset + size])
        offset += size
        index += 1
    return await writer.finish()


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=64 * 1024),
    sizes=st.lists(st.integers(min_value=1, max_value=16 * 1024), min_size=1, max_size=8),
    min_chunk=st.sampled_from([1, 7, 4096, 1 << 20]),
)
def test_md5_size_and_content_equal_hashlibs(data: bytes, sizes: list[int], min_chunk: int) -> None:
    # A small MIN_CHUNK exercises the hand-off to the worker thread with little data.
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(transfer, "MIN_CHUNK", min_chunk):
        path = Path(tmp) / "image"
        received = asyncio.run(write_in_chunks(path, data, sizes))
        assert received == Received(
            len(data), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
        )
        assert path.read_bytes() == data


async def test_several_mib_in_uneven_chunks(tmp_path: Path) -> None:
    data = os.urandom(5 * (1 << 20) + 12345)
    path = tmp_path / "image"
    received = await write_in_chunks(path, data, [65536, 1 << 20, 3, (4 << 20) + 1])
    assert received.size == len(data)
    assert received.md5 == hashlib.md5(data).hexdigest()
    assert path.read_bytes() == data


async def test_an_empty_image(tmp_path: Path) -> None:
    received = await HashingWriter(tmp_path / "empty").finish()
    assert received == Received(0, hashlib.md5(b"").hexdigest(), hashlib.sha256(b"").hexdigest())
    assert (tmp_path / "empty").read_bytes() == b""


def descriptors_of(path: Path) -> list[int]:
    """This process's open file descriptors that refer to `path`."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the one listing the directory is gone already
            if Path(os.readlink(entry)) == path.resolve():
                found.append(int(entry.name))
    return found


async def test_abort_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "partial"
    writer = HashingWriter(path)
    await writer.write(os.urandom((1 << 20) + 1))
    fd = writer._fd
    assert descriptors_of(path) == [fd]
    await writer.abort()
    # That very descriptor is closed, and nothing in this process holds the file any more.
    with pytest.raises(OSError) as excinfo:
        os.fstat(fd)
    assert excinfo.value.errno == errno.EBADF
    assert descriptors_of(path) == []


async def test_more_pieces_than_one_writev_takes(tmp_path: Path) -> None:
    data = os.urandom(3 * transfer.IOV_MAX + 17)
    path = tmp_path / "image"
    with mock.patch.object(transfer, "MIN_CHUNK", len(data)):
        received = await write_in_chunks(path, data, [1, 2, 3])
    assert received == Received(
        len(data), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    )
    assert path.read_bytes() == data


async def test_short_writes_are_completed(tmp_path: Path) -> None:
    """writev may write less than asked; the rest must follow, in order."""
    real_writev = os.writev

    def stingy(fd: int, buffers: list[bytes]) -> int:
        first = bytes(buffers[0])
        return real_writev(fd, [first[: max(1, len(first) // 3)]])

    data = os.urandom(200_000)
    path = tmp_path / "image"
    with (
        mock.patch.object(transfer, "MIN_CHUNK", 50_000),
        mock.patch.object(transfer.os, "writev", stingy),
    ):
        received = await write_in_chunks(path, data, [7_000, 13_001])
    assert received == Received(
        len(data), hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    )
    assert path.read_bytes() == data


# --- the declared format, checked on the stored file ---------------------------------------
# (the inspector itself, format by format: tests/unit/test_format_inspector.py)

ISO_MAGIC_OFFSET = 0x8001
FOREIGN_MAGIC = {
    b"QFI\xfb\x00\x00\x00\x03": "qcow2",
    b"QED\x00": "qed",
    b"KDMV": "vmdk",
    b"vhdxfile": "vhdx",
    b"conectix": "vpc",
    b"LUKS\xba\xbe": "luks",
}
LIMIT = 1 << 40


def sniff(path: Path, declared: str) -> None:
    check_content(path, declared, LIMIT)


def test_a_qcow2_declared_raw_is_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    with pytest.raises(OpFailure) as excinfo:
        sniff(path, "raw")
    assert excinfo.value.code is ErrorCode.UNSAFE_IMAGE
    assert "qcow2" in excinfo.value.details
    sniff(path, "qcow2")  # declared correctly it goes on to qemu-img


@pytest.mark.parametrize(("magic", "name"), sorted(FOREIGN_MAGIC.items()))
@pytest.mark.parametrize("declared", ["raw", "iso"])
def test_foreign_magic_declared_raw_or_iso_is_unsafe(
    tmp_path: Path, magic: bytes, name: str, declared: str
) -> None:
    path = tmp_path / "disk"
    path.write_bytes(magic + bytes(ISO_MAGIC_OFFSET + 64))
    with pytest.raises(OpFailure) as excinfo:
        sniff(path, declared)
    assert excinfo.value.code is ErrorCode.UNSAFE_IMAGE
    assert name in excinfo.value.details.lower()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        bytes(1 << 20),
        b"CD001" + bytes(1 << 16),
        bytes(ISO_MAGIC_OFFSET) + b"CD00",
        bytes(ISO_MAGIC_OFFSET - 1) + b"CD001",
    ],
)
def test_a_non_iso_declared_iso_is_unsafe(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "disk.iso"
    path.write_bytes(content)
    with pytest.raises(OpFailure) as excinfo:
        sniff(path, "iso")
    assert excinfo.value.code is ErrorCode.UNSAFE_IMAGE


def test_an_iso_9660_volume_declared_iso_passes(tmp_path: Path) -> None:
    path = tmp_path / "disk.iso"
    path.write_bytes(bytes(ISO_MAGIC_OFFSET) + b"CD001" + bytes(2048))
    sniff(path, "iso")


def test_plain_bytes_declared_raw_pass(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x00" * 512 + os.urandom(4096))
    sniff(path, "raw")
