"""What every virtio transport shares: the device status machine, feature negotiation, the queues, notifications,
timers, quiescing and the common part of snapshots (virtio 1.2 sections 2 and 3).

:class:`~kvmlet.devices.virtio.mmio.MmioTransport` (section 4.2) and
:class:`~kvmlet.devices.pci.virtio_pci.PciTransport` (section 4.1) decode their own registers and deliver their own
interrupts; everything below is theirs in common, so the two cannot drift apart.

Device status (section 2.1) is a state machine driven by the driver's writes:

* writing 0 resets the device: status, features, queue configuration, interrupt state all cleared;
* the driver can only set bits (a write that would clear one keeps it); DEVICE_NEEDS_RESET is the
  device's own bit and is never taken from the driver;
* FEATURES_OK is accepted only after DRIVER, and only if the driver's features are a subset of what the
  device offered, include VIRTIO_F_VERSION_1, include every feature the transport requires (a device behind
  an IOMMU requires VIRTIO_F_ACCESS_PLATFORM: without it the driver would hand out addresses the device must
  not use untranslated) and suit the device; otherwise it stays clear (section 2.2.2: "it MUST fail to set the
  FEATURES_OK device status bit");
* DRIVER_OK without FEATURES_OK, a queue the driver enabled with a bad configuration, or a broken ring
  make the device set DEVICE_NEEDS_RESET (and send a configuration-change notification once DRIVER_OK
  is set); it then processes nothing until reset;
* FAILED stops the device.

Queue notifications: each queue has an eventfd, registered by the device manager as an ioeventfd on the
transport's notify address, so the guest's write never leaves the kernel; a write that does arrive as an exit
signals the same eventfd. Either way the event-loop thread reads the eventfd and calls
:meth:`VirtioTransport.handle_queue_event`: queues are never processed on a vCPU thread. A notification before
DRIVER_OK is ignored and counted.

Locking: one re-entrant lock serializes register writes (vCPU threads) with queue processing (the event-loop
thread), so a reset waits for the request being processed; interrupt state has its own lock in each transport.

Quiescing and snapshots: while :meth:`VirtioTransport.pause` holds it, no queue is processed: a notification, a
timer or a host event that would run one is remembered and the queue is kicked again at
:meth:`VirtioTransport.resume`.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvmlet.devices.state import (
    DeviceStateError,
    MmioTransportState,
    PciTransportState,
    QueueState,
    VirtioDeviceState,
    expect_state,
)
from kvmlet.devices.virtio.constants import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    InterruptReason,
    feature_bit,
)
from kvmlet.devices.virtio.device import ActivationError, VirtioDevice
from kvmlet.devices.virtio.queue import RingError, Virtqueue
from kvmlet.devices.virtio.ratelimit import rate_limiters_of
from kvmlet.memory import GuestMemoryError

if TYPE_CHECKING:
    from kvmlet.devices.iommu.dma import DeviceMemory

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


QueueFactory = Callable[[object, int, int, object], Virtqueue]   # (memory, index, max size, counters)


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
    dma_faults: int = 0                # DMA the IOMMU refused while a queue was processed (device then reset)
    last_error: str = ""


class VirtioTransport:
    """The transport-independent half of a virtio device's transport (see the module docstring).

    Subclasses decode their registers and implement :meth:`_raise_interrupt` (and, for their own interrupt
    state, :meth:`_clear_registers`, :meth:`_deliver_held_interrupt`)."""

    def __init__(self, device: VirtioDevice, memory: DeviceMemory, scheduler: Scheduler | None = None, *,
                 queue_factory: Callable[..., Virtqueue] = Virtqueue, extra_features: int = 0,
                 required_features: int = 0) -> None:
        self.device = device
        self.memory = memory
        self.scheduler = scheduler
        self.stats = TransportStats()
        self.extra_features = extra_features          # transport features offered besides the device's
        self.required_features = required_features    # features FEATURES_OK needs (ACCESS_PLATFORM behind an IOMMU)
        self.queues = [queue_factory(memory, index, size, self.stats)
                       for index, size in enumerate(device.queue_max_sizes)]
        self.queue_eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        self._lock = threading.RLock()
        self.config_generation = 0
        self._timer_armed = [False] * len(self.queues)  # the queue's one timer is on the event loop
        self._wake_wanted = [False] * len(self.queues)  # and it should run the queue (False: cancelled)
        self._paused = False
        self._held_queues: set[int] = set()   # queues to run at resume (asked for while paused)
        self._held_interrupt = False          # an interrupt to send at resume (a restore while paused)
        self._clear_registers()

    def _clear_registers(self) -> None:
        """The registers at power-on (subclasses clear their own too, under their interrupt lock)."""
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self._unknown_driver_features = False
        self.queue_sel = 0

    # -- state --------------------------------------------------------------------------------------
    @property
    def driver_ok(self) -> bool:
        status = self.status
        return bool(status & _DRIVER_OK) and not status & _STOPPED

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def offered_features(self) -> int:
        """Every feature bit offered: the device's and the transport's."""
        return self.device.device_features() | self.extra_features

    def device_feature_word(self) -> int:
        """The 32 bits of the offered features that ``device_features_sel`` selects."""
        if self.device_features_sel >= MAX_FEATURE_WORDS:
            return 0
        return (self.offered_features() >> (32 * self.device_features_sel)) & _MASK32

    def driver_feature_word(self) -> int:
        """The 32 bits of the driver's features that ``driver_features_sel`` selects."""
        if self.driver_features_sel >= MAX_FEATURE_WORDS:
            return 0
        return (self.driver_features >> (32 * self.driver_features_sel)) & _MASK32

    # -- writes shared by the transports (called with the lock held) --------------------------------
    def _write_driver_features(self, value: int) -> None:
        if self.status & DeviceStatus.FEATURES_OK:
            self.stats.ignored_writes += 1  # features are final after FEATURES_OK
            return
        if self.driver_features_sel >= MAX_FEATURE_WORDS:
            self._unknown_driver_features |= value != 0
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(_MASK32 << shift)) | ((value & _MASK32) << shift)

    def _configurable_queue(self) -> Virtqueue | None:
        """The selected queue if the driver may change its configuration now (counted otherwise)."""
        queue = self._selected_queue()
        if queue is None or queue.ready:
            self.stats.ignored_writes += 1  # no such queue, or changing a live queue
            return None
        return queue

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
        offered = self.offered_features()
        wanted = self.driver_features
        reasons = []
        if not status & DeviceStatus.DRIVER:
            reasons.append("DRIVER is not set")
        if self._unknown_driver_features or wanted & ~offered:
            reasons.append(f"features {wanted & ~offered:#x} were never offered")
        if not wanted & feature_bit(VIRTIO_F_VERSION_1):
            reasons.append("VIRTIO_F_VERSION_1 was not accepted (legacy drivers are not supported)")
        missing = self.required_features & ~wanted
        if missing:
            reasons.append(f"features {missing:#x} are required (VIRTIO_F_ACCESS_PLATFORM: the device is behind "
                           "an IOMMU and must not be driven with untranslated addresses)")
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
            self._raise_interrupt(InterruptReason.CONFIG_CHANGE, None)

    def reset(self) -> None:
        """Device reset (the driver wrote 0 to the status): back to the power-on state."""
        with self._lock:
            self.device.reset()
            for queue in self.queues:
                queue.reset()
            self._clear_registers()
            self._cancel_wakeups()
            for limiter in rate_limiters_of(self.device):
                limiter.reset()  # a reset drive owes nothing (issue 13: hours of debt outlived a reset)
            self.stats.resets += 1

    # -- notifications from the driver --------------------------------------------------------------
    def _notify_from_exit(self, index: int) -> None:
        """A queue notification that exited to user space: hand it to the event loop via the eventfd."""
        self.stats.mmio_notifies += 1
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
            except GuestMemoryError as exc:   # DMA the IOMMU refused after the chain was taken (recorded there)
                self.stats.dma_faults += 1
                self._set_needs_reset(f"DMA fault: {exc}")
            except Exception as exc:  # a device bug must not take the event loop down
                if self.stats.needs_reset < MAX_LOGGED_ERRORS:
                    log.exception("virtio device %s failed processing queue %d", self.device.name, index)
                self._set_needs_reset(f"internal error: {exc!r}")

    # -- DeviceHost: called by the device -----------------------------------------------------------
    def signal_used(self, queue_index: int) -> None:
        self._raise_interrupt(InterruptReason.USED_BUFFER, queue_index)

    @property
    def lock(self) -> threading.RLock:
        """The lock that serializes register writes with queue processing (hold it to change a device's
        back end at run time)."""
        return self._lock

    def signal_config_change(self) -> None:
        """The device changed its configuration space: new generation, and tell the driver."""
        self.config_generation += 1
        self._raise_interrupt(InterruptReason.CONFIG_CHANGE, None)

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

    def _raise_interrupt(self, reason: InterruptReason, queue_index: int | None) -> None:
        """Tell the driver (a used buffer on ``queue_index``, or a configuration change)."""
        raise NotImplementedError

    def _deliver_held_interrupt(self) -> None:
        """Send the interrupt a restore while paused left pending."""
        raise NotImplementedError

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
            self._deliver_held_interrupt()

    # -- snapshots: the part every transport saves ----------------------------------------------------
    def _check_common_state(self, saved: MmioTransportState | PciTransportState) -> None:
        """What both transports check before restoring: the device type, the queues, the device's own state and
        the negotiated features (DeviceStateError; nothing is changed)."""
        name = self.device.name
        device_type, queues, device = saved.device_type, saved.queues, saved.device
        if device_type != int(self.device.device_type):
            raise DeviceStateError(f"{name}: the saved state is of virtio device type {device_type}; this "
                                   f"device is type {int(self.device.device_type)}")
        if len(queues) != len(self.queues):
            raise DeviceStateError(f"{name}: the saved state has {len(queues)} queues; this device has "
                                   f"{len(self.queues)}")
        for queue, saved_queue in zip(self.queues, queues, strict=True):
            saved_queue = expect_state(saved_queue, QueueState, f"{name} queue {queue.index}")
            if saved_queue.ready and saved_queue.size > queue.max_size:
                raise DeviceStateError(f"{name}: queue {queue.index} was {saved_queue.size} entries; this device "
                                       f"allows at most {queue.max_size}")
        self.device.check_state(device)
        missing = saved.driver_features & ~self.offered_features()
        if saved.status & DeviceStatus.FEATURES_OK and missing:   # before FEATURES_OK a driver may write anything
            bits = ", ".join(str(bit) for bit in range(64) if missing >> bit & 1)
            raise DeviceStateError(f"{name}: the driver had accepted feature bits {bits}, which this device does "
                                   "not offer here (a host or back end without them)")

    def _restore_negotiation(self, saved: MmioTransportState | PciTransportState) -> None:
        """The status and feature registers both transports have (call with both locks held)."""
        self.status = saved.status & 0xFF
        self.device_features_sel = saved.device_features_sel
        self.driver_features_sel = saved.driver_features_sel
        self.driver_features = saved.driver_features
        self._unknown_driver_features = saved.unknown_driver_features
        self.queue_sel = saved.queue_sel

    def _restore_queues(self, queues: list[QueueState]) -> None:
        """Reset, then load the saved queues (call with the lock held)."""
        name = self.device.name
        self.reset()
        for queue, saved_queue in zip(self.queues, queues, strict=True):
            try:
                queue.restore_state(saved_queue, name)
            except RingError as exc:
                raise DeviceStateError(f"{name}: {exc}") from None

    def _restore_device(self, device: VirtioDeviceState, interrupt: bool) -> tuple[list[int], bool]:
        """Activate a device the driver had running and give it its state (lock held); returns the live
        queues to kick and whether an interrupt is to be sent (both held if paused: then ([], False))."""
        if self.driver_ok:
            try:
                self.device.activate(self, self.queues, self.driver_features)
            except ActivationError as exc:
                raise DeviceStateError(f"{self.device.name}: cannot start again: {exc}") from None
        self.device.restore_state(device)
        live = [queue.index for queue in self.queues if queue.ready] if self.driver_ok else []
        if self._paused:
            self._held_queues.update(live)
            self._held_interrupt |= interrupt
            return [], False
        return live, interrupt

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._cancel_wakeups()
            self.device.reset()
            self.device.close()
            for fd in self.queue_eventfds:
                os.close(fd)
            self.queue_eventfds = []
