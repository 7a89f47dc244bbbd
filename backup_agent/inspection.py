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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backup_agent.fetchers import OpFailure
from image_service.protocol.errors import ErrorCode

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


def _limits(memory: int, cpu_seconds: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))

    return apply


async def run_qemu_img(
    *args: str,
    timeout: float = QEMU_IMG_TIMEOUT,
    memory: int = QEMU_IMG_MEMORY,
    cpu_seconds: int = QEMU_IMG_CPU_SECONDS,
    failure_code: ErrorCode = ErrorCode.UNSAFE_IMAGE,
) -> bytes:
    """Run `qemu-img ARGS` bounded in time and memory; its stdout, or an OpFailure."""
    try:
        process = await asyncio.create_subprocess_exec(
            "qemu-img",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_limits(memory, cpu_seconds),
        )
    except FileNotFoundError:
        raise OpFailure(
            ErrorCode.INTERNAL_ERROR, "qemu-img is not installed on the agent"
        ) from None
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip().splitlines()
        reason = message[-1] if message else f"exit {process.returncode}"
        raise OpFailure(failure_code, f"qemu-img {args[0]}: {reason}")
    return stdout


async def image_info(path: Path, fmt: str, *, backing_chain: bool = False) -> Any:
    """`qemu-img info` of `path` read as `fmt` (never probed)."""
    args = ["info", "-f", fmt, "--output=json", str(path)]
    if backing_chain:
        args.insert(1, "--backing-chain")
    try:
        return json.loads(await run_qemu_img(*args))
    except TimeoutError:
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, "qemu-img did not finish in time") from None


def sniff(path: Path, fmt: str) -> None:
    with open(path, "rb") as f:
        head = f.read(64)
        if fmt in ("raw", "iso"):
            for magic, name in FOREIGN_MAGIC.items():
                if head.startswith(magic):
                    raise OpFailure(
                        ErrorCode.UNSAFE_IMAGE, f"declared {fmt} but the content is {name}"
                    )
        if fmt == "iso":
            f.seek(ISO_MAGIC_OFFSET)
            if f.read(5) != b"CD001":
                raise OpFailure(
                    ErrorCode.UNSAFE_IMAGE, "declared iso but the content is not ISO 9660"
                )


def refuse_external_data_file(info: dict[str, Any]) -> None:
    """A qcow2 `data-file` makes qemu-img read (or write) any file the image names: a way out
    of the agent's directories, so any layer that has one is refused."""
    data = info.get("format-specific", {}).get("data", {})
    if data.get("data-file") or data.get("data-file-raw"):
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, "the qcow2 image names an external data file")


async def inspect_image(path: Path, fmt: str) -> ImageFacts:
    sniff(path, fmt)
    try:
        info = await image_info(path, "raw" if fmt == "iso" else fmt)
    except OpFailure as exc:
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, f"not a valid {fmt} image: {exc.details}") from None
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, "the qcow2 image names a backing file")
    refuse_external_data_file(info)
    return ImageFacts(
        virtual_size=int(info["virtual-size"]),
        actual_size=path.stat().st_blocks * 512,
    )
