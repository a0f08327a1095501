"""The virtio-mmio transport, version 2 (virtio 1.2 section 4.2): modern devices only.

Registers are 32-bit and aligned (other accesses are counted and ignored, reads of them return 0); the
device-specific configuration space at 0x100 is read with 1, 2, 4 or 8-byte accesses.

The device status machine, feature negotiation, queues, notifications, timers, quiescing and the common part
of snapshots are :class:`~kvmlet.devices.virtio.transport.VirtioTransport`'s, shared with virtio-pci
(:mod:`kvmlet.devices.pci.virtio_pci`); this module decodes the MMIO registers and delivers the interrupt.

Queue notifications: the VM registers each queue's eventfd as an ioeventfd on QueueNotify (base + 0x50,
4 bytes, datamatch = queue index), so the guest's write never leaves the kernel; a write that does arrive as an
MMIO exit signals the same eventfd. A notification before DRIVER_OK is ignored and counted.

Interrupts: one line per device (an irqfd on an ISA GSI); InterruptStatus bit 0 for used buffers, bit 1
for configuration changes, cleared by InterruptACK. Interrupt status has its own lock, and InterruptACK takes
only that one, so a vCPU acknowledging an interrupt never waits for a queue drain. Register reads take no lock
(each returns one field's current value).

Snapshots: :meth:`MmioTransport.save_state` / :meth:`MmioTransport.restore_state` save and load the registers,
the queues and the device's own state (:mod:`kvmlet.devices.state`).
"""

from __future__ import annotations

import threading

from kvmlet.devices.irq import InterruptLine
from kvmlet.devices.state import MmioTransportState, expect_state
from kvmlet.devices.virtio.constants import (
    MMIO_MAGIC,
    MMIO_VENDOR_ID,
    MMIO_VERSION,
    InterruptReason,
    MmioRegister,
)
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.transport import (
    MAX_FEATURE_WORDS,
    MAX_LOGGED_ERRORS,
    MAX_TIMER_DELAY,
    MAX_TIMERS_PER_QUEUE,
    Scheduler,
    TransportStats,
    VirtioTransport,
)
from kvmlet.memory import GuestMemory

__all__ = [
    "MAX_FEATURE_WORDS",
    "MAX_LOGGED_ERRORS",
    "MAX_TIMERS_PER_QUEUE",
    "MAX_TIMER_DELAY",
    "MmioTransport",
    "Scheduler",
    "TransportStats",
]

_MASK32 = 0xFFFFFFFF
_QUEUE_CONFIG = frozenset((MmioRegister.QUEUE_NUM, MmioRegister.QUEUE_DESC_LOW, MmioRegister.QUEUE_DESC_HIGH,
                           MmioRegister.QUEUE_DRIVER_LOW, MmioRegister.QUEUE_DRIVER_HIGH,
                           MmioRegister.QUEUE_DEVICE_LOW, MmioRegister.QUEUE_DEVICE_HIGH))


class MmioTransport(VirtioTransport):
    """One virtio device on the MMIO bus (a BusDevice for its 4 KiB window)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq: InterruptLine,
                 scheduler: Scheduler | None = None) -> None:
        self.irq = irq
        self._irq_lock = threading.Lock()
        super().__init__(device, memory, scheduler)

    def _clear_registers(self) -> None:
        super()._clear_registers()
        with self._irq_lock:
            self.shm_sel = 0
            self.interrupt_status = 0

    # -- register reads -----------------------------------------------------------------------------
    def bus_read(self, offset: int, size: int) -> int:
        if offset >= MmioRegister.CONFIG:
            return self._read_config(offset - MmioRegister.CONFIG, size)
        if size != 4 or offset % 4:
            self.stats.bad_accesses += 1
            return 0
        reg = offset
        if reg == MmioRegister.MAGIC_VALUE:
            return MMIO_MAGIC
        if reg == MmioRegister.VERSION:
            return MMIO_VERSION
        if reg == MmioRegister.DEVICE_ID:
            return int(self.device.device_type)
        if reg == MmioRegister.VENDOR_ID:
            return MMIO_VENDOR_ID
        if reg == MmioRegister.DEVICE_FEATURES:
            return self.device_feature_word()
        if reg == MmioRegister.QUEUE_NUM_MAX:
            queue = self._selected_queue()
            return queue.max_size if queue is not None else 0
        if reg == MmioRegister.QUEUE_READY:
            queue = self._selected_queue()
            return int(queue.ready) if queue is not None else 0
        if reg == MmioRegister.INTERRUPT_STATUS:
            # a vhost-user back end interrupts through the irqfd directly and cannot set this register: such a
            # device reports "used buffer" here while it runs (vhost_user_net.py)
            return self.interrupt_status | getattr(self.device, "external_interrupt_status", 0)
        if reg == MmioRegister.STATUS:
            return self.status
        if reg == MmioRegister.CONFIG_GENERATION:
            return self.config_generation & _MASK32
        if reg in (MmioRegister.SHM_LEN_LOW, MmioRegister.SHM_LEN_HIGH, MmioRegister.SHM_BASE_LOW,
                   MmioRegister.SHM_BASE_HIGH):
            return _MASK32  # no shared memory regions: length and base read as -1
        if reg == MmioRegister.QUEUE_RESET:
            return 0
        self.stats.bad_accesses += 1  # write-only or undefined register
        return 0

    def _read_config(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8):
            self.stats.bad_accesses += 1
            return 0
        data = self.device.config_space()[offset:offset + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    # -- register writes ----------------------------------------------------------------------------
    def bus_write(self, offset: int, size: int, value: int) -> None:
        if offset >= MmioRegister.CONFIG:
            if size in (1, 2, 4, 8):
                with self._lock:
                    self.device.write_config(offset - MmioRegister.CONFIG, value.to_bytes(size, "little"))
            else:
                self.stats.bad_accesses += 1
            return
        if size != 4 or offset % 4:
            self.stats.bad_accesses += 1
            return
        value &= _MASK32
        if offset == MmioRegister.QUEUE_NOTIFY:
            self._notify_from_exit(value & 0xFFFF)
            return
        if offset == MmioRegister.INTERRUPT_ACK:
            # Only the interrupt status lock: a vCPU in its interrupt handler never waits for a queue
            # the event-loop thread is processing.
            with self._irq_lock:
                self.interrupt_status &= ~value
            return
        with self._lock:
            self._write_register(offset, value)

    def _write_register(self, reg: int, value: int) -> None:
        if reg == MmioRegister.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif reg == MmioRegister.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif reg == MmioRegister.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif reg == MmioRegister.QUEUE_SEL:
            self.queue_sel = value
        elif reg == MmioRegister.QUEUE_READY:
            self._write_queue_ready(value)
        elif reg in _QUEUE_CONFIG:
            self._write_queue_config(reg, value)
        elif reg == MmioRegister.STATUS:
            self._write_status(value)
        elif reg == MmioRegister.SHM_SEL:
            self.shm_sel = value
        elif reg == MmioRegister.QUEUE_RESET:
            self.stats.ignored_writes += 1  # VIRTIO_F_RING_RESET is not offered
        else:
            self.stats.bad_accesses += 1  # read-only or undefined register

    def _write_queue_config(self, reg: int, value: int) -> None:
        queue = self._configurable_queue()
        if queue is None:
            return
        if reg == MmioRegister.QUEUE_NUM:
            queue.size = value
        elif reg == MmioRegister.QUEUE_DESC_LOW:
            queue.desc_addr = (queue.desc_addr & ~_MASK32) | value
        elif reg == MmioRegister.QUEUE_DESC_HIGH:
            queue.desc_addr = (queue.desc_addr & _MASK32) | (value << 32)
        elif reg == MmioRegister.QUEUE_DRIVER_LOW:
            queue.driver_addr = (queue.driver_addr & ~_MASK32) | value
        elif reg == MmioRegister.QUEUE_DRIVER_HIGH:
            queue.driver_addr = (queue.driver_addr & _MASK32) | (value << 32)
        elif reg == MmioRegister.QUEUE_DEVICE_LOW:
            queue.device_addr = (queue.device_addr & ~_MASK32) | value
        elif reg == MmioRegister.QUEUE_DEVICE_HIGH:
            queue.device_addr = (queue.device_addr & _MASK32) | (value << 32)

    # -- interrupts -----------------------------------------------------------------------------------
    def _raise_interrupt(self, reason: InterruptReason, queue_index: int | None) -> None:
        with self._irq_lock:
            self.interrupt_status |= int(reason)
        self.irq.trigger()

    def _deliver_held_interrupt(self) -> None:
        self.irq.trigger()

    # -- snapshots ----------------------------------------------------------------------------------
    def save_state(self) -> MmioTransportState:
        """The registers, the queues and the device's state (call it while paused, for a state that holds)."""
        with self._lock:
            return MmioTransportState(
                device_type=int(self.device.device_type), status=self.status,
                device_features_sel=self.device_features_sel, driver_features_sel=self.driver_features_sel,
                driver_features=self.driver_features, unknown_driver_features=self._unknown_driver_features,
                queue_sel=self.queue_sel, shm_sel=self.shm_sel, interrupt_status=self.interrupt_status,
                config_generation=self.config_generation, queues=[queue.save_state() for queue in self.queues],
                device=self.device.save_state())

    def check_state(self, state: object) -> MmioTransportState:
        """``state`` if it fits this transport and device, else DeviceStateError (nothing is changed)."""
        saved = expect_state(state, MmioTransportState, self.device.name)
        self._check_common_state(saved)
        return saved

    def restore_state(self, state: object) -> None:
        """Load a saved state into this freshly built transport, over guest memory that holds the saved
        contents: registers and queues first; a device the driver had running is activated with the saved
        features and then given its own state; live queues are kicked (at :meth:`resume`, while paused)."""
        saved = self.check_state(state)
        with self._lock:
            self._restore_queues(saved.queues)
            with self._irq_lock:
                self._restore_negotiation(saved)
                self.shm_sel = saved.shm_sel
                self.interrupt_status = saved.interrupt_status & int(InterruptReason.USED_BUFFER
                                                                     | InterruptReason.CONFIG_CHANGE)
            self.config_generation = saved.config_generation
            live, interrupt = self._restore_device(saved.device, bool(self.interrupt_status))
        for index in live:
            self._kick(index)    # chains made available before the snapshot, rate-limited or held work
        if interrupt:
            self.irq.trigger()   # the driver had not acknowledged it (a spurious one costs a register read)
