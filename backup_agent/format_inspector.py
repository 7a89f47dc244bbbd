"""What a file really is, decided from its first bytes while it streams in.

In the spirit of OpenStack Glance's format_inspector (written after CVE-2024-32498): a file
declared ``raw`` or ``iso`` whose first bytes are a header that ``qemu-img`` would probe is
another disk format in disguise. Stored as declared it looks harmless, but the next consumer that
opens it without ``-f`` gets a qcow2 with a backing file on the host, or a VMDK descriptor whose
extent is ``/etc/passwd``. Such a file, and a declared qcow2 that is not a sane standalone qcow2,
is refused (contract section 9: UNSAFE_IMAGE) as soon as its head has arrived, before the rest of
the image is downloaded.

The recognisers follow the ``*_probe`` functions of qemu's block drivers and are deliberately
stricter where that costs nothing: a magic number alone is enough (qemu also wants a whole header
and sometimes a known version), and VMDK text descriptors are also recognised by their usual first
line and by their extent lines. A real raw disk or ISO does not begin with any of these by
accident, so strictness refuses attacks, not images.

This module only looks at the head. A qcow2 that passes here must still pass ``qemu-img check``
and ``qemu-img info -f qcow2`` on the whole file (``backup_agent.inspection``); the head check
exists so that a disguised image fails early and cheaply, and so that a qcow2 header's virtual size
is known before gigabytes of it are stored.

Messages never quote the file's content (a descriptor's extent names a host path the attacker
chose): they name the format found and numbers from the header, nothing else.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DECLARED_FORMATS",
    "HEAD_SIZE",
    "Detected",
    "HeadCollector",
    "UnsafeContent",
    "check_head",
    "detect",
]

HEAD_SIZE: Final = 64 * 1024
"""Bytes of head the inspector reads at most.

It must reach past ISO 9660's first volume descriptor ("CD001" at 0x8001..0x8005); every disk
format's magic and the fields read here lie well inside it.
"""

DECLARED_FORMATS: Final = frozenset({"qcow2", "raw", "iso"})

_ISO_MAGIC_OFFSET: Final = 0x8001
_ISO_MAGIC: Final = b"CD001"

_QCOW_MAGIC: Final = b"QFI\xfb"
_QCOW2_V2_HEADER_LENGTH: Final = 72
_QCOW2_V3_MIN_HEADER_LENGTH: Final = 104
_QCOW2_MIN_CLUSTER_BITS: Final = 9
_QCOW2_MAX_CLUSTER_BITS: Final = 21
_QCOW2_MAX_REFCOUNT_ORDER: Final = 6
_QCOW2_INCOMPAT_CORRUPT: Final = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE: Final = 1 << 2
_QCOW2_INCOMPAT_COMPRESSION: Final = 1 << 3
# dirty, corrupt, external data file, compression type, extended L2 entries: the incompatible
# features qemu knows. Any other bit means a qemu we have not read would open it differently.
_QCOW2_INCOMPAT_KNOWN: Final = 0b11111
_QCOW2_EXT_DATA_FILE: Final = 0x44415441  # "DATA": the external data file's name
_QCOW2_COMPRESSION_TYPES: Final = frozenset({0, 1})  # zlib, zstd

_SECTOR: Final = 512

_VDI_SIGNATURE_OFFSET: Final = 0x40
_VDI_SIGNATURE: Final = 0xBEDA107F
_VDI_DISK_SIZE_OFFSET: Final = 0x170  # after text[64], 5 u32, description[256], 6 u32, unused u32

_BOCHS_MAGIC: Final = b"Bochs Virtual HD Image"
_BOCHS_V1: Final = 0x00010000
_BOCHS_V2: Final = 0x00020000

_PARALLELS_MAGIC: Final = b"WithoutFreeSpace"
_PARALLELS_MAGIC_EXT: Final = b"WithouFreSpacExt"

# cloop_probe compares this preamble, cut to the buffer's length, with the buffer.
_CLOOP_MAGIC: Final = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)

# vmdk_probe for text descriptors, exactly: lines that start with '#' and lines of one or more
# spaces (optionally ending in '\r') are skipped; the first other line must be "version=1", "=2"
# or "=3" followed by '\n' or '\r\n'. Each alternative starts with a different byte and cannot run
# past a newline, so matching is linear.
_QEMU_VMDK_DESCRIPTOR: Final = re.compile(rb"(?:#[^\n]*\n| +\r?\n)*version=[123]\r?\n")

# Stricter than qemu, so that a descriptor some other tool (or a later qemu) accepts is caught too.
_DESCRIPTOR_FIRST_LINE: Final = re.compile(
    rb"\A(?:\xef\xbb\xbf)?\s*#\s*Disk\s*DescriptorFile", re.IGNORECASE
)
_DESCRIPTOR_VERSION_LINE: Final = re.compile(
    rb"\A(?:\xef\xbb\xbf)?(?:[ \t\r\f\v]*(?:#[^\n]*)?\n)*[ \t\r\f\v]*version[ \t]*=[ \t]*\d"
)
# Horizontal whitespace only, so that a head full of newlines cannot make the search quadratic.
_DESCRIPTOR_EXTENT_LINE: Final = re.compile(
    rb"^[ \t\r\f\v]*(?:RW|RDONLY|NOACCESS)[ \t\f\v]+\d+[ \t\f\v]+"
    rb"(?:FLAT|SPARSE|ZERO|VMFS|VMFSSPARSE|VMFSRDM|VMFSRAW|SESPARSE)\b",
    re.MULTILINE,
)
_DESCRIPTOR_EXTENT_WINDOW: Final = 4096


@dataclass(frozen=True, slots=True)
class Detected:
    """The most specific format a head shows.

    ``description`` is for error details and logs: it is built from constants and header numbers
    only, never from the file's text. ``virtual_size`` is the guest-visible size in bytes where
    the format's header states it within the head, else None.
    """

    format: str
    description: str
    virtual_size: int | None = None


class UnsafeContent(Exception):
    """The head shows the content must not be stored as declared.

    ``str(exc)`` is the reason, clean text fit for an UNSAFE_IMAGE error reply: it names the
    format that was found and never quotes the file.
    """


def _be(head: bytes, offset: int, size: int) -> int | None:
    """A big-endian header field, or None when the head ends before it (a short file)."""
    if len(head) < offset + size:
        return None
    return int.from_bytes(head[offset : offset + size], "big")


def _le(head: bytes, offset: int, size: int) -> int | None:
    """A little-endian header field, or None when the head ends before it (a short file)."""
    if len(head) < offset + size:
        return None
    return int.from_bytes(head[offset : offset + size], "little")


def _sectors(count: int | None) -> int | None:
    return None if count is None else count * _SECTOR


# Each probe returns what it recognises, or None. They are tried in order; the magic numbers
# at offset 0 exclude each other, and the text descriptor comes after the binary formats.


def _probe_qcow(head: bytes) -> Detected | None:
    if not head.startswith(_QCOW_MAGIC):
        return None
    version = _be(head, 4, 4)
    size = _be(head, 24, 8)  # qcow v1 and qcow2 both keep the virtual size here
    if version is None:
        return Detected("qcow2", "qcow2 header cut short before its version")
    if version == 1:
        return Detected("qcow", "qcow v1", size)
    if version in (2, 3):
        return Detected("qcow2", f"qcow2 v{version}", size)
    # qemu probes every version >= 2 as qcow2; version 0 is nothing qemu opens, still no raw disk.
    return Detected("qcow2", f"qcow2 of unknown version {version}", size)


def _probe_qed(head: bytes) -> Detected | None:
    if not head.startswith(b"QED\x00"):
        return None
    # QEDHeader: magic, cluster_size, table_size, header_size (u32 each), features,
    # compat_features, autoclear_features, l1_table_offset (u64 each), then image_size.
    return Detected("qed", "QED", _le(head, 48, 8))


def _probe_vmdk_binary(head: bytes) -> Detected | None:
    if head.startswith(b"KDMV"):
        # VMDK4 (sparse, stream-optimized): version, flags (u32), then capacity in sectors.
        return Detected("vmdk", "VMDK sparse extent (VMDK4)", _sectors(_le(head, 12, 8)))
    if head.startswith(b"COWD"):
        # VMDK3 / ESX COW disk: version, flags, then disk_sectors as a u32.
        return Detected("vmdk", "VMDK3 sparse extent (COWD)", _sectors(_le(head, 12, 4)))
    return None


def _probe_vhdx(head: bytes) -> Detected | None:
    if not head.startswith(b"vhdxfile"):
        return None
    # The virtual size lives in the metadata region, beyond the first 64 KiB: not read here.
    return Detected("vhdx", "VHDX")


def _probe_vpc(head: bytes) -> Detected | None:
    # A dynamic or differencing VHD begins with a copy of its footer; a fixed VHD has the footer
    # only at the end, and qemu does not probe it either (it opens as raw, which it is).
    if not head.startswith(b"conectix"):
        return None
    return Detected("vpc", "VHD", _be(head, 48, 8))  # the footer's current size


def _probe_vdi(head: bytes) -> Detected | None:
    if _le(head, _VDI_SIGNATURE_OFFSET, 4) != _VDI_SIGNATURE:
        return None
    return Detected("vdi", "VDI", _le(head, _VDI_DISK_SIZE_OFFSET, 8))


def _probe_luks(head: bytes) -> Detected | None:
    if not head.startswith(b"LUKS\xba\xbe"):
        return None
    version = _be(head, 6, 2)
    return Detected("luks", f"LUKS{version}" if version in (1, 2) else "LUKS")


def _probe_bochs(head: bytes) -> Detected | None:
    # qemu also wants the "Redolog"/"Growing" type strings and a known version; the magic alone
    # is enough to know this is no raw disk.
    if not head.startswith(_BOCHS_MAGIC):
        return None
    version = _le(head, 64, 4)
    # After version, header size, catalog, bitmap and extent (u32 each), a v2 header has one
    # reserved u32 before the disk size; a v1 header has the disk size right there.
    if version == _BOCHS_V2:
        size = _le(head, 88, 8)
    elif version == _BOCHS_V1:
        size = _le(head, 84, 8)
    else:
        size = None
    return Detected("bochs", "Bochs growing image", size)


def _probe_parallels(head: bytes) -> Detected | None:
    magic = head[:16]
    if magic not in (_PARALLELS_MAGIC, _PARALLELS_MAGIC_EXT):
        return None
    sectors = _le(head, 36, 8)
    if sectors is not None and magic == _PARALLELS_MAGIC:
        sectors &= 0xFFFFFFFF  # the old header only has a 32-bit sector count
    return Detected("parallels", "Parallels disk image", _sectors(sectors))


def _probe_cloop(head: bytes) -> Detected | None:
    # As qemu does: a file shorter than the preamble is cloop when it is a prefix of it.
    if head and head[: len(_CLOOP_MAGIC)] == _CLOOP_MAGIC[: len(head)]:
        return Detected("cloop", "cloop compressed image")
    return None


def _probe_vmdk_descriptor(head: bytes) -> Detected | None:
    if (
        _QEMU_VMDK_DESCRIPTOR.match(head)
        or _DESCRIPTOR_FIRST_LINE.match(head)
        or _DESCRIPTOR_VERSION_LINE.match(head)
        or _DESCRIPTOR_EXTENT_LINE.search(head, 0, _DESCRIPTOR_EXTENT_WINDOW)
    ):
        return Detected("vmdk", "VMDK text descriptor")
    return None


# dmg is not here: qemu's dmg_probe looks only at the file name (a ".dmg" suffix), never at the
# content, so no head can make a file dmg; the agent's own file names are its concern.
_PROBES: Final = (
    _probe_qcow,
    _probe_qed,
    _probe_vmdk_binary,
    _probe_vhdx,
    _probe_vpc,
    _probe_vdi,
    _probe_luks,
    _probe_bochs,
    _probe_parallels,
    _probe_cloop,
    _probe_vmdk_descriptor,
)


def _is_iso(head: bytes) -> bool:
    return head[_ISO_MAGIC_OFFSET : _ISO_MAGIC_OFFSET + len(_ISO_MAGIC)] == _ISO_MAGIC


def detect(head: bytes) -> Detected:
    """The most specific format the head shows.

    A disk format wins over ISO 9660: a qcow2 header or a VMDK descriptor with "CD001" planted at
    0x8001 is that disk format, because that is how qemu would open it. "iso" only when no disk
    format is recognised and "CD001" is at 0x8001; "raw" when nothing is recognised.
    """
    for probe in _PROBES:
        found = probe(head)
        if found is not None:
            return found
    if _is_iso(head):
        return Detected("iso", "ISO 9660 image")
    return Detected("raw", "no known disk image format" if head else "empty file")


def check_head(
    head: bytes,
    declared: str,
    *,
    max_virtual_size: int,
    complete: bool,
    file_size: int | None = None,
) -> Detected:
    """The detected format of ``head`` when it may be stored as ``declared``; else UnsafeContent.

    ``complete`` says whether ``head`` is the whole file. A caller that has not yet seen
    HEAD_SIZE bytes of a longer file must keep reading before it calls (a ValueError says so):
    a verdict on a partial head could miss the ISO volume descriptor or a qcow2 header field.

    - ``raw``: any detected format other than raw and iso is refused. An ISO 9660 image stored
      as raw is harmless, qemu never probes iso.
    - ``iso``: any detected disk format is refused, and "CD001" must be at 0x8001.
    - ``qcow2``: a qcow2 v2 or v3 with a sane header that names no backing file, no external
      data file and no encryption, and whose features this inspector knows.
    - any: a virtual size in the header above ``max_virtual_size`` is refused.

    With ``file_size`` (the stored file's), a qcow2 whose L1 or refcount table the header
    places past the end of the file is refused as truncated: ``qemu-img check`` reads such a
    table as zeros and finds nothing wrong.
    """
    if declared not in DECLARED_FORMATS:
        raise ValueError(f"unknown declared format {declared!r}")
    if not complete and len(head) < HEAD_SIZE:
        raise ValueError(
            f"check_head needs {HEAD_SIZE} bytes of head or the whole file, got {len(head)}"
        )
    found = detect(head)
    if declared == "qcow2":
        _check_qcow2(head, found)
        if file_size is not None:
            _check_qcow2_tables_within(head, file_size)
    elif found.format not in ("raw", "iso"):
        raise UnsafeContent(
            f"declared {declared} but the content is {found.format} ({found.description})"
        )
    elif declared == "iso" and found.format != "iso":
        raise UnsafeContent(
            f"declared iso but the content is not ISO 9660 ({found.format}: no ISO 9660 volume "
            f"descriptor at offset {_ISO_MAGIC_OFFSET:#x})"
        )
    if found.virtual_size is not None and found.virtual_size > max_virtual_size:
        raise UnsafeContent(
            f"the {found.format} image's virtual size {found.virtual_size} bytes exceeds the "
            f"limit of {max_virtual_size} bytes"
        )
    return found


def _check_qcow2(head: bytes, found: Detected) -> None:
    """Refuse a declared qcow2 whose header qemu would reject or that reaches outside the file.

    The fields follow qemu's QCowHeader (big-endian). Only the header and its extensions are
    read; the tables they point to are for ``qemu-img check``.
    """
    if found.format != "qcow2":
        raise UnsafeContent(
            f"declared qcow2 but the content is {found.format} ({found.description})"
        )
    version = _be(head, 4, 4)
    if version is None or len(head) < _QCOW2_V2_HEADER_LENGTH:
        raise UnsafeContent(f"truncated qcow2 header ({len(head)} bytes)")
    if version not in (2, 3):
        raise UnsafeContent(f"unsupported qcow2 version {version}")

    cluster_bits = _be(head, 20, 4)
    assert cluster_bits is not None  # inside the 72 bytes checked above
    if not _QCOW2_MIN_CLUSTER_BITS <= cluster_bits <= _QCOW2_MAX_CLUSTER_BITS:
        raise UnsafeContent(
            f"qcow2 cluster_bits {cluster_bits} is outside "
            f"{_QCOW2_MIN_CLUSTER_BITS}..{_QCOW2_MAX_CLUSTER_BITS}"
        )
    cluster_size = 1 << cluster_bits

    if _be(head, 8, 8) or _be(head, 16, 4):
        raise UnsafeContent("the qcow2 image names a backing file")
    crypt_method = _be(head, 32, 4)
    if crypt_method:
        # Refused rather than stored: a guest cannot boot it without a key nobody here has.
        raise UnsafeContent(f"the qcow2 image is encrypted (crypt_method {crypt_method})")

    if version == 2:
        header_length = _QCOW2_V2_HEADER_LENGTH
    else:
        header_length = _check_qcow2_v3_fields(head, cluster_size)
    _check_qcow2_extensions(head, header_length, cluster_size)


def _check_qcow2_tables_within(head: bytes, file_size: int) -> None:
    l1_size, l1_offset, refcount_offset = struct.unpack_from(">IQQ", head, 36)
    if l1_size and l1_offset + 8 * l1_size > file_size:
        missing = "its L1 table"
    elif refcount_offset + 8 > file_size:
        # Only the table's first entry must exist: qemu need not write the rest of its clusters.
        missing = "its refcount table"
    else:
        return
    raise UnsafeContent(f"the qcow2 image is truncated: {missing} lies beyond the end of the file")


def _check_qcow2_v3_fields(head: bytes, cluster_size: int) -> int:
    """The v3 header's length, after refusing the features that must not be stored."""
    header_length = _be(head, 100, 4)
    if header_length is None:
        raise UnsafeContent(f"truncated qcow2 header ({len(head)} bytes)")
    if header_length < _QCOW2_V3_MIN_HEADER_LENGTH:
        raise UnsafeContent(f"qcow2 header length {header_length} is too short")
    if header_length > cluster_size or header_length > HEAD_SIZE:
        raise UnsafeContent(f"qcow2 header length {header_length} does not fit its first cluster")
    if len(head) < header_length:
        raise UnsafeContent(f"truncated qcow2 header ({len(head)} of {header_length} bytes)")

    incompatible = _be(head, 72, 8)
    assert incompatible is not None  # inside header_length >= 104
    if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
        raise UnsafeContent("the qcow2 image names an external data file")
    if incompatible & _QCOW2_INCOMPAT_CORRUPT:
        raise UnsafeContent("the qcow2 image is marked corrupt")
    unknown = incompatible & ~_QCOW2_INCOMPAT_KNOWN
    if unknown:
        raise UnsafeContent(f"the qcow2 image has unknown incompatible features {unknown:#x}")

    refcount_order = _be(head, 96, 4)
    assert refcount_order is not None
    if refcount_order > _QCOW2_MAX_REFCOUNT_ORDER:
        raise UnsafeContent(f"qcow2 refcount_order {refcount_order} is out of range")

    if header_length > _QCOW2_V3_MIN_HEADER_LENGTH:
        compression_type = head[_QCOW2_V3_MIN_HEADER_LENGTH]
        declared_compression = incompatible & _QCOW2_INCOMPAT_COMPRESSION
        if compression_type not in _QCOW2_COMPRESSION_TYPES or (
            compression_type and not declared_compression
        ):
            raise UnsafeContent(f"qcow2 compression type {compression_type} is invalid")
    return header_length


def _check_qcow2_extensions(head: bytes, start: int, cluster_size: int) -> None:
    """Walk the header extensions that follow the header in its first cluster.

    An external data file can also be named by an extension; qemu refuses to open an image whose
    extensions run past the first cluster. The walk stops where the head ends: beyond HEAD_SIZE
    it is qemu-img's to judge.
    """
    offset = start
    end = min(cluster_size, len(head))
    while offset + 8 <= end:
        magic = _be(head, offset, 4)
        length = _be(head, offset + 4, 4)
        assert magic is not None and length is not None
        if magic == 0:
            return
        if magic == _QCOW2_EXT_DATA_FILE:
            raise UnsafeContent("the qcow2 image names an external data file")
        offset += 8 + (length + 7) // 8 * 8
        if offset > cluster_size:
            raise UnsafeContent("a qcow2 header extension runs past the first cluster")


class HeadCollector:
    """Keeps the first HEAD_SIZE bytes of a stream fed to it chunk by chunk, in order.

    Only the head is ever copied, never the whole stream: once full, a feed is a constant-time
    no-op, so it can sit in the download's hot loop next to the hash.
    """

    __slots__ = ("_buffer", "_head")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._head: bytes | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Take the next chunk; True exactly once, when the head has just become full."""
        if self._head is not None:
            return False
        self._buffer += data[: HEAD_SIZE - len(self._buffer)]
        if len(self._buffer) < HEAD_SIZE:
            return False
        self._head = bytes(self._buffer)
        self._buffer = bytearray()
        return True

    @property
    def head(self) -> bytes:
        """The bytes collected so far: HEAD_SIZE of them once full, the whole file if shorter."""
        return self._head if self._head is not None else bytes(self._buffer)

    @property
    def full(self) -> bool:
        return self._head is not None

    def reset(self) -> None:
        """Forget the head: the download restarts from byte 0."""
        self._buffer = bytearray()
        self._head = None
