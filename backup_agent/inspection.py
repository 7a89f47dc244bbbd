"""What an image file really is, asked of `qemu-img info` with an explicit format.

qemu-img never probes here (a raw file could then pose as qcow2 with a backing file on the
host); it runs with bounded memory and time (prlimit, set in the child after exec), and a
cancelled op kills it. A qcow2 that names a backing file or an external
data file, a 'raw' or 'iso' file that is really another format, or anything qemu-img cannot
read as the declared format is UNSAFE_IMAGE.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backup_agent.fetchers import OpFailure
from backup_agent.format_inspector import HEAD_SIZE, UnsafeContent, check_head
from image_service.protocol.errors import ErrorCode

QEMU_IMG_TIMEOUT = 60.0
QEMU_IMG_MEMORY = 1 << 30
QEMU_IMG_CPU_SECONDS = 30
CHECK_TIMEOUT = 1800.0
MAX_OUTPUT = 1 << 20

# Leaked clusters waste space but read correctly; errors (2) and an unfinished check (1) do not.
CHECK_LEAKS_ONLY = 3

# Applies the limits in the child by exec'ing a tiny Python when prlimit(1) is missing: the
# limits are set after the fork in a fresh interpreter, never by preexec_fn in this threaded one.
_LIMITED_EXEC = (
    "import os, resource, sys\n"
    "memory, cpu = int(sys.argv[1]), int(sys.argv[2])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (memory, memory))\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


@dataclass(frozen=True, slots=True)
class ImageFacts:
    virtual_size: int
    actual_size: int


def limited(argv: list[str], memory: int, cpu_seconds: int) -> list[str]:
    """`argv` run under an address-space and a CPU-time limit."""
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        return [prlimit, f"--as={memory}", f"--cpu={cpu_seconds}", "--", *argv]
    return [sys.executable, "-I", "-S", "-c", _LIMITED_EXEC, str(memory), str(cpu_seconds), *argv]


async def _drain(
    stream: asyncio.StreamReader, process: asyncio.subprocess.Process
) -> tuple[bytes, bool]:
    """A child's output to its end, keeping at most MAX_OUTPUT bytes: a hostile image (a qcow2
    with a huge snapshot table, say) must not make qemu-img's report fill the agent's memory.
    Beyond that the child is killed and the rest read and dropped (a pipe left unread would
    keep `process.wait()` from ever returning); the second value tells that it overflowed."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(1 << 16):
        size += len(chunk)
        if size <= MAX_OUTPUT:
            chunks.append(chunk)
        elif process.returncode is None:
            chunks.clear()
            process.kill()
    return b"".join(chunks), size > MAX_OUTPUT


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill the child and wait for it, reading its pipes to their end first."""
    if process.returncode is None:
        process.kill()
    assert process.stdout is not None and process.stderr is not None
    await asyncio.gather(
        _drain(process.stdout, process), _drain(process.stderr, process), process.wait()
    )


async def run_qemu_img(
    *args: str,
    timeout: float = QEMU_IMG_TIMEOUT,
    memory: int = QEMU_IMG_MEMORY,
    cpu_seconds: int = QEMU_IMG_CPU_SECONDS,
    failure_code: ErrorCode = ErrorCode.UNSAFE_IMAGE,
    ok_codes: tuple[int, ...] = (0,),
) -> bytes:
    """Run `qemu-img ARGS` bounded in time and memory; its stdout, or an OpFailure. A
    cancellation (an op cancelled, the agent stopping) kills it at once."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise OpFailure(ErrorCode.INTERNAL_ERROR, "qemu-img is not installed on the agent")
    process = await asyncio.create_subprocess_exec(
        *limited([qemu_img, *args], memory, cpu_seconds),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        (stdout, out_over), (stderr, err_over), _ = await asyncio.wait_for(
            asyncio.gather(
                _drain(process.stdout, process), _drain(process.stderr, process), process.wait()
            ),
            timeout,
        )
    except BaseException:
        await _reap(process)  # a timeout, a cancelled op, the agent stopping
        raise
    if out_over or err_over:
        raise OpFailure(failure_code, f"qemu-img {args[0]}: more than {MAX_OUTPUT} bytes of output")
    if process.returncode not in ok_codes:
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


def check_content(path: Path, fmt: str, max_virtual_size: int) -> None:
    """The head of a stored file must show the declared format, and a qcow2's tables must lie
    within the file (format_inspector.py)."""
    with open(path, "rb") as f:
        head = f.read(HEAD_SIZE)
        size = os.fstat(f.fileno()).st_size
    try:
        check_head(head, fmt, max_virtual_size=max_virtual_size, complete=True, file_size=size)
    except UnsafeContent as exc:
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, str(exc)) from None


async def check_qcow2(path: Path) -> None:
    """`qemu-img check`: a truncated or corrupt qcow2 (one whose tables point past its end,
    say) reads wrong in a VM although `qemu-img info` is content with its header."""
    try:
        out = await run_qemu_img(
            "check",
            "-f",
            "qcow2",
            "--output=json",
            str(path),
            timeout=CHECK_TIMEOUT,
            cpu_seconds=int(CHECK_TIMEOUT),
            ok_codes=(0, 1, 2, CHECK_LEAKS_ONLY),
        )
    except TimeoutError:
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, "qemu-img check did not finish in time") from None
    try:
        report = json.loads(out) if out.strip() else {}
    except ValueError:
        report = {}
    corruptions = int(report.get("corruptions", 0) or 0)
    errors = int(report.get("check-errors", 0) or 0)
    if corruptions or errors or not report:
        raise OpFailure(
            ErrorCode.UNSAFE_IMAGE,
            f"qemu-img check finds the qcow2 image corrupt or truncated"
            f" ({corruptions} corruptions, {errors} check errors)",
        )


def refuse_external_data_file(info: dict[str, Any]) -> None:
    """A qcow2 `data-file` makes qemu-img read (or write) any file the image names: a way out
    of the agent's directories, so any layer that has one is refused."""
    data = info.get("format-specific", {}).get("data", {})
    if data.get("data-file") or data.get("data-file-raw"):
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, "the qcow2 image names an external data file")


def _refuse_virtual_size(virtual_size: int, max_virtual_size: int) -> None:
    if virtual_size > max_virtual_size:
        raise OpFailure(
            ErrorCode.UNSAFE_IMAGE,
            f"virtual size {virtual_size} bytes exceeds the limit of {max_virtual_size}"
            " (--max-virtual-size)",
        )


async def check_virtual_size(path: Path, fmt: str, max_virtual_size: int) -> int:
    """A volume too big to become a template, asked before its conversion; its virtual size."""
    info = await image_info(path, fmt)
    virtual_size = int(info["virtual-size"])
    _refuse_virtual_size(virtual_size, max_virtual_size)
    return virtual_size


async def inspect_image(path: Path, fmt: str, *, max_virtual_size: int) -> ImageFacts:
    """Everything a stored image must pass, downloaded or made from a volume: its head shows
    the declared format, qemu-img reads it as that format (never probed), it stands alone (no
    backing or data file), its virtual size is within the limit, and a qcow2 checks clean."""
    await asyncio.to_thread(check_content, path, fmt, max_virtual_size)
    try:
        info = await image_info(path, "raw" if fmt == "iso" else fmt)
    except OpFailure as exc:
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, f"not a valid {fmt} image: {exc.details}") from None
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, "the qcow2 image names a backing file")
    refuse_external_data_file(info)
    virtual_size = int(info["virtual-size"])
    _refuse_virtual_size(virtual_size, max_virtual_size)
    if fmt == "qcow2":
        await check_qcow2(path)
    return ImageFacts(virtual_size=virtual_size, actual_size=path.stat().st_blocks * 512)
