"""What an image file really is, asked of `qemu-img info` with an explicit format.

qemu-img never probes here (a raw file could then pose as qcow2 with a backing file on the
host); it runs with bounded memory and time. A qcow2 that names a backing file or an external
data file, a 'raw' or 'iso' file that is really another format, or anything qemu-img cannot
read as the declared format is UNSAFE_IMAGE.
"""

from __future__ import annotations

import asyncio
import json
import resource
from dataclasses import dataclass
from pathlib import Path

from backup_agent.fetchers import OpFailure

QEMU_IMG_TIMEOUT = 60.0
QEMU_IMG_MEMORY = 1 << 30
QEMU_IMG_CPU_SECONDS = 30

# Magic numbers of formats that must not pass as raw or iso.
FOREIGN_MAGIC = {
    b"QFI\xfb": "qcow2",
    b"QED\x00": "qed",
    b"KDMV": "vmdk",
    b"vhdxfile": "vhdx",
    b"conectix": "vpc",
}
ISO_MAGIC_OFFSET = 0x8001


@dataclass(frozen=True, slots=True)
class ImageFacts:
    virtual_size: int
    actual_size: int


def _limit_resources() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (QEMU_IMG_MEMORY, QEMU_IMG_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (QEMU_IMG_CPU_SECONDS, QEMU_IMG_CPU_SECONDS))


def sniff(path: Path, fmt: str) -> None:
    with open(path, "rb") as f:
        head = f.read(64)
        if fmt in ("raw", "iso"):
            for magic, name in FOREIGN_MAGIC.items():
                if head.startswith(magic):
                    raise OpFailure("UNSAFE_IMAGE", f"declared {fmt} but the content is {name}")
        if fmt == "iso":
            f.seek(ISO_MAGIC_OFFSET)
            if f.read(5) != b"CD001":
                raise OpFailure("UNSAFE_IMAGE", "declared iso but the content is not ISO 9660")


async def inspect_image(path: Path, fmt: str) -> ImageFacts:
    sniff(path, fmt)
    qemu_format = "raw" if fmt == "iso" else fmt
    try:
        process = await asyncio.create_subprocess_exec(
            "qemu-img",
            "info",
            "-f",
            qemu_format,
            "--output=json",
            str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_limit_resources,
        )
    except FileNotFoundError:
        raise OpFailure("INTERNAL_ERROR", "qemu-img is not installed on the agent") from None
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), QEMU_IMG_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise OpFailure("UNSAFE_IMAGE", "qemu-img did not finish in time") from None
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip().splitlines()
        reason = message[-1] if message else f"exit {process.returncode}"
        raise OpFailure("UNSAFE_IMAGE", f"not a valid {fmt} image: {reason}")
    info = json.loads(stdout)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise OpFailure("UNSAFE_IMAGE", "the qcow2 image names a backing file")
    data = info.get("format-specific", {}).get("data", {})
    if data.get("data-file") or data.get("data-file-raw"):
        raise OpFailure("UNSAFE_IMAGE", "the qcow2 image names an external data file")
    return ImageFacts(
        virtual_size=int(info["virtual-size"]),
        actual_size=path.stat().st_blocks * 512,
    )
