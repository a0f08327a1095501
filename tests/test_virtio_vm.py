"""virtio-mmio devices in real VMs: the layout the Machine builds, the host driving a device through the
VM's own bus, event loop, eventfds and irqfd, and the test guest's virtio checks end to end (QueueNotify
through an in-kernel ioeventfd, completions through an irqfd on an ISA IRQ)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmlet.config import ConfigError, Drive, Entropy
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.devices.manager import FREE_ISA_GSIS, VIRTIO_MMIO_BASE, DeviceKind
from kvmlet.devices.virtio.blk import VirtioBlock
from kvmlet.devices.virtio.mmio import TransportStats
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.eventloop import EventLoopThread
from kvmlet.machine import ExitStatus, build_machine
from kvmlet.memory import MiB
from tests.support.virtq import DriverRing, MmioDriver
from tests.support.vmrun import built_machine, vm_config

SECTORS = 2048


def _image(path: Path, sectors: int = SECTORS) -> Path:
    path.write_bytes(bytes((i * 31 + (i >> 9)) & 0xFF for i in range(sectors * 512)))
    return path


def _drive(path: Path, number: int = 0, *, drive_id: str | None = None, is_read_only: bool = False,
           direct: bool = False) -> Drive:
    """A drive named as ``--drive`` names the ``number``-th one (``drive<number>``) unless given a drive_id."""
    return Drive(drive_id=drive_id or f"drive{number}", path_on_host=str(path), is_read_only=is_read_only,
                 direct=direct)


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


def _run(guest_elf: Path, tests: str, *, drives: list[Drive], rng: Entropy | None = None,
         extra: str = "", timeout: float = 60.0) -> VirtioRun:
    console = BufferConsole()
    config = vm_config(guest_elf, cmdline=f"console=ttyS0 kvmlet.test={tests} {extra}".strip(),
                       memory=64 * MiB, drives=drives, entropy=rng)
    with built_machine(config, console=console) as machine:
        machine.start()
        status = machine.wait(timeout)
        output = console.output().decode(errors="replace")
        assert machine.devices is not None
        transports = {d.name: (d.transport.stats, _interrupts(d.transport.irq))
                      for d in machine.devices.devices if d.transport is not None}
    return VirtioRun(status, output, transports)


def _interrupts(line: object) -> int:
    count = getattr(line, "count", 0)
    assert isinstance(count, int)
    return count


def test_layout_and_kernel_command_line(guest_elf: Path, tmp_path: Path) -> None:
    drives = [_drive(_image(tmp_path / "a.img"), 0), _drive(_image(tmp_path / "b.img", 8), 1, is_read_only=True)]
    config = vm_config(guest_elf, cmdline="console=ttyS0 -- init-arg", drives=drives, entropy=Entropy(),
                       console="none")
    with built_machine(config) as machine:
        assert machine.devices is not None
        virtio = [d for d in machine.devices.devices if d.kind is DeviceKind.VIRTIO_MMIO]
        names = [d.name for d in virtio]
        assert names == ["drive:drive0", "drive:drive1", "entropy"]
        assert [d.mmio for d in virtio] == [[(VIRTIO_MMIO_BASE + 0x1000 * i, 0x1000)] for i in range(3)]
        assert [d.gsi for d in virtio] == list(FREE_ISA_GSIS[:3]) == [5, 6, 7]
        assert machine.boot_info is not None
        assert machine.boot_info.cmdline.decode() == (
            "console=ttyS0 virtio_mmio.device=4K@0xc0000000:5 virtio_mmio.device=4K@0xc0001000:6 "
            "virtio_mmio.device=4K@0xc0002000:7 -- init-arg")
        ranges = {r.name: (r.base, r.size) for r in machine.mmio.ranges()}
        assert ranges["entropy"] == (0xC0002000, 0x1000)
        device = machine.devices.virtio_devices()[1]
        assert isinstance(device, VirtioBlock) and device.readonly and device.drive_id == b"drive1"
    assert getattr(machine, "devices") is None  # noqa: B009 - mypy narrowed it to not-None above
    assert not [r for r in machine.mmio.ranges() if r.name in names]


def test_too_many_devices_is_a_config_error(guest_elf: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "d.img", 8)
    drives = [_drive(image, n, is_read_only=True) for n in range(len(FREE_ISA_GSIS) + 1)]
    config = vm_config(guest_elf, cmdline="console=ttyS0", drives=drives, console="none")
    events = EventLoopThread()
    try:
        with pytest.raises(ConfigError, match=f"no free interrupt line \\(at most {len(FREE_ISA_GSIS)} virtio"):
            build_machine(config, events).close()
    finally:
        events.stop()


def test_host_drives_a_device_through_the_vm_bus_and_event_loop(guest_elf: Path) -> None:
    """No guest code runs: the test plays the driver on the MMIO bus; notifications reach the device on the
    event-loop thread through the queue eventfd and the used-buffer interrupt goes out through the irqfd."""
    import threading

    config = vm_config(guest_elf, cmdline="console=ttyS0", entropy=Entropy(), console="none")
    with built_machine(config) as machine:
        assert machine.devices is not None and machine.memory is not None
        attached = machine.devices.find("entropy")
        assert attached is not None and attached.transport is not None
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
        base, _ = attached.mmio[0]
        machine.mmio.write(base + 0x50, 4, 0)  # QueueNotify as an MMIO exit would deliver it
        deadline = time.monotonic() + 5
        while ring.used_idx() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ring.take_used() == [(head, 32)]
        assert seen and all(name == "kvmlet-events" for name in seen)
        assert _interrupts(attached.transport.irq) >= 1
        assert machine.memory.read(buf[0], 32) != bytes(32)


def test_guest_virtio_blk_and_rng(guest_elf: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "disk.img")
    original = image.read_bytes()
    run = _run(guest_elf, "virtio-probe,virtio-blk,virtio-rng,virtio-blk-irq",
               drives=[_drive(image, drive_id="kvmlet_test")], rng=Entropy())
    assert run.status.code == 0, run.output
    for name in ("virtio-probe", "virtio-blk", "virtio-rng", "virtio-blk-irq"):
        assert run.passed(name), run.output
    assert f"BLK capacity={SECTORS} ro=0" in run.output
    for sector in range(8):
        crc = zlib.crc32(original[sector * 512:(sector + 1) * 512])
        assert f"BLK sector{sector} crc=0x{crc:08x}" in run.output
    assert "BLK id=kvmlet_test" in run.output
    last = SECTORS - 1
    assert image.read_bytes()[last * 512:] == _guest_pattern(last)  # the guest's write reached the file
    assert image.read_bytes()[:last * 512] == original[:last * 512]
    blk_stats, blk_interrupts = run.transports["drive:kvmlet_test"]
    assert blk_stats.queue_events > 0
    assert blk_stats.mmio_notifies == 0  # every QueueNotify was absorbed by the in-kernel ioeventfd
    assert blk_interrupts > 0


def test_guest_read_only_drive(guest_elf: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "ro.img", 64)
    original = image.read_bytes()
    run = _run(guest_elf, "virtio-blk", drives=[_drive(image, is_read_only=True)])
    assert run.passed("virtio-blk"), run.output
    assert "ro=1" in run.output and "BLK write refused (read-only)" in run.output
    assert image.read_bytes() == original


def test_guest_direct_io_drive(guest_elf: Path, tmp_path: Path) -> None:
    image = _image(tmp_path / "direct.img")
    run = _run(guest_elf, "virtio-blk", drives=[_drive(image, direct=True)])
    assert run.passed("virtio-blk"), run.output
    last = SECTORS - 1
    assert image.read_bytes()[last * 512:] == _guest_pattern(last)
