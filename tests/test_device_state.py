"""Device state for snapshots: the typed, versioned state model and its msgpack round trips; saving a virtio
transport partway and restoring it into a fresh one over a copy of guest memory; refusals (version, drive
size, the device set); quiescing the devices (pause holds notifications, timers and host input, resume serves
them); and the dirty marking of guest pages devices write through views."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices import state as st
from kvmlet.devices.factory import add_legacy_devices
from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.legacy.console import NullConsole
from kvmlet.devices.manager import DeviceManager
from kvmlet.devices.pausable import PausableEventLoop
from kvmlet.devices.state import DeviceStateError
from kvmlet.devices.virtio.blk import RequestType, Status, VirtioBlock
from kvmlet.devices.virtio.blk_backend import SECTOR_SIZE, BlockBackend
from kvmlet.devices.virtio.constants import MmioRegister
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.ratelimit import RateLimiter, TokenBucket
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.devices.virtio.vsock import EVENT_QUEUE, VirtioVsock
from kvmlet.errors import StateError, UnsupportedError
from kvmlet.eventloop import EventLoopThread
from kvmlet.memory import PAGE_SIZE, GuestMemory
from tests.support.virtq import DriverRing, MmioDriver
from tests.support.vsockrig import GUEST_CID, make_vsock_rig

SECTORS = 64
MEMORY = 4 << 20
HEADER = struct.Struct("<IIQ")


def _pattern(sector: int) -> bytes:
    return bytes((sector * 7 + i) & 0xFF for i in range(SECTOR_SIZE))


def _image(path: Path, sectors: int = SECTORS) -> Path:
    path.write_bytes(b"".join(_pattern(s) for s in range(sectors)))
    return path


def _copy_memory(memory: GuestMemory) -> GuestMemory:
    other = GuestMemory(list(memory.ram_ranges()), hugepages=False)
    for gpa, size in memory.ram_ranges():
        other.write(gpa, memory.read(gpa, size))
    return other


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, MEMORY)], hugepages=False) as mem:
        yield mem


@pytest.fixture
def big_memory() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 8 << 20)], hugepages=False) as mem:   # room for the vsock rig's three rings
        yield mem


@pytest.fixture
def events() -> Iterator[EventLoopThread]:
    loop = EventLoopThread("test-device-state")
    loop.start()
    yield loop
    loop.stop()


# -- a virtio-blk device driven through its transport ------------------------------------------------------
@dataclass
class Blk:
    memory: GuestMemory
    device: VirtioBlock
    transport: MmioTransport
    driver: MmioDriver
    ring: DriverRing
    irq: NullInterrupt

    def submit(self, kind: int, sector: int = 0, *, out: bytes = b"", in_len: int = 0, segments: int = 1,
               page_aligned: bool = False) -> tuple[int, int, int]:
        """Publish a request (header, data, status byte); returns (head, data-in gpa, status gpa)."""
        align = PAGE_SIZE if page_aligned else 16
        header = self.ring.alloc(HEADER.size, align)
        self.memory.write(header, HEADER.pack(kind, 0, sector))
        parts = [(header, HEADER.size, False)]
        if out:
            gpa = self.ring.alloc(len(out), align)
            self.memory.write(gpa, out)
            step = len(out) // segments
            parts += [(gpa + i, step, False) for i in range(0, len(out), step)]
        data = self.ring.alloc(in_len, align) if in_len else 0
        if in_len:
            step = in_len // segments
            parts += [(data + i, step, True) for i in range(0, in_len, step)]
        status = self.ring.alloc(1, align)
        self.memory.write(status, b"\xff")
        head = self.ring.add_chain([*parts, (status, 1, True)])
        self.ring.publish(head)
        return head, data, status

    def run(self, kind: int, sector: int = 0, **kwargs: object) -> tuple[int, bytes]:
        """Submit, notify, and return (status, data read)."""
        _, data, status = self.submit(kind, sector, **kwargs)  # type: ignore[arg-type]
        self.driver.notify()
        in_len = int(kwargs.get("in_len", 0))  # type: ignore[call-overload]
        return self.memory.read(status, 1)[0], self.memory.read(data, in_len) if in_len else b""

    def close(self) -> None:
        self.transport.close()


def _blk(memory: GuestMemory, image: Path, *, ring: DriverRing | None = None, start: bool = True,
         limiter: RateLimiter | None = None, readonly: bool = False) -> Blk:
    device = VirtioBlock(BlockBackend.open(str(image), readonly=readonly), drive_id="disk0", name="drive:disk0",
                         rate_limiter=limiter)
    irq = NullInterrupt()
    transport = MmioTransport(device, memory, irq)
    blk = Blk(memory, device, transport, MmioDriver(transport), ring or DriverRing(memory, size=16), irq)
    if start:
        blk.driver.start(blk.ring)   # every feature offered: EVENT_IDX and INDIRECT_DESC among them
    return blk


# -- round trips -----------------------------------------------------------------------------------------
def _bucket() -> st.TokenBucketState:
    return st.TokenBucketState(budget=-120.5, one_time_burst=3.0, since_refill=0.25)


def _limiter() -> st.RateLimiterState:
    return st.RateLimiterState(bandwidth=_bucket(), ops=None, throttled=7)


def _queue() -> st.QueueState:
    return st.QueueState(max_size=256, size=16, ready=True, desc_addr=0x10000, driver_addr=0x18000,
                         device_addr=0x1C000, next_avail=65535, next_used=3, signalled_used=2, event_idx=True,
                         indirect=False, no_notify=True)


def _blk_state() -> st.BlockState:
    return st.BlockState(drive_id="rootfs", path="/images/root.ext4", size=1 << 30, sectors=1 << 21,
                         read_only=True, counters=st.BlockCounters(reads=4, bytes_read=2048, io_errors=1),
                         rate_limiter=_limiter())


def _frame() -> st.NetFrameState:
    return st.NetFrameState(heads=[3, 4], lengths=[1526, 12], size=1538, rest=b"\x01\x02", admitted=True)


def _net_state() -> st.NetState:
    return st.NetState(mac=bytes.fromhex("020000aabbcc"), tap_name="tap0", offloads=3, active_pairs=2, link_up=False,
                       rx=[st.NetRxState(spare=[1, 2], frame=_frame(), expected=1526), st.NetRxState()],
                       rx_rate_limiter=_limiter(), tx_rate_limiter=None)


def _transport_state(device: st.VirtioDeviceState) -> st.MmioTransportState:
    return st.MmioTransportState(device_type=2, status=15, device_features_sel=1, driver_features_sel=1,
                                 driver_features=(1 << 32) | (1 << 29), unknown_driver_features=False, queue_sel=0,
                                 shm_sel=0, interrupt_status=1, config_generation=4, queues=[_queue()], device=device)


SAMPLES: list[st.VersionedState] = [
    _bucket(), _limiter(), _queue(), st.BlockCounters(writes=9), _blk_state(), _frame(),
    st.NetRxState(spare=[5]), _net_state(), st.RngState(requests=2, bytes=64, rate_limiter=_limiter()),
    st.VsockState(guest_cid=52), _transport_state(_blk_state()),
    st.SerialState(ier=1, lcr=3, mcr=8, fcr=0xC1, scr=0x42, dll=1, dlm=0, lsr_errors=2, msr_deltas=1,
                   thr_empty_pending=True, rx=b"pending"),
    st.I8042State(output=[(0xFA, False), (0x55, True)], keyboard_buffer=b"\x14\x11", translate_break=True,
                  command_byte=0x45, output_port=3, pending_command=0x60, last_write_command=True,
                  keyboard_pending=None, keyboard_scanning=True, scan_code_set=2, resets=1, commands=9),
    st.DebugExitState(writes=1, last_status=3), st.PostCodeState(writes=5, reads=1, last_code=0x80),
]
_MSIX = st.MsixState(enabled=True, function_mask=False, entries=[(0xFEE00000, 0, 0x50, 0), (0, 0, 0, 1)], pending=2)
_FUNCTION = st.PciFunctionState(config=bytes(range(256)), msix=_MSIX)
_VTD_FAULT = st.VtdFaultRecordState(iova=0x4000_0000_1000, source_id=8, reason=5, write=True, pending=True)
SAMPLES += [   # PCI, virtio-pci and the VT-d unit (kvmlet.devices.pci, kvmlet.devices.iommu)
    _MSIX, _FUNCTION, _VTD_FAULT,
    st.PciTransportState(device_type=2, status=15, device_features_sel=1, driver_features_sel=1,
                         driver_features=(1 << 33) | (1 << 32), unknown_driver_features=False, queue_sel=0,
                         config_generation=1, isr=0, config_vector=0xFFFF, queue_vectors=[0], function=_FUNCTION,
                         queues=[_queue()], device=_blk_state()),
    st.PciHostState(config_address=0x8000_0810, bridge=st.PciFunctionState(config=bytes(256))),
    st.VtdState(gsts=0xC400_0000, rtaddr=0x200000, root=0x200000, ccmd=1 << 59, pfo=False, iqe=False, fri=0,
                next_record=1,
                records=[_VTD_FAULT, *[st.VtdFaultRecordState(iova=0, source_id=0, reason=0, write=False,
                                                              pending=False)] * 7],
                fectl_im=False, fectl_ip=False, fedata=0x5F, feaddr=0xFEE00000, feuaddr=0, iqh=0x20, iqt=0x20,
                iqa=0x300000, iwc=True, iectl_im=True, iectl_ip=True, iedata=0, ieaddr=0, ieuaddr=0, iva=0x7000,
                iotlb=3 << 57),
]
SAMPLES += [   # the vTPM (kvmlet.devices.tpm_tis): TIS registers, a half-received command, swtpm's blobs
    st.TpmState(active_locality=0, requests=[1], seized=[], fifo="reception", buffer=b"\x80\x01\x00\x00",
                read_offset=0, int_enable=1 << 31, int_status=0, int_vector=0, permanent=b"perm" * 100,
                volatile=b"vol" * 50, savestate=b"", event_log=b"log"),
]


def _all_state_types() -> set[type]:
    out: set[type] = set()
    pending = [st.VersionedState]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub.__module__ == st.__name__:
                out.add(sub)
                pending.append(sub)
    return out


def test_every_state_type_has_a_sample() -> None:
    assert {type(sample) for sample in SAMPLES} == _all_state_types()


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda sample: type(sample).__name__)
def test_state_round_trips_through_msgpack(sample: st.VersionedState) -> None:
    encoded = msgspec.msgpack.encode(sample)
    assert msgspec.msgpack.decode(encoded, type=type(sample)) == sample
    assert msgspec.msgpack.decode(encoded)["version"] == 1


def test_device_manager_states_decode_with_one_type() -> None:
    states: st.DeviceStates = {
        "serial0": SAMPLES[11], "i8042": SAMPLES[12], "debug-exit": SAMPLES[13], "post-code": SAMPLES[14],  # type: ignore[dict-item]
        "drive:rootfs": _transport_state(_blk_state()), "net:eth0": _transport_state(_net_state()),
        "entropy": _transport_state(st.RngState()), "vsock": _transport_state(st.VsockState(guest_cid=3)),
    }
    decoded = st.decode_device_states(st.encode_device_states(states))
    assert decoded == states
    assert isinstance(decoded["net:eth0"], st.MmioTransportState)
    assert isinstance(decoded["net:eth0"].device, st.NetState)
    with pytest.raises(DeviceStateError) as refused:
        st.decode_device_states(msgspec.msgpack.encode({"x": {"kind": "floppy"}}))
    assert _one_line(refused).startswith("device states:")


# -- a transport saved partway, restored into a fresh one ------------------------------------------------
def test_a_transport_saved_partway_continues_in_a_fresh_one_as_the_original(memory: GuestMemory,
                                                                              tmp_path: Path) -> None:
    image_a = _image(tmp_path / "a.img")
    a = _blk(memory, image_a)
    assert a.run(RequestType.IN, 3, in_len=2 * SECTOR_SIZE) == (Status.OK, _pattern(3) + _pattern(4))
    assert a.run(RequestType.OUT, 10, out=b"\xab" * SECTOR_SIZE)[0] == Status.OK
    assert a.run(RequestType.IN, 10, in_len=SECTOR_SIZE, segments=2)[0] == Status.OK   # through pop()
    assert len(a.ring.take_used()) == 3
    a.driver.write(MmioRegister.INTERRUPT_ACK, 1)
    # The driver made two more requests available and notified; the device has not run yet.
    a.submit(RequestType.OUT, 20, out=b"\xcd" * SECTOR_SIZE, segments=2)
    a.submit(RequestType.IN, 20, in_len=SECTOR_SIZE)
    a.driver.write(MmioRegister.QUEUE_NOTIFY, 0)
    a.transport.pause()
    saved = msgspec.msgpack.decode(msgspec.msgpack.encode(a.transport.save_state()), type=st.MmioTransportState)
    assert saved.queues[0].next_used == 3 and saved.queues[0].event_idx and saved.queues[0].indirect

    image_b = tmp_path / "b.img"
    shutil.copy(image_a, image_b)                # another backing file of the same size
    with _copy_memory(memory) as memory_b:
        ring_b = copy.copy(a.ring)
        ring_b.memory = memory_b
        b = _blk(memory_b, image_b, ring=ring_b, start=False)
        try:
            b.transport.restore_state(saved)
            assert b.driver.status == a.driver.status == 15 and b.device.active
            for register in (MmioRegister.INTERRUPT_STATUS, MmioRegister.CONFIG_GENERATION):
                assert b.driver.read(register) == a.driver.read(register)
            irqs_a = a.irq.count
            for ring in (a.ring, b.ring):
                ring.set_used_event(ring.last_used)     # the driver wants an interrupt for the next one
            a.transport.resume()
            assert a.transport.poll() == 1 and b.transport.poll() == 1   # the notification, and the restore's kick
            assert a.ring.take_used() == b.ring.take_used() == [(10, 1), (14, SECTOR_SIZE + 1)]
            assert a.irq.count - irqs_a == b.irq.count == 1
            # Both go on with the same requests and end in the same state, byte for byte.
            for blk in (a, b):
                blk.submit(RequestType.IN, 20, in_len=2 * SECTOR_SIZE, segments=2)
                blk.submit(RequestType.OUT, 30, out=bytes(range(256)) * 4)
                blk.submit(RequestType.GET_ID, in_len=20)
                blk.ring.set_used_event(blk.ring.last_used + 1)
                blk.driver.notify()
            assert a.ring.take_used() == b.ring.take_used()
            assert a.irq.count - irqs_a == b.irq.count == 2
            assert memory.read(0, MEMORY) == memory_b.read(0, MEMORY)
            assert image_a.read_bytes() == image_b.read_bytes()
            a.transport.pause()
            b.transport.pause()
            state_a, state_b = a.transport.save_state(), b.transport.save_state()
            assert isinstance(state_a.device, st.BlockState) and isinstance(state_b.device, st.BlockState)
            assert msgspec.structs.replace(state_b, device=msgspec.structs.replace(
                state_b.device, path=state_a.device.path)) == state_a
        finally:
            b.close()
            a.close()


def test_a_device_the_driver_never_started_restores_and_can_be_started(memory: GuestMemory,
                                                                       tmp_path: Path) -> None:
    a = _blk(memory, _image(tmp_path / "a.img"), start=False)
    assert a.driver.negotiate()                  # FEATURES_OK, no DRIVER_OK
    b = _blk(memory, _image(tmp_path / "b.img"), start=False)
    try:
        b.transport.restore_state(a.transport.save_state())
        assert b.driver.status == a.driver.status and not b.device.active
        b.driver.setup_queue(0, b.ring)
        b.driver.driver_ok()
        assert b.device.active
        assert b.run(RequestType.IN, 1, in_len=SECTOR_SIZE) == (Status.OK, _pattern(1))
    finally:
        a.close()
        b.close()


def test_rate_limiter_tokens_survive_a_restore(memory: GuestMemory, tmp_path: Path) -> None:
    now = [100.0]
    config = RateLimiterConfig(bandwidth=TokenBucketConfig(size=4096, refill_time=1000, one_time_burst=100))
    a = _blk(memory, _image(tmp_path / "a.img"), limiter=RateLimiter(config, lambda: now[0]))
    a.run(RequestType.IN, 0, in_len=8 * SECTOR_SIZE)    # the burst, then 3996 of the 4096 tokens
    now[0] += 0.5
    saved = a.transport.save_state()
    assert isinstance(saved.device, st.BlockState) and saved.device.rate_limiter is not None
    bucket = saved.device.rate_limiter.bandwidth
    assert bucket is not None and bucket.one_time_burst == 0 and bucket.since_refill == pytest.approx(0.5)
    later = [5000.0]   # another process: another monotonic clock
    b = _blk(memory, _image(tmp_path / "b.img"), limiter=RateLimiter(config, lambda: later[0]), start=False)
    try:
        b.transport.restore_state(saved)
        assert b.device.rate_limiter is not None and a.device.rate_limiter is not None
        assert b.device.rate_limiter.try_consume(4096) == pytest.approx(a.device.rate_limiter.try_consume(4096))
        assert b.device.rate_limiter.bandwidth is not None and b.device.rate_limiter.bandwidth.budget < 4096
    finally:
        a.close()
        b.close()


def test_a_token_bucket_saves_a_duration_not_a_timestamp() -> None:
    now = [10.0]
    bucket = TokenBucket(TokenBucketConfig(size=1000, refill_time=1000, one_time_burst=50), lambda: now[0])
    bucket.consume(850)
    now[0] += 0.1
    saved = bucket.save_state()
    assert (saved.budget, saved.one_time_burst, saved.since_refill) == (200, 0, pytest.approx(0.1))
    other = TokenBucket(TokenBucketConfig(size=1000, refill_time=1000, one_time_burst=50), lambda: 99999.0)
    other.restore_state(saved, "drive:x")
    assert other.wait_time(1000) == pytest.approx(bucket.wait_time(1000))  # 700 tokens missing at 1000/s


# -- refusals ---------------------------------------------------------------------------------------------
def test_a_state_of_another_version_is_refused_in_one_line(memory: GuestMemory, tmp_path: Path) -> None:
    a = _blk(memory, _image(tmp_path / "a.img"))
    b = _blk(memory, _image(tmp_path / "b.img"), start=False)
    try:
        saved = a.transport.save_state()
        with pytest.raises(DeviceStateError) as refused:
            b.transport.restore_state(msgspec.structs.replace(saved, version=2))
        assert _one_line(refused) == ("drive:disk0: the saved virtio-mmio state is version 2; this kvmlet restores "
                                      "version 1")
        newer_queue = msgspec.structs.replace(saved.queues[0], version=3)
        with pytest.raises(DeviceStateError, match=r"drive:disk0 queue 0: .* version 3"):
            b.transport.restore_state(msgspec.structs.replace(saved, queues=[newer_queue]))
        assert isinstance(saved.device, st.BlockState)
        with pytest.raises(DeviceStateError, match="virtio-blk state is version 9"):
            b.transport.restore_state(msgspec.structs.replace(
                saved, device=msgspec.structs.replace(saved.device, version=9)))
        assert b.driver.status == 0 and not b.device.active    # nothing was restored
    finally:
        a.close()
        b.close()


def test_a_drive_of_another_size_or_mode_is_refused(memory: GuestMemory, tmp_path: Path) -> None:
    a = _blk(memory, _image(tmp_path / "a.img"))
    smaller = _image(tmp_path / "small.img", SECTORS - 1)
    b = _blk(memory, smaller, start=False)
    c = _blk(memory, _image(tmp_path / "c.img"), start=False, readonly=True)
    try:
        saved = a.transport.save_state()
        with pytest.raises(DeviceStateError) as refused:
            b.transport.restore_state(saved)
        assert _one_line(refused) == (f"drive:disk0: the snapshot's drive was {SECTORS * SECTOR_SIZE} bytes; "
                                      f"{smaller} is {(SECTORS - 1) * SECTOR_SIZE} bytes")
        assert b.driver.status == 0
        with pytest.raises(DeviceStateError, match=r"drive:disk0: the snapshot's drive was writable; .* read-only"):
            c.transport.restore_state(saved)
        rng = MmioTransport(VirtioRng(name="entropy"), memory, NullInterrupt())
        with pytest.raises(DeviceStateError, match="entropy: the saved state is of virtio device type 2; this "
                                                   "device is type 4"):
            rng.restore_state(saved)
        rng.close()
    finally:
        for blk in (a, b, c):
            blk.close()


def test_features_the_device_no_longer_offers_are_refused_after_features_ok(memory: GuestMemory,
                                                                          tmp_path: Path) -> None:
    a = _blk(memory, _image(tmp_path / "a.img"))
    b = _blk(memory, _image(tmp_path / "b.img"), start=False)
    try:
        saved = a.transport.save_state()
        unoffered = 1 << 50   # a feature bit no kvmlet device offers
        with pytest.raises(DeviceStateError) as refused:
            b.transport.restore_state(msgspec.structs.replace(saved, driver_features=saved.driver_features | unoffered))
        assert _one_line(refused) == ("drive:disk0: the driver had accepted feature bits 50, which this device does "
                                      "not offer here (a host or back end without them)")
        assert b.driver.status == 0
        # before FEATURES_OK a driver may have written anything (the device refuses it then): not a refusal
        b.transport.restore_state(msgspec.structs.replace(saved, status=0, driver_features=unoffered))
    finally:
        a.close()
        b.close()


# -- the device manager -----------------------------------------------------------------------------------
class FakeVm:
    """What the device manager asks of a VM, without KVM."""

    def register_irqfd(self, fd: int, gsi: int) -> None:
        pass

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        pass

    def register_ioeventfd(self, fd: int, address: int, length: int, *, datamatch: int | None = None) -> None:
        pass

    def unregister_ioeventfd(self, fd: int, address: int, length: int, *, datamatch: int | None = None) -> None:
        pass


@pytest.fixture
def make_manager(memory: GuestMemory, events: EventLoopThread) -> Iterator[Callable[..., DeviceManager]]:
    made: list[DeviceManager] = []

    def make(*, rng: RateLimiter | None = None) -> DeviceManager:
        manager = DeviceManager(FakeVm(), memory, events)  # type: ignore[arg-type]
        made.append(manager)
        add_legacy_devices(manager, NullConsole(), on_first_byte=lambda: None, on_reset=lambda: None,
                           on_exit=lambda status: None)
        manager.add_virtio_mmio(VirtioRng(name="entropy", rate_limiter=rng))
        return manager

    yield make
    for manager in made:
        manager.close()


def _rng_driver(manager: DeviceManager, memory: GuestMemory) -> tuple[MmioDriver, DriverRing]:
    managed = manager.find("entropy")
    assert managed is not None and managed.transport is not None
    driver, ring = MmioDriver(managed.transport), DriverRing(memory)
    assert driver.negotiate()
    driver.setup_queue(0, ring)
    driver.driver_ok()
    return driver, ring


def _rng_request(ring: DriverRing, length: int = 32) -> int:
    head = ring.add_chain([(*ring.buffer(length), True)])
    ring.publish(head)
    return head


def _wait_used(ring: DriverRing, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += ring.take_used()
        time.sleep(0.002)
    return got


def test_manager_saves_and_restores_every_device(make_manager: Callable[..., DeviceManager],
                                                 memory: GuestMemory) -> None:
    manager = make_manager()
    driver, ring = _rng_driver(manager, memory)
    _rng_request(ring)
    driver.write(MmioRegister.QUEUE_NOTIFY, 0)
    assert len(_wait_used(ring)) == 1
    serial = manager.find("serial0")
    assert serial is not None
    serial.device.bus_write(7, 1, 0x5A)                  # the UART's scratch register
    with pytest.raises(StateError, match="only while they are paused"):
        manager.save_state()
    manager.pause()
    states = st.decode_device_states(st.encode_device_states(manager.save_state()))
    assert sorted(states) == ["debug-exit", "entropy", "i8042", "post-code", "serial0"]
    manager.resume()

    other = make_manager()
    other.pause()
    other.restore_state(states)
    assert other.save_state() == states
    other_serial = other.find("serial0")
    assert other_serial is not None and other_serial.device.bus_read(7, 1) == 0x5A


def test_manager_refuses_states_for_other_devices_before_restoring_any(
        make_manager: Callable[..., DeviceManager]) -> None:
    source = make_manager()
    source.pause()
    states = source.save_state()
    target = make_manager()
    target.pause()
    before = target.save_state()
    serial_state = states["serial0"]
    assert isinstance(serial_state, st.SerialState)
    changed: st.DeviceStates = {**states, "serial0": msgspec.structs.replace(serial_state, scr=0x77)}
    del changed["entropy"]
    changed["drive:gone"] = changed["debug-exit"]
    with pytest.raises(DeviceStateError) as refused:
        target.restore_state(changed)
    assert _one_line(refused) == ("device states do not match the devices: no saved state for device entropy; "
                                  "a saved state for device drive:gone, which this VM does not have")
    assert target.save_state() == before                  # the serial port kept its own state
    with pytest.raises(DeviceStateError, match="serial0: the saved state is a debug-exit state, not a serial"):
        target.restore_state({**states, "serial0": states["debug-exit"]})


def test_manager_refuses_to_save_a_device_without_a_state_model(make_manager: Callable[..., DeviceManager]) -> None:
    manager = make_manager()

    class Port:
        def bus_read(self, offset: int, size: int) -> int:
            return 0

        def bus_write(self, offset: int, size: int, value: int) -> None:
            pass

    manager.add_legacy("port-0x99", Port(), [])
    manager.pause()
    with pytest.raises(UnsupportedError) as refused:
        manager.save_state()
    assert _one_line(refused) == "device port-0x99 cannot be saved (it has no state model)"


# -- quiescing ---------------------------------------------------------------------------------------------
def test_pause_holds_notifications_and_resume_serves_them(make_manager: Callable[..., DeviceManager],
                                                          memory: GuestMemory) -> None:
    manager = make_manager()
    driver, ring = _rng_driver(manager, memory)
    for round_ in range(2):                               # pause and resume can be repeated
        head = _rng_request(ring)
        manager.pause()
        driver.write(MmioRegister.QUEUE_NOTIFY, 0)        # the guest's notification: an eventfd write
        cpu = time.process_time()
        time.sleep(0.3)
        assert ring.take_used() == [], round_             # held: no device work while paused ...
        assert time.process_time() - cpu < 0.15           # ... and no busy loop on the readable eventfd
        manager.resume()
        assert _wait_used(ring) == [(head, 32)], round_


def test_a_paused_transport_remembers_the_queues_it_was_asked_to_run(memory: GuestMemory) -> None:
    transport = MmioTransport(VirtioRng(), memory, NullInterrupt())
    driver, ring = MmioDriver(transport), DriverRing(memory)
    driver.start(ring)
    try:
        head = _rng_request(ring)
        transport.pause()
        assert driver.notify() == 1                       # the eventfd was read: the queue is owed a run
        transport.process_queue(0)                        # as a timer or a host event would
        assert ring.take_used() == [] and transport.paused
        transport.resume()
        assert transport.poll() == 1                      # kicked once, through its eventfd
        assert ring.take_used() == [(head, 32)]
    finally:
        transport.close()


def test_pause_holds_a_rate_limiter_timer(make_manager: Callable[..., DeviceManager], memory: GuestMemory) -> None:
    limiter = RateLimiter(RateLimiterConfig(ops=TokenBucketConfig(size=1, refill_time=100)))
    manager = make_manager(rng=limiter)
    driver, ring = _rng_driver(manager, memory)
    first, second = _rng_request(ring), _rng_request(ring)
    driver.write(MmioRegister.QUEUE_NOTIFY, 0)
    assert _wait_used(ring) == [(first, 32)]              # the second waits for a token: a timer is armed
    manager.pause()
    time.sleep(0.3)                                       # the timer fires while paused
    assert ring.take_used() == []
    manager.resume()
    assert _wait_used(ring) == [(second, 32)]


def test_pause_holds_serial_input(make_manager: Callable[..., DeviceManager]) -> None:
    manager = make_manager()
    serial = manager.find("serial0")
    assert serial is not None
    uart = serial.device
    manager.pause()
    uart.enqueue_input(b"typed while paused")
    assert uart.bus_read(5, 1) & 1 == 0                   # LSR: no data ready
    manager.resume()
    assert uart.bus_read(5, 1) & 1 == 1
    assert bytes(uart.bus_read(0, 1) for _ in range(18)) == b"typed while paused"


def test_pause_holds_vsock_host_sockets(big_memory: GuestMemory, events: EventLoopThread, tmp_path: Path) -> None:
    memory = big_memory
    from kvmlet.devices.virtio.vsock_packet import Op

    gate = PausableEventLoop(events)
    rig = make_vsock_rig(memory, gate, tmp_path / "vm.vsock")  # type: ignore[arg-type]
    try:
        rig.post_rx(8)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(f"{tmp_path / 'vm.vsock'}_1234")
        server.listen(1)
        rig.send(Op.REQUEST, 5000, 1234)
        assert [p.hdr.op for p in rig.receive()] == [Op.RESPONSE]
        peer, _ = server.accept()
        gate.pause()
        rig.transport.pause()
        peer.sendall(b"while paused")
        time.sleep(0.2)
        assert rig.rings[0].take_used() == []
        rig.transport.resume()
        gate.resume()
        [data] = rig.receive()
        assert data.hdr.op == Op.RW and data.payload == b"while paused"
        peer.close()
        server.close()
    finally:
        rig.close()


# -- vsock: connections are reset on restore --------------------------------------------------------------
def test_a_restored_vsock_tells_the_guest_of_a_transport_reset(big_memory: GuestMemory, events: EventLoopThread,
                                                               tmp_path: Path) -> None:
    memory = big_memory
    rig = make_vsock_rig(memory, events, tmp_path / "a.vsock")
    try:
        saved = rig.transport.save_state()
        with _copy_memory(memory) as memory_b:
            device = VirtioVsock(GUEST_CID + 1, tmp_path / "b.vsock", events, name="vsock")
            irq = NullInterrupt()
            transport = MmioTransport(device, memory_b, irq)
            try:
                transport.restore_state(saved)
                assert device.guest_cid == GUEST_CID                    # the guest keeps its CID
                assert transport.bus_read(MmioRegister.CONFIG, 8) == GUEST_CID
                ring = copy.copy(rig.rings[EVENT_QUEUE])
                ring.memory = memory_b
                transport.poll()                                        # no event buffer yet: nothing
                assert ring.take_used() == [] and irq.count == 0
                gpa, length = ring.buffer(8)
                head = ring.add_chain([(gpa, length, True)])
                ring.publish(head)
                MmioDriver(transport).notify(EVENT_QUEUE)
                assert ring.take_used() == [(head, 4)]                  # struct virtio_vsock_event
                assert memory_b.read_u32(gpa) == 0                      # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
                assert irq.count == 1 and device.stats.transport_resets == 1
                ring.publish(ring.add_chain([(*ring.buffer(8), True)]))
                MmioDriver(transport).notify(EVENT_QUEUE)
                assert ring.take_used() == []                           # one reset, one event
            finally:
                transport.close()
    finally:
        rig.close()


# -- dirty marking -----------------------------------------------------------------------------------------
def _pages(gpas: list[int]) -> set[int]:
    return {gpa // PAGE_SIZE for gpa in gpas}


def _dirty_pages(memory: GuestMemory) -> set[int]:
    [pages] = memory.take_dirty()
    return {index for index, byte in enumerate(pages) if byte}


@pytest.mark.parametrize("segments", [1, 2], ids=["direct-path", "parsed-path"])
def test_completed_chains_mark_their_writable_pages_and_the_used_ring(memory: GuestMemory, tmp_path: Path,
                                                                      segments: int) -> None:
    blk = _blk(memory, _image(tmp_path / "a.img"))
    try:
        _, read_data, read_status = blk.submit(RequestType.IN, 2, in_len=2 * SECTOR_SIZE * segments,
                                               segments=2 * segments, page_aligned=True)
        _, _, write_status = blk.submit(RequestType.OUT, 9, out=bytes(SECTOR_SIZE * 2), segments=segments,
                                        page_aligned=True)
        memory.start_dirty_tracking()
        blk.driver.notify()
        assert [length for _, length in blk.ring.take_used()] == [2 * SECTOR_SIZE * segments + 1, 1]
        # Data read (writable, one page), both status bytes and the used ring: not the headers, the data
        # written to the drive, the descriptor table or the available ring.
        assert _dirty_pages(memory) == _pages([read_data, read_status, write_status, blk.ring.used])
        assert blk.device.stats.reads == 1 and blk.device.stats.writes == 1
    finally:
        blk.close()


def test_dirty_marking_covers_whole_buffers_spanning_pages(memory: GuestMemory) -> None:
    transport = MmioTransport(VirtioRng(), memory, NullInterrupt())
    driver, ring = MmioDriver(transport), DriverRing(memory)
    driver.start(ring)
    try:
        gpa = ring.alloc(3 * PAGE_SIZE, PAGE_SIZE) + PAGE_SIZE // 2
        head = ring.add_chain([(gpa, 2 * PAGE_SIZE, True)])   # spans three pages
        ring.publish(head)
        memory.start_dirty_tracking()
        driver.notify()
        assert ring.take_used() == [(head, 2 * PAGE_SIZE)]
        assert _dirty_pages(memory) == _pages([gpa, gpa + PAGE_SIZE, gpa + 2 * PAGE_SIZE - 1, ring.used])
    finally:
        transport.close()


def test_dirty_marking_costs_nothing_when_tracking_is_off(memory: GuestMemory, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    marks: list[tuple[int, int]] = []
    monkeypatch.setattr(memory, "mark_dirty", lambda gpa, length: marks.append((gpa, length)))
    blk = _blk(memory, _image(tmp_path / "a.img"))
    try:
        assert blk.run(RequestType.IN, 1, in_len=SECTOR_SIZE)[0] == Status.OK
        assert blk.run(RequestType.IN, 1, in_len=2 * SECTOR_SIZE, segments=2)[0] == Status.OK
        assert not memory.dirty_tracking and marks == []
        memory.start_dirty_tracking()
        assert blk.run(RequestType.IN, 1, in_len=SECTOR_SIZE)[0] == Status.OK
        assert marks                                          # the recorder does see marks when tracking
    finally:
        blk.close()


# -- virtio-net (a real TAP) ------------------------------------------------------------------------------
needs_tap = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                               reason="TAP devices need root and /dev/net/tun")


@needs_tap
def test_a_restored_net_device_keeps_its_mac_offloads_and_held_buffers(events: EventLoopThread) -> None:
    from kvmlet.devices.virtio.net import VirtioNet, offload_for_features
    from tests.support.netlab import make_frame, packet_socket, quiet_tap
    from tests.support.netrig import GUEST_MAC, HOST_MAC, MEMORY_SIZE, make_rig

    with GuestMemory([(0, MEMORY_SIZE)], hugepages=False) as memory_a:
        rig = make_rig(memory_a, events)
        try:
            buffers = rig.post_rx(0, 1526, 1526)          # the device takes one and holds it (nothing to read)
            rig.transport.pause()
            deadline = time.monotonic() + 5
            while not rig.device._pair[0].spare and time.monotonic() < deadline:
                time.sleep(0.01)
            saved = rig.transport.save_state()
            assert isinstance(saved.device, st.NetState)
            assert saved.device.rx[0].spare == [buffers[0].head] and saved.device.mac == GUEST_MAC
            with _copy_memory(memory_a) as memory_b:
                device = VirtioNet(quiet_tap(), bytes.fromhex("02aabbccddee"), events, name="net:eth0")
                transport = MmioTransport(device, memory_b, NullInterrupt(), events)
                try:
                    transport.restore_state(saved)
                    assert transport.bus_read(MmioRegister.CONFIG, 4) | transport.bus_read(
                        MmioRegister.CONFIG + 4, 2) << 32 == int.from_bytes(GUEST_MAC, "little")
                    assert device.offload == rig.device.offload == offload_for_features(rig.device.features)
                    assert device.offload and [c.head for c in device._pair[0].spare] == [buffers[0].head]
                    ring = copy.copy(rig.rings[0])
                    ring.memory = memory_b
                    frame = make_frame(GUEST_MAC, HOST_MAC, b"after the restore" + bytes(60))
                    with packet_socket(device.tap.name) as sock:
                        sock.send(frame)
                        deadline = time.monotonic() + 5
                        used: list[tuple[int, int]] = []
                        while not used and time.monotonic() < deadline:
                            transport.poll()
                            used = ring.take_used()
                            time.sleep(0.01)
                    assert used == [(buffers[0].head, 12 + len(frame))]   # into the buffer held at the snapshot
                    assert memory_b.read(buffers[0].gpa + 12, len(frame)) == frame
                finally:
                    transport.close()
        finally:
            rig.close()


def test_pausable_event_loop_pause_waits_for_the_running_callback(events: EventLoopThread) -> None:
    gate = PausableEventLoop(events)
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        entered.set()
        release.wait(5)
        finished.set()

    gate.call_later(0, slow)
    assert entered.wait(5)
    pauser = threading.Thread(target=gate.pause)
    pauser.start()
    time.sleep(0.1)
    assert pauser.is_alive()                              # waiting for the callback to end
    release.set()
    pauser.join(5)
    assert finished.is_set() and gate.paused
    gate.resume()
