"""The agent's download policy, rule by rule (contract section 9): which addresses it may
connect to, the slots a slow source gives up, the throughput meter, the limits qemu-img runs
under, and the error details it lets out.

Ranges that must never be contacted from a test (link-local, private, public) are tested here,
on the policy function only; live tests use loopback addresses the policy under test denies.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from backup_agent import slots as slots_module
from backup_agent import transfer as transfer_module
from backup_agent.agent import public_details
from backup_agent.fetchers import OpFailure, redact
from backup_agent.inspection import limited
from backup_agent.netpolicy import NetworkPolicy, parse_networks
from backup_agent.slots import Slots
from backup_agent.transfer import Meter
from image_service.protocol.errors import ErrorCode

DEFAULT = NetworkPolicy()


@pytest.mark.parametrize(
    ("address", "reason", "named"),
    [
        ("127.0.0.1", "loopback", "127.0.0.1"),
        ("127.255.255.254", "loopback", "127.255.255.254"),
        ("::1", "loopback", "::1"),
        ("::ffff:127.0.0.1", "loopback", "127.0.0.1"),
        ("169.254.169.254", "link-local", "169.254.169.254"),
        ("fe80::1", "link-local", "fe80::1"),
        ("fe80::1%eth0", "link-local", "fe80::1"),
        ("::ffff:169.254.169.254", "link-local", "169.254.169.254"),
        ("224.0.0.1", "multicast", "224.0.0.1"),
        ("ff02::1", "multicast", "ff02::1"),
        ("0.0.0.0", "unspecified", "0.0.0.0"),
        ("0.1.2.3", "unspecified", "0.1.2.3"),
        ("::", "unspecified", "::"),
        ("240.0.0.1", "reserved", "240.0.0.1"),
        ("255.255.255.255", "reserved", "255.255.255.255"),
        ("::7f00:1", "reserved", "::7f00:1"),
    ],
)
def test_default_denials(address: str, reason: str, named: str) -> None:
    """Refused, for that reason, naming the address the socket would reach."""
    refusal = DEFAULT.refusal(address)
    assert refusal is not None and reason in refusal
    assert f"address {named} " in refusal


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "fd00::1",
        "100.64.0.1",
        "93.184.216.34",
        "2001:db8::1",
    ],
)
def test_private_and_public_addresses_are_allowed_by_default(address: str) -> None:
    assert DEFAULT.refusal(address) is None


def test_an_allowed_network_overrides_a_default_denial_only_where_it_reaches() -> None:
    policy = NetworkPolicy.of(allow="127.0.0.1/32")
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None  # the same address, spelled as IPv6
    assert "loopback" in (policy.refusal("127.0.0.2") or "")
    assert "loopback" in (policy.refusal("::1") or "")
    assert "link-local" in (policy.refusal("169.254.169.254") or "")


def test_the_longest_prefix_decides_and_a_denial_wins_a_tie() -> None:
    allow_list = NetworkPolicy.of(allow="10.1.0.0/16", deny="0.0.0.0/0,::/0")
    assert allow_list.refusal("10.1.2.3") is None
    assert "0.0.0.0/0" in (allow_list.refusal("10.2.0.1") or "")
    assert "::/0" in (allow_list.refusal("2001:db8::1") or "")
    carve_out = NetworkPolicy.of(allow="10.0.0.0/8", deny="10.9.0.0/16")
    assert carve_out.refusal("10.8.0.1") is None
    assert "10.9.0.0/16" in (carve_out.refusal("10.9.0.1") or "")
    tie = NetworkPolicy.of(allow="192.168.0.0/16", deny="192.168.0.0/16")
    assert tie.refusal("192.168.1.1") is not None
    everything = NetworkPolicy.of(allow="0.0.0.0/0")
    assert everything.refusal("127.0.0.1") is None  # the operator said so


def test_denied_private_ranges() -> None:
    policy = NetworkPolicy.of(deny="10.0.0.0/8,fd00::/8")
    assert "10.0.0.0/8" in (policy.refusal("10.3.4.5") or "")
    assert "fd00::/8" in (policy.refusal("fd12::1") or "")
    assert policy.refusal("192.168.0.1") is None


def test_anything_but_an_address_is_refused() -> None:
    assert DEFAULT.refusal("localhost") is not None
    assert DEFAULT.refusal("") is not None


@pytest.mark.parametrize("text", ["10.0.0.0/33", "nonsense", "10.0.0.0/8,,300.1.1.1"])
def test_bad_networks_are_named(text: str) -> None:
    with pytest.raises(ValueError, match="not an IP network"):
        parse_networks(text)


def test_networks_parse_with_spaces_and_bare_addresses() -> None:
    assert [str(n) for n in parse_networks(" 10.0.0.0/8 , 127.0.0.1,::1 ")] == [
        "10.0.0.0/8",
        "127.0.0.1/32",
        "::1/128",
    ]


def test_redact_drops_user_info_and_query() -> None:
    assert redact("https://u:secret@h.example:8443/a/b?token=x#f") == "https://h.example:8443/a/b"
    assert redact("http://[::1]:80/x") == "http://[::1]:80/x"


# --- slots ---------------------------------------------------------------------------------


@pytest.fixture
def quick_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slots that judge their holders every 20 ms over 100 ms, not every 250 ms over 1 s."""
    monkeypatch.setattr(slots_module, "YIELD_AFTER", 0.1)
    monkeypatch.setattr(slots_module, "TICK", 0.02)


@pytest.mark.usefixtures("quick_slots")
async def test_a_slow_holder_gives_its_slot_to_a_waiter() -> None:
    slots = Slots(1, min_throughput=1000)
    release_slow = asyncio.Event()
    order: list[str] = []

    async def slow() -> None:
        async with slots.download() as ticket:
            await ticket.claim()
            order.append("slow in")
            await release_slow.wait()  # moves nothing meanwhile
            assert not ticket.holding
        order.append("slow out")

    async def healthy() -> None:
        async with slots.download() as ticket:
            await ticket.claim()
            assert ticket.holding
            order.append("healthy in")

    first = asyncio.create_task(slow())
    await asyncio.sleep(0.01)
    await asyncio.wait_for(healthy(), 2)
    release_slow.set()
    await first
    assert order == ["slow in", "healthy in", "slow out"]
    assert slots.holders == 0 and slots.waiting == 0


@pytest.mark.usefixtures("quick_slots")
async def test_a_fast_holder_and_a_creation_keep_their_slots() -> None:
    slots = Slots(2, min_throughput=1000)
    stop = asyncio.Event()

    async def fast() -> None:
        async with slots.download() as ticket:
            await ticket.claim()
            while not stop.is_set():
                ticket.add(1000)
                await asyncio.sleep(0.01)
            assert ticket.holding

    async def creation() -> None:
        async with slots.exclusive() as ticket:
            await stop.wait()
            assert ticket.holding

    holders = [asyncio.create_task(fast()), asyncio.create_task(creation())]
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(_enter(slots))
    await asyncio.sleep(0.5)
    assert not waiter.done()  # nobody was slow: it still waits
    stop.set()
    await asyncio.gather(*holders)
    await asyncio.wait_for(waiter, 1)


async def _enter(slots: Slots) -> None:
    async with slots.download() as ticket:
        await ticket.claim()


async def test_a_download_takes_no_slot_before_it_claims_one() -> None:
    """Connecting and reading the head happen outside the slots: a drip feed stuck there
    holds none."""
    slots = Slots(1, min_throughput=0)
    async with slots.download() as stuck, slots.download():
        assert slots.holders == 0 and not stuck.claimed
        await asyncio.wait_for(_enter(slots), 1)  # the slot is free for whoever needs it


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    slots = Slots(1, min_throughput=0)
    async with slots.exclusive():
        waiter = asyncio.create_task(_enter(slots))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert slots.waiting == 0
    await asyncio.wait_for(_enter(slots), 1)
    assert slots.holders == 0


async def test_outside_the_slots_is_bounded_too() -> None:
    slots = Slots(1, min_throughput=0, overflow=2)
    gate = asyncio.Event()

    async def hold() -> None:
        async with slots.download() as ticket:
            await ticket.claim()
            await gate.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert slots.holders + slots.waiting == 2  # the third waits for a lane, not a slot
    gate.set()
    await asyncio.gather(*tasks)


# --- the throughput meter ------------------------------------------------------------------


def test_the_meter_fails_a_source_slower_than_the_minimum_over_a_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(transfer_module.time, "monotonic", lambda: now[0])
    meter = Meter(minimum=100, window=10)
    for _ in range(9):
        now[0] += 1
        meter.add(1)  # slow, but the first window is not over
    now[0] += 1
    with pytest.raises(OpFailure) as excinfo:
        meter.add(1)
    assert excinfo.value.code is ErrorCode.DOWNLOAD_FAILED
    assert "--min-throughput" in excinfo.value.details


def test_the_meter_keeps_a_source_that_is_fast_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(transfer_module.time, "monotonic", lambda: now[0])
    meter = Meter(minimum=100, window=10)
    for _ in range(100):
        now[0] += 0.5
        meter.add(60)  # 120 bytes/s
    assert meter.moved == 6000


# --- qemu-img's limits and the details the agent lets out -----------------------------------


@pytest.mark.parametrize("use_prlimit", [True, False])
def test_limits_are_applied_in_the_child(
    use_prlimit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not use_prlimit:
        monkeypatch.setattr("backup_agent.inspection.shutil.which", lambda _name: None)
    argv = limited(["sh", "-c", "ulimit -v; ulimit -t"], 1 << 30, 7)
    assert (argv[0].endswith("prlimit")) is use_prlimit
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str((1 << 30) // 1024), "7"]


def test_details_never_show_private_paths_or_control_characters(tmp_path: Path) -> None:
    private = tmp_path / "root" / ".agent"
    details = (
        f"qemu-img info: Could not open '{private}/partial/1234': bad\x1b[31m\x00"
        f" and {tmp_path}/root/templates/x/y.template"
    )
    text = public_details(details, private)
    assert str(private) not in text and ".agent" not in text
    assert "\x1b" not in text and "\x00" not in text
    assert f"{tmp_path}/root/templates/x/y.template" in text  # install paths are public
    assert len(public_details("x" * 100_000, private)) <= 2048


def test_hashing_stops_within_a_chunk_when_cancelled(tmp_path: Path) -> None:
    from backup_agent.conversion import hash_file

    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of holes: minutes to hash

    async def run() -> float:
        task = asyncio.create_task(hash_file(path))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    assert asyncio.run(run()) < 5


async def test_a_cancelled_qemu_img_is_killed_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a cancelled op or a stopping agent does to a long conversion: the child dies."""
    from backup_agent import inspection

    fake = tmp_path / "qemu-img"
    pid_file = tmp_path / "pid"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(
        inspection.shutil,
        "which",
        lambda name: str(fake) if name == "qemu-img" else "/usr/bin/prlimit",
    )
    task = asyncio.create_task(inspection.run_qemu_img("convert", timeout=120))
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.05)
    pid = int(pid_file.read_text())
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# --- found in review ------------------------------------------------------------------------


def test_cloud_metadata_outside_link_local_is_denied_by_default() -> None:
    assert "metadata" in (DEFAULT.refusal("fd00:ec2::254") or "")
    assert "metadata" in (DEFAULT.refusal("100.100.100.200") or "")
    assert DEFAULT.refusal("fd00:ec2::253") is None  # the range itself stays allowed
    assert NetworkPolicy.of(allow="100.100.100.200/32").refusal("100.100.100.200") is None


def test_a_connection_is_refused_only_when_every_address_was() -> None:
    from backup_agent.fetchers import AddressRefused, _Guard

    guard = _Guard(NetworkPolicy.of(deny="10.0.0.0/8"))
    guard.begin()
    with pytest.raises(AddressRefused):
        guard.check("10.0.0.5")
    guard.check("192.0.2.1")  # allowed, and then down: a connection error, not a refusal
    assert guard.refusal() is None
    guard.begin()  # the next attempt (a redirect, say) starts its own record
    with pytest.raises(AddressRefused):
        guard.check("10.1.2.3")
    refusal = guard.refusal()
    assert refusal is not None and refusal.code is ErrorCode.URL_NOT_ALLOWED
    assert "10.1.2.3" in refusal.details and "10.0.0.5" not in refusal.details


def test_details_drop_invisible_characters_and_stay_within_2_kib_of_utf8(tmp_path: Path) -> None:
    private = tmp_path / ".agent"
    text = public_details("evil\u202egnp.exe\u2028next\u200bline\nsecond", private)
    assert "\u202e" not in text and "\u2028" not in text and "\u200b" not in text
    assert "second" in text
    assert len(public_details("é" * 5000, private).encode()) <= 2048


async def test_qemu_img_output_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backup_agent import inspection

    fake = tmp_path / "qemu-img"
    fake.write_text("#!/bin/sh\nexec head -c 3000000 /dev/zero\n")
    fake.chmod(0o755)
    monkeypatch.setattr(
        inspection.shutil, "which", lambda name: str(fake) if name == "qemu-img" else None
    )
    with pytest.raises(OpFailure) as excinfo:
        await inspection.run_qemu_img("info")
    assert "more than" in excinfo.value.details


@pytest.mark.usefixtures("quick_slots")
async def test_a_download_that_lost_its_slot_queues_again_once_it_is_fast() -> None:
    slots = Slots(1, min_throughput=1000)
    async with slots.download() as paused:
        await paused.claim()
        waiter = asyncio.create_task(_enter_and_hold(slots, 1.0))
        await asyncio.sleep(0.3)  # moves nothing: the waiter gets the slot
        assert not paused.holding
        paused.add(10_000)  # fast again: it must wait its turn
        started = time.monotonic()
        assert await paused.keep_pace() is True
        assert paused.holding and time.monotonic() - started > 0.1
        await waiter
        await paused.hold()  # inspection: kept to the end
        assert paused.holding and not paused.preemptible


async def _enter_and_hold(slots: Slots, seconds: float) -> None:
    """Hold a slot for `seconds`, moving bytes fast enough to keep it."""
    async with slots.download() as ticket:
        await ticket.claim()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ticket.add(1000)
            await asyncio.sleep(0.01)


def test_the_meter_restarts_its_window_after_a_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(transfer_module.time, "monotonic", lambda: now[0])
    meter = Meter(minimum=1000, window=10)
    meter.add(5000)
    now[0] += 120  # two minutes in the queue for a slot
    meter.restart()
    for _ in range(10):
        now[0] += 1
        meter.add(2000)  # 2000 bytes/s once it streams
    assert meter.moved == 25000
