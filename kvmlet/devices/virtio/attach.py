"""Wiring virtio-mmio devices into a VM: MMIO windows, GSIs, ioeventfds, irqfds, kernel command line.

Layout: device *n* (in the order drives, then the entropy device, then whatever else is added) has
its 4 KiB register window at ``0xc0000000 + n * 0x1000`` (the 32-bit MMIO hole, never RAM) and the
interrupt ``VIRTIO_GSIS[n]``: ISA IRQs that nothing else uses (4 is COM1; 0-2 and 8 belong to the timer,
the keyboard, the cascade and the RTC; 12 comes last because a PS/2 mouse driver may want it), so the
8259 PICs, the IOAPIC (identity-mapped ISA IRQs in the MP table and the MADT) and Linux all agree.
Each device is announced on the kernel command line the Linux way (``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``):
``virtio_mmio.device=4K@0xc0000000:5``.

Each queue's eventfd is an ioeventfd on the device's QueueNotify register (datamatch = queue index)
and is read by the event-loop thread; each device's interrupt is an irqfd.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmlet.config import ConfigError
from kvmlet.devices.bus import Bus
from kvmlet.devices.irq import EventFdInterrupt
from kvmlet.devices.virtio.constants import MMIO_WINDOW_SIZE, MmioRegister
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.eventloop import EventLoopThread
from kvmlet.memory import GuestMemory

if TYPE_CHECKING:
    from kvmlet.config import MachineConfig
    from kvmlet.kvm.vm import Vm

VIRTIO_MMIO_BASE = 0xC000_0000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_GSIS = (5, 6, 7, 9, 10, 11, 14, 15, 12)


@dataclass(frozen=True)
class VirtioSlot:
    """Where one device lives: its MMIO window and its interrupt."""

    base: int
    gsi: int

    @property
    def cmdline_arg(self) -> str:
        return f"virtio_mmio.device={MMIO_WINDOW_SIZE // 1024}K@{self.base:#x}:{self.gsi}"


def slot_for(number: int) -> VirtioSlot:
    if not 0 <= number < len(VIRTIO_GSIS):
        raise ConfigError(f"too many virtio devices: at most {len(VIRTIO_GSIS)} (one free ISA IRQ each)")
    return VirtioSlot(VIRTIO_MMIO_BASE + number * VIRTIO_MMIO_STRIDE, VIRTIO_GSIS[number])


class LoopScheduler:
    """Timers on the event-loop thread (safe to arm from any thread)."""

    def __init__(self, events: EventLoopThread) -> None:
        self.events = events

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.events.call_soon(self.events.loop.call_later, delay, callback)


@dataclass
class AttachedDevice:
    slot: VirtioSlot
    transport: MmioTransport

    @property
    def device(self) -> VirtioDevice:
        return self.transport.device

    @property
    def name(self) -> str:
        return self.transport.device.name


class VirtioDevices:
    """The VM's virtio-mmio devices; ``add`` places one, ``close`` takes them all down."""

    def __init__(self, vm: Vm, memory: GuestMemory, mmio: Bus, events: EventLoopThread,
                 interrupt: Callable[[int], EventFdInterrupt]) -> None:
        self.vm = vm
        self.memory = memory
        self.mmio = mmio
        self.events = events
        self.interrupt = interrupt
        self.devices: list[AttachedDevice] = []
        self._ioeventfds: list[tuple[int, int, int]] = []   # (fd, address, queue index)
        self._readers: list[int] = []

    def add(self, device: VirtioDevice) -> AttachedDevice:
        """Place ``device`` in the next slot; on failure the device is closed."""
        try:
            slot = slot_for(len(self.devices))
            transport = MmioTransport(device, self.memory, self.interrupt(slot.gsi), LoopScheduler(self.events))
        except BaseException:
            device.close()
            raise
        attached = AttachedDevice(slot, transport)
        self.devices.append(attached)
        self.mmio.register(slot.base, MMIO_WINDOW_SIZE, transport, device.name)
        notify = slot.base + MmioRegister.QUEUE_NOTIFY
        for index, fd in enumerate(transport.queue_eventfds):
            self.vm.register_ioeventfd(fd, notify, 4, datamatch=index)
            self._ioeventfds.append((fd, notify, index))
            self.events.add_reader(fd, functools.partial(transport.handle_queue_event, index))
            self._readers.append(fd)
        return attached

    def find(self, name: str) -> AttachedDevice | None:
        return next((d for d in self.devices if d.name == name), None)

    def cmdline_args(self) -> list[str]:
        return [d.slot.cmdline_arg for d in self.devices]

    def extend_cmdline(self, cmdline: str) -> str:
        """``cmdline`` with the devices' ``virtio_mmio.device=`` entries (before any ``--``)."""
        args = " ".join(self.cmdline_args())
        if not args:
            return cmdline
        head, sep, tail = f" {cmdline} ".partition(" -- ")
        if not sep:
            return f"{head.strip()} {args}".strip()
        return f"{head.strip()} {args} -- {tail.strip()}".strip()

    def close(self) -> None:
        for fd in self._readers:
            self.events.remove_reader(fd)
        self._readers = []
        for fd, address, index in self._ioeventfds:
            try:
                self.vm.unregister_ioeventfd(fd, address, 4, datamatch=index)
            except OSError:
                pass
        self._ioeventfds = []
        for attached in self.devices:
            self.mmio.unregister(attached.transport)
            attached.transport.close()
        self.devices = []


def attach_virtio_devices(config: MachineConfig, vm: Vm, memory: GuestMemory, mmio: Bus,
                          events: EventLoopThread,
                          interrupt: Callable[[int], EventFdInterrupt]) -> VirtioDevices:
    """Build the drives and the entropy device ``config`` asks for and attach them to the VM."""
    from kvmlet.devices.virtio.blk import VirtioBlock
    from kvmlet.devices.virtio.blk_backend import BlockBackend, BlockBackendError
    from kvmlet.devices.virtio.ratelimit import make_rate_limiter
    from kvmlet.devices.virtio.rng import VirtioRng

    devices = VirtioDevices(vm, memory, mmio, events, interrupt)
    try:
        for number, drive in enumerate(config.drives):
            try:
                backend = BlockBackend.open(str(drive.path), readonly=drive.readonly, direct=drive.direct)
            except BlockBackendError as exc:
                raise ConfigError(str(exc)) from None
            devices.add(VirtioBlock(backend, drive_id=drive.id or f"drive{number}",
                                    name=f"virtio-blk{number}",
                                    rate_limiter=make_rate_limiter(drive.rate_limit)))
        if config.rng is not None:
            devices.add(VirtioRng(rate_limiter=make_rate_limiter(config.rng.rate_limit)))
        if config.nets or config.vsock is not None:
            from kvmlet.devices.virtio.net_attach import attach_network

            attach_network(config, devices)
    except BaseException:
        devices.close()
        raise
    return devices
