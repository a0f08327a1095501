"""The device fuzzer (tests/fuzz/fuzz_devices.py) at a small size, proof that its invariants catch a
misbehaving device, and the defects the large run found (now fixed), as regression tests.

The large run is documented in docs/security.md (``--random 1000000 --jobs 2``); here a few thousand
cases of a fixed seed run in a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.constants import DeviceStatus, MmioRegister
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.queue import DescriptorChain
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.memory import GuestMemory
from tests.fuzz import fuzz_devices
from tests.fuzz.device_checks import FuzzFailure
from tests.fuzz.device_rig import GUEST_MAC, HOST_MAC, KINDS, Options, Rig, make_rig, pump
from tests.support.virtq import DriverRing, MmioDriver

REPO = Path(__file__).resolve().parent.parent
SMALL_RUN = 1200          # cases: a few seconds on these hosts
SEED = 12
HAVE_TAP = os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@pytest.fixture(autouse=True)
def fuzz() -> Iterator[None]:
    """Every test here gives back the fuzzer's shared state (memory, TAP, the kvmlet logger) when it ends."""
    yield
    fuzz_devices.close_state()


def test_small_run_of_every_device_finds_nothing(fuzz: None) -> None:
    before = dict(fuzz_devices.COUNTS)
    failures = fuzz_devices.run_random(SMALL_RUN, seed=SEED)
    assert not failures, "\n".join(f"{f.kind} (--seed {f.seed} --case {f.case}): {f.message}"
                                   for f in failures.values())
    ran = {kind: fuzz_devices.COUNTS[kind] - before.get(kind, 0) for kind in KINDS}
    assert all(ran[kind] > SMALL_RUN // 8 for kind in ("rng", "blk", "vsock")), ran
    assert ran["net"] > SMALL_RUN // 8 or not HAVE_TAP, ran
    assert fuzz_devices.COUNTS["steps"] - before.get("steps", 0) > 10 * SMALL_RUN


def test_script_runs_random_inputs_and_prints_cases_per_second() -> None:
    result = subprocess.run([sys.executable, "tests/fuzz/fuzz_devices.py", "--random", "80", "--seed", "3",
                             "--progress", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fuzz_devices: 80 cases (" in result.stdout
    assert "cases/s, 0 failures" in result.stdout


def test_script_replays_one_case() -> None:
    result = subprocess.run([sys.executable, "tests/fuzz/fuzz_devices.py", "--seed", "3", "--case", "7"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the case passed" in result.stdout


def test_the_same_seed_gives_the_same_cases() -> None:
    assert fuzz_devices.case_input(5, 17) == fuzz_devices.case_input(5, 17)
    assert fuzz_devices.case_input(5, 17) != fuzz_devices.case_input(5, 18)


# -- the invariants catch a misbehaving device -------------------------------------------------------------
def _first_failure(monkeypatch: pytest.MonkeyPatch, device: str = "rng", cases: int = 300) -> str:
    with pytest.raises(FuzzFailure) as caught:
        fuzz_devices.run_random(cases, seed=1, device=device, stop=True)
    monkeypatch.undo()
    return caught.value.kind


def _rng_handler(misbehave: str) -> Callable[[VirtioRng, DescriptorChain], bool]:
    original = VirtioRng._handle

    def handle(self: VirtioRng, chain: DescriptorChain) -> bool:
        if chain.readable.length or not chain.writable.length:
            return original(self, chain)
        queue = self.queues[0]
        count = chain.writable.write(b"\x5a" * chain.writable.length)
        if misbehave == "long":
            queue.push(chain.head, count + 1)
        elif misbehave == "head":
            queue.push((chain.head + 1) % queue.size, count)
        elif misbehave == "stray":
            last = chain.writable.buffers[-1]
            end = last.gpa + last.length
            if self.queues[0].memory.contains(end, 8):
                self.queues[0].memory.write(end, b"\xee" * 8)
            queue.push(chain.head, count)
        else:
            raise KeyError("a device bug")
        return True

    return handle


@pytest.mark.parametrize(("misbehave", "kind"), [
    ("long", "used length beyond the chain's writable bytes"),
    ("head", "used element for a head that was not available"),
    ("stray", "write outside the used rings and the writable buffers of taken chains"),
    ("raise", "exception inside a device (the transport's safety net)"),
])
def test_invariants_catch_a_misbehaving_device(fuzz: None, monkeypatch: pytest.MonkeyPatch, misbehave: str,
                                               kind: str) -> None:
    monkeypatch.setattr(VirtioRng, "_handle", _rng_handler(misbehave))
    found = _first_failure(monkeypatch)
    if misbehave == "head":   # the head it names may be one the device holds, or held before a reset
        assert found.startswith(("used element", "used length", "a chain taken before")), found
    else:
        assert found == kind, found


def test_a_leaked_descriptor_is_caught(fuzz: None, monkeypatch: pytest.MonkeyPatch) -> None:
    leaked: list[int] = []
    monkeypatch.setattr(VirtioRng, "on_activate", lambda self: leaked.append(os.eventfd(0)))
    try:
        assert _first_failure(monkeypatch) == "file descriptors leaked"
    finally:
        for fd in leaked:
            os.close(fd)


def test_a_write_beyond_guest_ram_is_caught_by_a_canary(fuzz: None) -> None:
    import ctypes

    st = fuzz_devices.state()
    assert len(st.canaries.areas) == 2 * len(st.memory.regions)
    region = st.memory.regions[-1]
    ctypes.memset(region.host_address + region.size, 0, 1)   # what a raw memset one byte too far would do
    with pytest.raises(FuzzFailure, match="canary"):
        fuzz_devices.run_case(fuzz_devices.case_input(1, 0), "rng")


# -- what the large run found (both fixed in mmio.py) ----------------------------------------------------------
# 103 of its million cases: DRIVER_OK after FAILED started the device, and virtio-net then watched its TAP while
# the transport refused its queue, so the event loop called the TAP's callback forever (first: seed 1 case 25157).
# 27: QueueReady 0 then 1 on a running device let virtio-net complete receive buffers taken from the old ring
# into the new one (first: seed 1 case 21156).
@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 1 << 20)], hugepages=False) as mem:
        yield mem


def test_driver_ok_after_failed_does_not_start_the_device(memory: GuestMemory) -> None:
    transport = MmioTransport(VirtioRng(), memory, NullInterrupt())
    driver = MmioDriver(transport)
    try:
        assert driver.negotiate()
        driver.setup_queue(0, DriverRing(memory))
        driver.write(MmioRegister.STATUS, driver.status | DeviceStatus.FAILED)
        driver.write(MmioRegister.STATUS, driver.status | DeviceStatus.DRIVER_OK)
        assert not transport.device.active   # the driver gave up: nothing runs until a reset
    finally:
        transport.close()


def _net_rig() -> tuple[Any, Rig, MmioDriver, DriverRing]:
    st = fuzz_devices.state()
    if st.host.tap_name is None:
        pytest.skip(st.host.net_skip_reason)
    rig = make_rig("net", Options(offloads=False), st.host, st.memory)
    driver = MmioDriver(rig.transport)
    rx = DriverRing(st.memory, size=8, desc=0x0, avail=0x1000, used=0x1400, data=0xA000)
    tx = DriverRing(st.memory, size=8, desc=0x2000, avail=0x3000, used=0x3400, data=0xC000)
    assert driver.negotiate()
    driver.setup_queue(0, rx)
    driver.setup_queue(1, tx)
    return st, rig, driver, rx


def _frame() -> bytes:
    return GUEST_MAC + HOST_MAC + b"\x88\xb5" + bytes(46)


@pytest.mark.skipif(not HAVE_TAP, reason="virtio-net needs a TAP: root and /dev/net/tun")
def test_net_after_failed_does_not_spin_on_its_tap(fuzz: None) -> None:
    st, rig, driver, _ = _net_rig()
    try:
        driver.write(MmioRegister.STATUS, driver.status | DeviceStatus.FAILED)
        driver.write(MmioRegister.STATUS, driver.status | DeviceStatus.DRIVER_OK)
        pump(rig.loop, rig.transport)
        st.host.inject_frame(_frame())
        pump(rig.loop, rig.transport)   # it was a FuzzFailure "busy loop"
    finally:
        rig.close()


@pytest.mark.skipif(not HAVE_TAP, reason="virtio-net needs a TAP: root and /dev/net/tun")
def test_net_forgets_receive_buffers_when_the_queue_is_enabled_again(fuzz: None) -> None:
    st, rig, driver, rx = _net_rig()
    try:
        driver.driver_ok()
        pump(rig.loop, rig.transport)
        rx.publish(rx.add_chain([(rx.alloc(1526), 1526, True)]))
        driver.write(MmioRegister.QUEUE_NOTIFY, 0)
        pump(rig.loop, rig.transport)            # no frame yet: the device keeps the buffer
        assert rig.transport.queues[0].next_avail == 1
        driver.write(MmioRegister.QUEUE_SEL, 0)
        driver.write(MmioRegister.QUEUE_READY, 0)
        fresh = DriverRing(st.memory, size=8, desc=0x4000, avail=0x5000, used=0x5400, data=0xE000)
        driver.setup_queue(0, fresh)             # the queue again, at new rings, with nothing available
        st.host.inject_frame(_frame())
        pump(rig.loop, rig.transport)
        assert fresh.take_used() == []           # it was [(0, 72)], a buffer of the old ring
    finally:
        rig.close()
