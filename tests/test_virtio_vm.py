"""virtio-mmio devices in real VMs: the layout the Machine builds, the host driving a device through the
VM's own bus, event loop, eventfds and irqfd, and the test guest's virtio checks end to end (QueueNotify
through an in-kernel ioeventfd, completions through an irqfd on an ISA IRQ)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmlet.config import ConfigError, MachineConfig
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.virtio.attach import VIRTIO_GSIS, VIRTIO_MMIO_BASE, slot_for
from kvmlet.devices.virtio.blk import VirtioBlock
from kvmlet.devices.virtio.mmio import TransportStats
from kvmlet.devices.virtio.options import DriveConfig, RngConfig
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.memory import MiB
from kvmlet.vm import ExitStatus, Machine
from tests.support.virtq import DriverRing, MmioDriver

SECTORS = 2048


def _image(path: Path, sectors: int = SECTORS) -> Path:
    path.write_bytes(bytes((i * 31 + (i >> 9)) & 0xFF for i in range(sectors * 512)))
    return path


def _guest_pattern(sector: int) -> bytes:
    """What the guest's virtio-blk check writes (guest/virtio_blk.c pattern_byte)."""
    return bytes((i ^ 0x5A ^ (sector >> (8 * (i & 7)))) & 0xFF for i in range(512))


@dataclass
class VirtioRun:
    status: ExitStatus
    output: str
    transports: dict[str, tuple[TransportStats, int]]  # per device: counters, interrupts sent

    def passed(self, name: str) -> bool:
        return f"TEST {name} PASS" in self.output


def _run(guest_elf: Path, tests: str, *, drives: list[DriveConfig], rng: RngConfig | None = None,
         extra: str = "", timeout: float = 60.0) -> VirtioRun:
    console = BufferConsole()
    config = MachineConfig(kernel=guest_elf, cmdline=f"console=ttyS0 kvmlet.test={tests} {extra}".strip(),
                           memory=64 * MiB, drives=drives, rng=rng)
    machine = Machine(config, console=console).build()
    try:
        machine.start()
        status = machine.wait(timeout)
        output = console.output().decode(errors="replace")
        devices = machine.virtio.devices if machine.virtio else []
        transports = {a.name: (a.transport.stats, _interrupts(a.transport.irq)) for a in devices}
    finally:
        machine.close()
    return VirtioRun(status, output, transports)


def _interrupts(line: object) -> int:
    count = getattr(line, "count", 0)
    assert isinstance(count, int)
    return count


def test_layout_and_kernel_command_line(guest_elf: Path, tmp_path: Path) -> None:
    drives = [DriveConfig(_image(tmp_path / "a.img")), DriveConfig(_image(tmp_path / "b.img", 8), readonly=True)]
    config = MachineConfig(kernel=guest_elf, cmdline="console=ttyS0 -- init-arg", drives=drives, rng=RngConfig(),
                           console="none")
    machine = Machine(config).build()
    try:
        assert machine.virtio is not None
        names = [d.name for d in machine.virtio.devices]
        assert names == ["virtio-blk0", "virtio-blk1", "virtio-rng"]
        slots = [d.slot for d in machine.virtio.devices]
        assert [s.base for s in slots] == [VIRTIO_MMIO_BASE + 0x1000 * i for i in range(3)]
        assert [s.gsi for s in slots] == list(VIRTIO_GSIS[:3]) == [5, 6, 7]
        assert machine.boot_info is not None
        assert machine.boot_info.cmdline.decode() == (
            "console=ttyS0 virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6 "
            "virtio_mmio.device=4K@0xc0002000:7 -- init-arg")
        ranges = {r.name: (r.base, r.size) for r in machine.mmio.ranges()}
        assert ranges["virtio-rng"] == (0xC0002000, 0x1000)
        device = machine.virtio.devices[1].device
        assert isinstance(device, VirtioBlock) and device.readonly and device.drive_id == b"drive1"
    finally:
        machine.close()
    assert getattr(machine, "virtio") is None  # noqa: B009 - mypy narrowed it to not-None above
    assert not [r for r in machine.mmio.ranges() if r.name.startswith("virtio")]


def test_too_many_devices_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="too many virtio devices"):
        slot_for(len(VIRTIO_GSIS))


def test_host_drives_a_device_through_the_vm_bus_and_event_loop(guest_elf: Path) -> None:
    """No guest code runs: the test plays the driver on the MMIO bus; notifications reach the device on the
    event-loop thread through the queue eventfd and the used-buffer interrupt goes out through the irqfd."""
    import threading

    config = MachineConfig(kernel=guest_elf, cmdline="console=ttyS0", rng=RngConfig(), console="none")
    machine = Machine(config).build()
    try:
        assert machine.virtio is not None and machine.memory is not None
        attached = machine.virtio.devices[0]
        assert isinstance(attached.device, VirtioRng)
        seen: list[str] = []
        process = attached.device.process_queue

        def spy(index: int) -> None:
            seen.append(threading.current_thread().name)
            process(index)

        attached.device.process_queue = spy  # type: ignore[method-assign]
        machine.events.start()
        driver = MmioDriver(attached.transport)
        ring = DriverRing(machine.memory)
        assert driver.negotiate()
        driver.setup_queue(0, ring)
        driver.driver_ok()
        buf = ring.buffer(32)
        head = ring.add_chain([(*buf, True)])
        ring.publish(head)
        machine.mmio.write(attached.slot.base + 0x50, 4, 0)  # QueueNotify as an MMIO exit would deliver it
        deadline = time.monotonic() + 5
        while ring.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ring.take_used() == [(head, 32)]
        assert seen and all(name == "kvmlet-events" for name in seen)
        assert _interrupts(attached.transport.irq) >= 1
        assert machine.memory.read(buf[0], 32) != bytes(32)
    finally:
        machine.close()


def test_guest_virtio_blk_and_rng(guest_elf: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "disk.img")
    original = image.read_bytes()
    run = _run(guest_elf, "virtio-probe,virtio-blk,virtio-rng,virtio-blk-irq",
               drives=[DriveConfig(image, id="kvmlet-test")], rng=RngConfig())
    assert run.status.code == 0, run.output
    for name in ("virtio-probe", "virtio-blk", "virtio-rng", "virtio-blk-irq"):
        assert run.passed(name), run.output
    assert f"BLK capacity={SECTORS} ro=0" in run.output
    for sector in range(8):
        crc = zlib.crc32(original[sector * 512:(sector + 1) * 512])
        assert f"BLK sector{sector} crc=0x{crc:08x}" in run.output
    assert "BLK id=kvmlet-test" in run.output
    last = SECTORS - 1
    assert image.read_bytes()[last * 512:] == _guest_pattern(last)  # the guest's write reached the file
    assert image.read_bytes()[:last * 512] == original[:last * 512]
    blk_stats, blk_interrupts = run.transports["virtio-blk0"]
    assert blk_stats.queue_events > 0
    assert blk_stats.mmio_notifies == 0  # every QueueNotify was absorbed by the in-kernel ioeventfd
    assert blk_interrupts > 0


def test_guest_read_only_drive(guest_elf: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "ro.img", 64)
    original = image.read_bytes()
    run = _run(guest_elf, "virtio-blk", drives=[DriveConfig(image, readonly=True)])
    assert run.passed("virtio-blk"), run.output
    assert "ro=1" in run.output and "BLK write refused (read-only)" in run.output
    assert image.read_bytes() == original


def test_guest_direct_io_drive(guest_elf: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "direct.img")
    run = _run(guest_elf, "virtio-blk", drives=[DriveConfig(image, direct=True)])
    assert run.passed("virtio-blk"), run.output
    last = SECTORS - 1
    assert image.read_bytes()[last * 512:] == _guest_pattern(last)
