"""The virtio-mmio transport, version 2 (virtio 1.2 section 4.2): modern devices only.

Registers are 32-bit and aligned (other accesses are counted and ignored, reads of them return 0); the
device-specific configuration space at 0x100 is read with 1, 2, 4 or 8-byte accesses.

Device status (section 2.1) is a state machine driven by the driver's writes:

* writing 0 resets the device: status, features, queue configuration, interrupt status all cleared;
* the driver can only set bits (a write that would clear one keeps it); DEVICE_NEEDS_RESET is the
  device's own bit and is never taken from the driver;
* FEATURES_OK is accepted only after DRIVER, and only if the driver's features are a subset of what the
  device offered, include VIRTIO_F_VERSION_1 and suit the device; otherwise it stays clear (section
  2.2.2: "it MUST fail to set the FEATURES_OK device status bit");
* DRIVER_OK without FEATURES_OK, a queue the driver enabled with a bad configuration, or a broken ring
  make the device set DEVICE_NEEDS_RESET (and send a configuration-change notification once DRIVER_OK
  is set); it then processes nothing until reset;
* FAILED stops the device.

Queue notifications: each queue has an eventfd. The VM registers it as an ioeventfd on QueueNotify
(base + 0x50, 4 bytes, datamatch = queue index), so the guest's write never leaves the kernel; a write
that does arrive as an MMIO exit (no ioeventfd yet, or in unit tests) signals the same eventfd. Either
way the event-loop thread reads the eventfd and calls :meth:`MmioTransport.handle_queue_event`: queues
are never processed on a vCPU thread. A notification before DRIVER_OK is ignored and counted.

Interrupts: one line per device (an irqfd on an ISA GSI); InterruptStatus bit 0 for used buffers, bit 1
for configuration changes, cleared by InterruptACK.

Locking: one re-entrant lock serializes register writes (vCPU threads) with queue processing (the
event-loop thread), so a reset waits for the request being processed; interrupt status has its own lock,
and InterruptACK takes only that one, so a vCPU acknowledging an interrupt never waits for a queue drain.
Register reads take no lock (each returns one field's current value).

Quiescing and snapshots: while :meth:`MmioTransport.pause` holds it, no queue is processed: a notification,
a timer or a host event that would run one is remembered and the queue is kicked again at
:meth:`MmioTransport.resume`. :meth:`MmioTransport.save_state` / :meth:`MmioTransport.restore_state` save
and load the registers, the queues and the device's own state (:mod:`kvmlet.devices.state`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvmlet.devices.irq import InterruptLine
from kvmlet.devices.state import DeviceStateError, MmioTransportState, QueueState, expect_state
from kvmlet.devices.virtio.constants import (
    MMIO_MAGIC,
    MMIO_VENDOR_ID,
    MMIO_VERSION,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    InterruptReason,
    MmioRegister,
    feature_bit,
)
from kvmlet.devices.virtio.device import ActivationError, VirtioDevice
from kvmlet.devices.virtio.queue import RingError, Virtqueue
from kvmlet.devices.virtio.ratelimit import rate_limiters_of
from kvmlet.memory import GuestMemory

log = logging.getLogger("kvmlet.virtio")

_MASK32 = 0xFFFFFFFF
MAX_FEATURE_WORDS = 2  # features 0-63: all that kvmlet's devices define
MAX_LOGGED_ERRORS = 8  # per device: a guest must not be able to flood the host's log
# Wake-up timers (a rate-limited or blocked queue run again later): at most one per queue is ever on the
# event loop, whatever the driver does (every notification while throttled used to add one: issue 13).
# No timer is longer than MAX_TIMER_DELAY seconds: a longer wait is served in steps (the device asks
# again each time), so a timer a reset made useless is gone within that time, and a queue reset and
# throttled anew waits at most that long for the timer it must share.
MAX_TIMERS_PER_QUEUE = 1
MAX_TIMER_DELAY = 0.25
# Plain ints for the per-notification checks (IntFlag arithmetic costs microseconds per operation).
_DRIVER_OK = int(DeviceStatus.DRIVER_OK)
_STOPPED = int(DeviceStatus.DEVICE_NEEDS_RESET | DeviceStatus.FAILED)


class Scheduler(Protocol):
    """Runs a callback on the event-loop thread after a delay."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...


@dataclass
class TransportStats:
    """What the transport counted: guest mistakes are counted, never fatal to the VMM."""

    queue_events: int = 0
    mmio_notifies: int = 0
    notifies_before_driver_ok: int = 0
    notifies_while_stopped: int = 0    # after DEVICE_NEEDS_RESET or FAILED
    notifies_invalid_queue: int = 0
    notifies_queue_not_ready: int = 0
    features_refused: int = 0
    bad_accesses: int = 0
    ignored_writes: int = 0
    resets: int = 0
    needs_reset: int = 0
    timers_pending: int = 0            # wake-up timers on the event loop now (at most one per queue)
    timers_coalesced: int = 0          # wake-ups asked for while the queue's timer was armed (limit hit)
    chains_too_long: int = 0           # chains refused: longer than the queue size (indirect included)
    queue_slices: int = 0              # drains that used up their slice and continued on the next loop turn
    last_error: str = ""


class MmioTransport:
    """One virtio device on the MMIO bus (a BusDevice for its 4 KiB window)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq: InterruptLine,
                 scheduler: Scheduler | None = None) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.scheduler = scheduler
        self.stats = TransportStats()
        self.queues = [Virtqueue(memory, index, size, self.stats)
                       for index, size in enumerate(device.queue_max_sizes)]
        self.queue_eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        self._lock = threading.RLock()
        self._irq_lock = threading.Lock()
        self.config_generation = 0
        self._timer_armed = [False] * len(self.queues)  # the queue's one timer is on the event loop
        self._wake_wanted = [False] * len(self.queues)  # and it should run the queue (False: cancelled)
        self._paused = False
        self._held_queues: set[int] = set()   # queues to run at resume (asked for while paused)
        self._held_interrupt = False          # an interrupt to send at resume (a restore while paused)
        self._clear_registers()

    def _clear_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self._unknown_driver_features = False
        self.queue_sel = 0
        self.shm_sel = 0
        self.interrupt_status = 0

    # -- state --------------------------------------------------------------------------------------
    @property
    def driver_ok(self) -> bool:
        status = self.status
        return bool(status & _DRIVER_OK) and not status & _STOPPED

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

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
            if self.device_features_sel >= MAX_FEATURE_WORDS:
                return 0
            return (self.device.device_features() >> (32 * self.device_features_sel)) & _MASK32
        if reg == MmioRegister.QUEUE_NUM_MAX:
            queue = self._selected_queue()
            return queue.max_size if queue is not None else 0
        if reg == MmioRegister.QUEUE_READY:
            queue = self._selected_queue()
            return int(queue.ready) if queue is not None else 0
        if reg == MmioRegister.INTERRUPT_STATUS:
            return self.interrupt_status
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
            self._notify_from_mmio(value)
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
        elif reg in (MmioRegister.QUEUE_NUM, MmioRegister.QUEUE_DESC_LOW, MmioRegister.QUEUE_DESC_HIGH,
                     MmioRegister.QUEUE_DRIVER_LOW, MmioRegister.QUEUE_DRIVER_HIGH,
                     MmioRegister.QUEUE_DEVICE_LOW, MmioRegister.QUEUE_DEVICE_HIGH):
            self._write_queue_config(reg, value)
        elif reg == MmioRegister.STATUS:
            self._write_status(value)
        elif reg == MmioRegister.SHM_SEL:
            self.shm_sel = value
        elif reg == MmioRegister.QUEUE_RESET:
            self.stats.ignored_writes += 1  # VIRTIO_F_RING_RESET is not offered
        else:
            self.stats.bad_accesses += 1  # read-only or undefined register

    def _write_driver_features(self, value: int) -> None:
        if self.status & DeviceStatus.FEATURES_OK:
            self.stats.ignored_writes += 1  # features are final after FEATURES_OK
            return
        if self.driver_features_sel >= MAX_FEATURE_WORDS:
            self._unknown_driver_features |= value != 0
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(_MASK32 << shift)) | (value << shift)

    def _write_queue_config(self, reg: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None or queue.ready:
            self.stats.ignored_writes += 1  # no such queue, or changing a live queue
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

    def _write_queue_ready(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            self.stats.ignored_writes += 1
            return
        if not value & 1:
            if queue.ready and self.status & DeviceStatus.DRIVER_OK:
                # a running device owns the chains it took from this queue: without VIRTIO_F_RING_RESET a
                # queue stops only with a device reset, so the write is ignored (and counted) rather than
                # letting those chains complete into a ring the driver may have taken back
                self.stats.ignored_writes += 1
                return
            queue.ready = False
            return
        if queue.ready:
            return
        self._apply_queue_features(queue)
        try:
            queue.activate()
        except RingError as exc:
            self._set_needs_reset(str(exc))
            return
        queue.ready = True
        if self.driver_ok:
            self._kick(queue.index)

    def _apply_queue_features(self, queue: Virtqueue) -> None:
        negotiated = self.driver_features if self.status & DeviceStatus.FEATURES_OK else 0
        queue.set_features(event_idx=bool(negotiated & feature_bit(VIRTIO_F_EVENT_IDX)),
                           indirect=bool(negotiated & feature_bit(VIRTIO_F_INDIRECT_DESC)))

    # -- device status ------------------------------------------------------------------------------
    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        requested = value & 0xFF & ~DeviceStatus.DEVICE_NEEDS_RESET
        new = old | requested
        added = new & ~old
        if added & DeviceStatus.FEATURES_OK and not self._features_acceptable(old):
            new &= ~DeviceStatus.FEATURES_OK
            self.stats.features_refused += 1
        self.status = int(new)
        if added & DeviceStatus.FAILED:
            self.device.reset()  # the driver gave up: stop serving the queues
        elif added & DeviceStatus.DRIVER_OK:
            self._start_device()

    def _features_acceptable(self, status: int) -> bool:
        offered = self.device.device_features()
        wanted = self.driver_features
        reasons = []
        if not status & DeviceStatus.DRIVER:
            reasons.append("DRIVER is not set")
        if self._unknown_driver_features or wanted & ~offered:
            reasons.append(f"features {wanted & ~offered:#x} were never offered")
        if not wanted & feature_bit(VIRTIO_F_VERSION_1):
            reasons.append("VIRTIO_F_VERSION_1 was not accepted (legacy drivers are not supported)")
        if not reasons and not self.device.accept_features(wanted):
            reasons.append("the device cannot work with this feature combination")
        if reasons:
            self.stats.last_error = f"{self.device.name}: FEATURES_OK refused: {'; '.join(reasons)}"
            log.info("%s", self.stats.last_error)
        return not reasons

    def _start_device(self) -> None:
        if self.status & DeviceStatus.DEVICE_NEEDS_RESET:
            return  # an earlier error stands until the driver resets the device
        if self.status & DeviceStatus.FAILED:
            return  # the driver gave up: DRIVER_OK after FAILED starts nothing until a reset
        if not self.status & DeviceStatus.FEATURES_OK:
            self._set_needs_reset("DRIVER_OK without FEATURES_OK")
            return
        try:
            for queue in self.queues:
                self._apply_queue_features(queue)
                if queue.ready:
                    queue.validate()
            self.device.activate(self, self.queues, self.driver_features)
        except (RingError, ActivationError) as exc:
            self._set_needs_reset(str(exc))
            return
        for queue in self.queues:
            if queue.ready:
                self._kick(queue.index)  # buffers made available before DRIVER_OK

    def _set_needs_reset(self, reason: str) -> None:
        self.stats.needs_reset += 1
        self.stats.last_error = f"{self.device.name}: {reason}"
        if self.stats.needs_reset <= MAX_LOGGED_ERRORS:
            log.warning("virtio device %s needs a reset: %s", self.device.name, reason)
        already = self.status & DeviceStatus.DEVICE_NEEDS_RESET
        self.status = int(self.status | DeviceStatus.DEVICE_NEEDS_RESET)
        if self.device.active:
            self.device.reset()
        if not already and self.status & DeviceStatus.DRIVER_OK:
            self._raise_interrupt(InterruptReason.CONFIG_CHANGE)

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to Status): back to the power-on state."""
        with self._lock:
            self.device.reset()
            for queue in self.queues:
                queue.reset()
            with self._irq_lock:
                self._clear_registers()
            self._cancel_wakeups()
            for limiter in rate_limiters_of(self.device):
                limiter.reset()  # a reset drive owes nothing (issue 13: hours of debt outlived a reset)
            self.stats.resets += 1

    # -- notifications from the driver --------------------------------------------------------------
    def _notify_from_mmio(self, value: int) -> None:
        """A QueueNotify write that exited to user space: hand it to the event loop via the eventfd."""
        self.stats.mmio_notifies += 1
        index = value & 0xFFFF
        if index >= len(self.queues):
            self.stats.notifies_invalid_queue += 1
            return
        self._kick(index)

    def _kick(self, index: int) -> None:
        if index >= len(self.queue_eventfds):
            return  # closed
        try:
            os.eventfd_write(self.queue_eventfds[index], 1)
        except (BlockingIOError, OSError):
            pass  # counter saturated (an event is pending anyway) or closed

    def handle_queue_event(self, index: int) -> None:
        """The queue's eventfd is readable (event-loop thread): consume it and process the queue."""
        if index >= len(self.queue_eventfds):
            return  # closed
        try:
            os.eventfd_read(self.queue_eventfds[index])
        except (BlockingIOError, OSError):
            return
        self.stats.queue_events += 1
        self.process_queue(index)

    def poll(self) -> int:
        """Handle every pending queue event now (for callers without an event loop, e.g. tests)."""
        handled = 0
        for index, fd in enumerate(self.queue_eventfds):
            try:
                os.eventfd_read(fd)
            except (BlockingIOError, OSError):
                continue
            self.stats.queue_events += 1
            self.process_queue(index)
            handled += 1
        return handled

    def process_queue(self, index: int) -> None:
        """Run the device on queue ``index`` if the driver has it live (at resume, while paused)."""
        with self._lock:
            if self._paused:
                self._held_queues.add(index)
                return
            if not self.status & _DRIVER_OK:
                self.stats.notifies_before_driver_ok += 1
                return
            if not self.driver_ok:
                self.stats.notifies_while_stopped += 1
                return
            queue = self.queues[index]
            if not queue.ready or not self.device.active:
                self.stats.notifies_queue_not_ready += 1
                return
            try:
                self.device.process_queue(index)
            except RingError as exc:
                self._set_needs_reset(str(exc))
            except Exception as exc:  # a device bug must not take the event loop down
                if self.stats.needs_reset < MAX_LOGGED_ERRORS:
                    log.exception("virtio device %s failed processing queue %d", self.device.name, index)
                self._set_needs_reset(f"internal error: {exc!r}")

    # -- DeviceHost: called by the device -----------------------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        self._raise_interrupt(InterruptReason.USED_BUFFER)

    @property
    def lock(self) -> threading.RLock:
        """The lock that serializes register writes with queue processing (hold it to change a device's
        back end at run time)."""
        return self._lock

    def signal_config_change(self) -> None:
        """The device changed its configuration space: new generation, and tell the driver."""
        self.config_generation += 1
        self._raise_interrupt(InterruptReason.CONFIG_CHANGE)

    def schedule_queue(self, queue_index: int, delay: float) -> None:
        """Run the queue again after ``delay`` seconds, or sooner: the queue's one timer, armed for at most
        MAX_TIMER_DELAY; a wake-up asked for while it is armed rides on it (counted, no new timer)."""
        if self.scheduler is None or queue_index >= len(self._timer_armed):
            return
        with self._lock:
            self._wake_wanted[queue_index] = True
            if self._timer_armed[queue_index]:
                self.stats.timers_coalesced += 1
                return
            self._timer_armed[queue_index] = True
            self.stats.timers_pending += 1
        self.scheduler.call_later(min(max(delay, 0.0), MAX_TIMER_DELAY),
                                  functools.partial(self._timer_fired, queue_index))

    def continue_queue(self, queue_index: int) -> bool:
        """A drain used up its slice: run the queue again on the event loop's next turn, after what else is
        ready now. Through the queue's own eventfd, as a notification, so a notification from the driver
        meanwhile meets it there (one drain, not two) and nothing is allocated per continuation. False
        without a scheduler (no event loop, e.g. tests/fuzz/fuzz_virtqueue.py): the caller goes on draining."""
        if self.scheduler is None or queue_index >= len(self.queue_eventfds):
            return False
        self.stats.queue_slices += 1
        self._kick(queue_index)
        return True

    def _timer_fired(self, queue_index: int) -> None:
        """The queue's timer (event-loop thread): run the queue unless a reset or close cancelled it. A
        device still waiting asks again, which arms the next timer."""
        with self._lock:
            self._timer_armed[queue_index] = False
            self.stats.timers_pending -= 1
            if not self._wake_wanted[queue_index]:
                return
            self._wake_wanted[queue_index] = False
        self.process_queue(queue_index)

    def _cancel_wakeups(self) -> None:
        """No queue is to be run by its timer (a timer still on the loop fires and does nothing)."""
        self._wake_wanted = [False] * len(self._wake_wanted)

    def _raise_interrupt(self, reason: InterruptReason) -> None:
        with self._irq_lock:
            self.interrupt_status |= int(reason)
        self.irq.trigger()

    # -- quiescing -----------------------------------------------------------------------------------
    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Process no queue until :meth:`resume` (waits for the one being processed, if any)."""
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        """Process again, first the queues asked for while paused (through their eventfds)."""
        with self._lock:
            self._paused = False
            held, self._held_queues = sorted(self._held_queues), set()
            interrupt, self._held_interrupt = self._held_interrupt, False
        for index in held:
            self._kick(index)
        if interrupt:
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
        name = self.device.name
        saved = expect_state(state, MmioTransportState, name)
        if saved.device_type != int(self.device.device_type):
            raise DeviceStateError(f"{name}: the saved state is of virtio device type {saved.device_type}; this "
                                   f"device is type {int(self.device.device_type)}")
        if len(saved.queues) != len(self.queues):
            raise DeviceStateError(f"{name}: the saved state has {len(saved.queues)} queues; this device has "
                                   f"{len(self.queues)}")
        for queue, saved_queue in zip(self.queues, saved.queues, strict=True):
            saved_queue = expect_state(saved_queue, QueueState, f"{name} queue {queue.index}")
            if saved_queue.ready and saved_queue.size > queue.max_size:
                raise DeviceStateError(f"{name}: queue {queue.index} was {saved_queue.size} entries; this device "
                                       f"allows at most {queue.max_size}")
        self.device.check_state(saved.device)
        return saved

    def restore_state(self, state: object) -> None:
        """Load a saved state into this freshly built transport, over guest memory that holds the saved
        contents: registers and queues first; a device the driver had running is activated with the saved
        features and then given its own state; live queues are kicked (at :meth:`resume`, while paused)."""
        saved = self.check_state(state)
        name = self.device.name
        with self._lock:
            self.reset()
            for queue, saved_queue in zip(self.queues, saved.queues, strict=True):
                try:
                    queue.restore_state(saved_queue, name)
                except RingError as exc:
                    raise DeviceStateError(f"{name}: {exc}") from None
            with self._irq_lock:
                self.status = saved.status & 0xFF
                self.device_features_sel = saved.device_features_sel
                self.driver_features_sel = saved.driver_features_sel
                self.driver_features = saved.driver_features
                self._unknown_driver_features = saved.unknown_driver_features
                self.queue_sel = saved.queue_sel
                self.shm_sel = saved.shm_sel
                self.interrupt_status = saved.interrupt_status & int(InterruptReason.USED_BUFFER
                                                                     | InterruptReason.CONFIG_CHANGE)
            self.config_generation = saved.config_generation
            if self.driver_ok:
                try:
                    self.device.activate(self, self.queues, self.driver_features)
                except ActivationError as exc:
                    raise DeviceStateError(f"{name}: cannot start again: {exc}") from None
            self.device.restore_state(saved.device)
            live = [queue.index for queue in self.queues if queue.ready] if self.driver_ok else []
            interrupt = bool(self.interrupt_status)
            if self._paused:
                self._held_queues.update(live)
                self._held_interrupt |= interrupt
                return
        for index in live:
            self._kick(index)    # chains made available before the snapshot, rate-limited or held work
        if interrupt:
            self.irq.trigger()   # the driver had not acknowledged it (a spurious one costs a register read)

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._cancel_wakeups()
            self.device.reset()
            self.device.close()
            for fd in self.queue_eventfds:
                os.close(fd)
            self.queue_eventfds = []
