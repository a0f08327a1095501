"""A hostile guest against a rate-limited virtio-blk drive (issue 13, defect 4, and the used length of a
failed request), each attack run by the test guest (guest/attack_blk.c) in a real VM.

The drive is limited to 1 MiB/s (``bps=1M``: a bucket of 1 MiB refilled in 1 s). Before the fixes:
a refused request was charged for what its descriptors claimed (about 4 GiB: the drive then answered
nothing for about 68 minutes); the debt of a served request outlived a device reset; every
notification while throttled added an event-loop timer; a failed read reported a used length covering
data never written.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmlet.config import Drive
from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.virtio.blk import SECTOR_SIZE, RequestType, Status
from kvmlet.devices.virtio.mmio import MAX_TIMER_DELAY, MAX_TIMERS_PER_QUEUE
from kvmlet.devices.virtio.ratelimit import RateLimiter
from kvmlet.machine import ExitStatus
from kvmlet.memory import GuestMemory, MiB
from tests.support.vmrun import built_machine, vm_config
from tests.test_virtio_blk import image, make_blk, memory  # noqa: F401 - fixtures

BPS_1M = RateLimiterConfig(bandwidth=TokenBucketConfig(size=MiB, refill_time=1000))
DRIVE_BYTES = 128 * MiB          # sparse: the guest reads 126 MiB of it to go into debt
PROMPT = 10.0                    # seconds: "promptly" (a debt-bound wait is over 100 s)
STORM_RSS_BOUND = 16 * MiB       # anonymous memory the storm may add (it added ~100 MiB before the fix)
OTHER_TIMERS = 2                 # event-loop timers that are not the drive's (none expected; margin)


@dataclass
class Watched:
    status: ExitStatus | None = None
    output: str = ""
    seen: dict[str, float] = field(default_factory=dict)  # marker -> monotonic time first seen
    max_scheduled: int = 0           # event-loop timers, during the storm
    max_timers_pending: int = 0      # the transport's own gauge, during the storm
    timers_coalesced: int = 0
    rss: dict[str, tuple[int, int]] = field(default_factory=dict)  # marker -> (VmRSS, RssAnon) bytes

    def passed(self, name: str) -> bool:
        return f"TEST {name} PASS" in self.output

    def between(self, first: str, second: str) -> float:
        assert first in self.seen and second in self.seen, (self.seen, self.output[-1500:])
        return self.seen[second] - self.seen[first]


def _rss() -> tuple[int, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["RssAnon"]


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "drive.img"
    with open(path, "wb") as file:
        file.write(bytes(range(256)) * 2)  # sector 0 is not all zero
        file.truncate(DRIVE_BYTES)
    return path


def _run(guest_elf: Path, tmp_path: Path, test: str, markers: list[str], *, extra: str = "",
         timeout: float = 120.0) -> Watched:
    """Run one attack check, noting when each marker first shows on the console; during the storm
    (between its start and done markers), the event loop's timers, the transport's gauge and RSS."""
    console = BufferConsole()
    drive = Drive(drive_id="drive0", path_on_host=str(_image(tmp_path)), rate_limiter=BPS_1M)
    config = vm_config(guest_elf, cmdline=f"console=ttyS0 kvmlet.test={test} kvmlet.timeout=10 {extra}".strip(),
                       memory=128 * MiB, drives=[drive])
    watched = Watched()
    with built_machine(config, console=console) as machine:
        assert machine.devices is not None
        attached = machine.devices.find("drive:drive0")
        assert attached is not None and attached.transport is not None
        transport = attached.transport
        loop = machine.events.loop
        done = threading.Event()

        def watch() -> None:
            while True:
                finished = done.is_set()  # then one last look: every marker gets a time (an upper bound)
                text = console.output().decode(errors="replace")
                now = time.monotonic()
                for marker in markers:
                    if marker not in watched.seen and marker in text:
                        watched.seen[marker] = now
                        watched.rss[marker] = _rss()
                storm = "storm start" in watched.seen and "storm done" not in watched.seen
                if storm:
                    watched.max_scheduled = max(watched.max_scheduled, len(loop._scheduled))  # type: ignore[attr-defined]
                    watched.max_timers_pending = max(watched.max_timers_pending,
                                                     getattr(transport.stats, "timers_pending", 0))
                if finished or "TESTS DONE" in text:
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, name="attack-watch", daemon=True)
        machine.start()
        watcher.start()
        status = machine.wait(timeout)
        done.set()
        watcher.join(5)
        watched.status = status
        watched.output = console.output().decode(errors="replace")
        watched.timers_coalesced = getattr(transport.stats, "timers_coalesced", 0)
    return watched


def test_a_refused_request_costs_no_tokens(guest_elf: Path, tmp_path: Path) -> None:
    """A read beyond the capacity whose 126 segments of 32 MiB claim almost 4 GiB is refused (IOERR);
    the next valid read completes at once instead of after 4 GiB at 1 MiB/s."""
    run = _run(guest_elf, tmp_path, "attack-blk-charge",
               ["refused request claims", "read after refused request ok", "TESTS DONE"])
    assert run.passed("attack-blk-charge"), run.output[-2000:]
    assert run.between("refused request claims", "read after refused request ok") < PROMPT


def test_the_debt_resets_with_the_device(guest_elf: Path, tmp_path: Path) -> None:
    """A served 126 MiB read leaves the drive about 125 s in debt and a small read waiting; after a device
    reset and a new set-up, a small read completes promptly."""
    run = _run(guest_elf, tmp_path, "attack-blk-reset",
               ["ATTACK blk throttled pending=1", "read after reset ok", "TESTS DONE"])
    assert run.passed("attack-blk-reset"), run.output[-2000:]
    assert run.between("ATTACK blk throttled pending=1", "read after reset ok") < PROMPT


def test_a_notification_storm_while_throttled_adds_no_timers(guest_elf: Path, tmp_path: Path) -> None:
    """100,000 QueueNotify writes while the queue waits for 125 s of debt: at most one wake-up timer for
    the queue on the event loop at any time, and the VMM's anonymous memory grows by less than
    STORM_RSS_BOUND (before the fix: one timer per event-loop pass, tens of thousands of them)."""
    run = _run(guest_elf, tmp_path, "attack-blk-storm", ["storm start", "storm done", "read after storm ok",
                                                         "TESTS DONE"])
    assert "storm done" in run.seen, run.output[-2000:]
    before, after = run.rss["storm start"], run.rss["storm done"]
    print(f"storm: VmRSS {before[0] / MiB:.1f} -> {after[0] / MiB:.1f} MiB, RssAnon {before[1] / MiB:.1f} -> "
          f"{after[1] / MiB:.1f} MiB, event-loop timers at most {run.max_scheduled}, transport gauge at most "
          f"{run.max_timers_pending}, wake-ups coalesced {run.timers_coalesced}")
    assert run.max_scheduled <= MAX_TIMERS_PER_QUEUE + OTHER_TIMERS
    assert run.max_timers_pending <= MAX_TIMERS_PER_QUEUE
    assert after[1] - before[1] < STORM_RSS_BOUND
    assert run.passed("attack-blk-storm"), run.output[-2000:]
    assert run.between("storm done", "read after storm ok") < PROMPT


def test_a_failed_read_reports_only_the_status_byte(guest_elf: Path, tmp_path: Path) -> None:
    """virtio 1.2, 2.7.8: the used length is what the device wrote. A read refused with IOERR (beyond
    the capacity; data buffers device-readable) wrote the status byte alone: used length 1."""
    run = _run(guest_elf, tmp_path, "attack-blk-usedlen", ["TESTS DONE"])
    assert run.passed("attack-blk-usedlen"), run.output[-2000:]
    assert "ATTACK blk read beyond capacity status=1 used=1" in run.output


# -- the same rules, device and transport alone (no VM; a fake clock and scheduler) -------------------

def test_unit_refused_requests_cost_nothing_and_answer_one_byte(memory: GuestMemory,  # noqa: F811
                                                                image: Path) -> None:  # noqa: F811
    now = [0.0]
    limiter = RateLimiter(RateLimiterConfig(bandwidth=TokenBucketConfig(size=4096, refill_time=1000),
                                            ops=TokenBucketConfig(size=4, refill_time=1000)),
                          clock=lambda: now[0])
    b = make_blk(memory, image, limiter=limiter)
    try:
        for sector, kwargs in ((10_000, {"in_len": SECTOR_SIZE}),                  # beyond the capacity
                               (0, {"in_len": 700}),                                # not whole sectors
                               (0, {"in_len": SECTOR_SIZE, "out": b"x" * 16})):    # data both ways
            status, _, used = b.run(RequestType.IN, sector, **kwargs)  # type: ignore[arg-type]
            assert (status, used) == (Status.IOERR, 1)
        assert limiter.bandwidth is not None and limiter.bandwidth.budget == 4096
        assert limiter.ops is not None and limiter.ops.budget == 4 and not b.scheduled
        status, _, used = b.run(RequestType.IN, 0, in_len=SECTOR_SIZE)
        assert (status, used) == (Status.OK, SECTOR_SIZE + 1) and limiter.bandwidth.budget == 4096 - 512
    finally:
        b.transport.close()


def test_unit_one_timer_per_queue_and_reset(memory: GuestMemory, image: Path) -> None:  # noqa: F811
    """Throttled: every notification asks for a wake-up, one timer is armed (no longer than
    MAX_TIMER_DELAY); a reset cancels it and forgives the debt."""
    now = [0.0]
    limiter = RateLimiter(RateLimiterConfig(bandwidth=TokenBucketConfig(size=MiB, refill_time=1000)),
                          clock=lambda: now[0])
    b = make_blk(memory, image, limiter=limiter)
    try:
        limiter.try_consume(100 * MiB)          # 99 s of debt
        b.submit(RequestType.IN, 0, in_len=SECTOR_SIZE)
        for _ in range(1000):
            b.driver.notify()
        assert len(b.scheduled) == MAX_TIMERS_PER_QUEUE and b.scheduled[0][0] == MAX_TIMER_DELAY
        stats = b.transport.stats
        assert stats.timers_pending == 1 and stats.timers_coalesced == 999
        b.scheduled[0][1]()                     # fires: still in debt, the device asks again: one new timer
        assert len(b.scheduled) == 2 and stats.timers_pending == 1 and not b.ring.take_used()
        b.transport.reset()
        assert limiter.bandwidth is not None and limiter.bandwidth.budget == 0
        b.scheduled[1][1]()                     # cancelled by the reset: runs nothing
        assert stats.timers_pending == 0 and not b.ring.take_used()
    finally:
        b.transport.close()


@pytest.mark.parametrize("delay", [0.0, 0.01, 3600.0])
def test_unit_timer_delay_is_capped(memory: GuestMemory, image: Path, delay: float) -> None:  # noqa: F811
    b = make_blk(memory, image)
    try:
        b.transport.schedule_queue(0, delay)
        assert [d for d, _ in b.scheduled] == [min(delay, MAX_TIMER_DELAY)]
    finally:
        b.transport.close()
