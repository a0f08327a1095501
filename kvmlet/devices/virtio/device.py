"""What a virtio device type implements, independent of the transport that carries it.

The transport (``mmio.MmioTransport``) owns the device status, feature negotiation and the queues'
configuration; it calls the device:

* ``device_features()`` / ``accept_features()`` during negotiation;
* ``read_config()`` / ``write_config()`` for the device-specific configuration space (any thread);
* ``activate()`` at DRIVER_OK and ``reset()`` when the driver resets the device;
* ``process_queue(index)`` on the event-loop thread, never on a vCPU thread, with the transport's lock held,
  when the driver notified that queue (or a rate limiter's timer fired);
* ``save_state()``, ``check_state()`` and ``restore_state()`` for snapshots (the transport restores its
  registers and queues and, if the driver had the device running, activates it before ``restore_state``).

A device answers requests through its queues and calls back into its :class:`DeviceHost` to signal the
driver (``signal_used``), to report a configuration change, or to ask for a queue to be run later.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Protocol

from kvmlet.devices.state import VirtioDeviceState
from kvmlet.devices.virtio.constants import COMMON_FEATURES, DeviceType, feature_bit
from kvmlet.devices.virtio.queue import (
    SLICE_CHAINS,
    SLICE_SECONDS,
    DescriptorChain,
    DirectChain,
    RingError,
    Virtqueue,
)
from kvmlet.devices.virtio.ratelimit import RateLimiter
from kvmlet.errors import UnsupportedError


class DeviceHost(Protocol):
    """The transport, as seen by its device."""

    def signal_used(self, queue_index: int) -> None:
        """Send a used-buffer notification (if the driver has not suppressed it)."""
        ...

    def signal_config_change(self) -> None:
        """Send a configuration-change notification."""
        ...

    def schedule_queue(self, queue_index: int, delay: float) -> None:
        """Run ``process_queue(queue_index)`` again after ``delay`` seconds (event-loop thread)."""
        ...

    def process_queue(self, queue_index: int) -> None:
        """Run ``process_queue(queue_index)`` now, under the transport's lock, if the queue is live
        (for devices with host-side event sources, e.g. a TAP or a socket becoming readable)."""
        ...

    def continue_queue(self, queue_index: int) -> bool:
        """Run ``process_queue(queue_index)`` again once the event loop has served the rest of what is
        ready (a drain that used up its slice); False if there is no event loop to come back from."""
        ...


class ActivationError(RuntimeError):
    """The device cannot start with what the driver configured (it then needs a reset)."""


class VirtioDevice(abc.ABC):
    """A virtio device type: its ID, features, configuration space and request handling."""

    device_type: DeviceType

    def __init__(self, queue_max_sizes: Sequence[int], name: str) -> None:
        self.queue_max_sizes = tuple(queue_max_sizes)
        self.name = name
        self.host: DeviceHost | None = None
        self.queues: list[Virtqueue] = []
        self.features = 0
        self.active = False

    # -- negotiation and configuration ------------------------------------------------------------
    def device_features(self) -> int:
        """Every feature bit the device offers."""
        return COMMON_FEATURES | self.specific_features()

    @abc.abstractmethod
    def specific_features(self) -> int:
        """The device-type feature bits offered."""

    def accept_features(self, features: int) -> bool:
        """Whether the device works with this subset of its offered features (dependencies)."""
        return True

    def defer_for_rate_limit(self, queue: Virtqueue, limiter: RateLimiter | None, nbytes: int,
                             *, put_back: bool = True) -> bool:
        """True when ``limiter`` has no tokens for ``nbytes`` now: the popped chain goes back on the ring
        (``put_back``) and the queue is processed again once the tokens are there."""
        if limiter is None:
            return False
        wait = limiter.try_consume(nbytes)
        if wait <= 0:
            return False
        if put_back:
            queue.undo_pop()
        if self.host is not None:
            self.host.schedule_queue(queue.index, wait)
        return True

    def has_feature(self, bit: int) -> bool:
        """Whether feature ``bit`` was negotiated."""
        return bool(self.features & feature_bit(bit))

    def config_space(self) -> bytes:
        """The device-specific configuration space as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:  # noqa: B027 - optional hook
        """A driver write to the configuration space (ignored unless a device has writable fields)."""

    # -- lifecycle ----------------------------------------------------------------------------------
    def activate(self, host: DeviceHost, queues: list[Virtqueue], features: int) -> None:
        """Start serving ``queues`` with the negotiated ``features`` (DRIVER_OK)."""
        self.host = host
        self.queues = queues
        self.features = features
        self.active = True
        self.on_activate()

    def on_activate(self) -> None:  # noqa: B027 - optional hook
        """Device-specific start (raise ActivationError to refuse)."""

    def reset(self) -> None:
        """Forget everything the driver set up (device reset, or the driver gave up)."""
        self.active = False
        self.features = 0
        self.queues = []
        self.on_reset()

    def on_reset(self) -> None:  # noqa: B027 - optional hook
        """Device-specific reset."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release host resources (files) when the VM closes."""

    # -- snapshots ----------------------------------------------------------------------------------
    def save_state(self) -> VirtioDeviceState:
        """The device's own state (the transport saves the registers and queues); called while it is quiet."""
        raise UnsupportedError(f"device {self.name} cannot be saved ({type(self).__name__} has no state model)")

    def check_state(self, state: VirtioDeviceState) -> None:  # noqa: B027 - optional hook
        """Refuse, with DeviceStateError, a saved state that does not fit this device (before anything is
        restored)."""

    def restore_state(self, state: VirtioDeviceState) -> None:
        """Load a saved state (checked by :meth:`check_state`); the transport has restored the queues and, if
        the driver had the device running, activated it with the saved features."""
        raise UnsupportedError(f"device {self.name} cannot be restored ({type(self).__name__} has no state model)")

    # -- requests -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def process_queue(self, index: int) -> None:
        """Handle what the driver made available on queue ``index`` (RingError: device needs reset)."""

    def drain_queue(self, queue: Virtqueue, handle: Callable[[DescriptorChain], bool],
                    direct: Callable[[DirectChain], bool] | None = None) -> None:
        """Give each available chain to ``handle`` until the ring is empty or the slice is over, then
        signal the driver.

        ``handle`` returns False to stop early (it has put the chain back with ``undo_pop`` and arranged
        to be called again, e.g. by a rate limiter's timer).

        ``direct``, if given, is a device's short path for the commonest requests: it is offered each
        chain :meth:`Virtqueue.pop_direct` takes (a few direct descriptors, no parsed chain objects) and
        returns True once it has completed it, or False for one it leaves to ``handle``, which then
        gets the same chain from :meth:`Virtqueue.pop`, with all of its checks.

        While it drains, the driver is asked not to notify (it would only wake the event loop for chains
        this loop takes anyway, and cost the guest an exit per notification).

        Fairness: after ``SLICE_CHAINS`` chains (malformed ones included) or ``SLICE_SECONDS``, whichever
        comes first, the rest of the queue is handed back to the event loop (``host.continue_queue``),
        which serves everything else that is ready before it calls ``process_queue`` again; the driver is
        then allowed to notify again (``enable_notification``: the notification, if it comes, meets the
        continuation on the same eventfd). Without an event loop (``continue_queue`` returns False) the
        drain goes on to the end, as before.
        """
        pop_direct = queue.pop_direct if direct is not None else None
        stats = queue.stats
        clock = monotonic
        limit = stats.chains + SLICE_CHAINS
        deadline = clock() + SLICE_SECONDS
        try:
            queue.disable_notification()
            while True:
                simple = pop_direct() if pop_direct is not None else None
                if simple is not None and direct is not None and not direct(simple):
                    queue.undo_pop()
                    simple = None
                if simple is None:
                    chain = queue.pop()
                    if chain is not None:
                        if not handle(chain):
                            queue.allow_notification()
                            return
                    elif not queue.enable_notification():
                        break      # empty, and the driver will notify for the next chain
                    else:
                        queue.disable_notification()   # chains arrived meanwhile: go on
                if stats.chains >= limit or clock() >= deadline:
                    if not queue.enable_notification():
                        break      # the slice ended with the ring: done
                    host = self.host
                    if host is not None and host.continue_queue(queue.index):
                        stats.slices += 1
                        return     # the rest on the loop's next turn; the driver may notify meanwhile
                    queue.disable_notification()
                    limit = stats.chains + SLICE_CHAINS
                    deadline = clock() + SLICE_SECONDS
        finally:
            self._signal_if_needed(queue)

    def _signal_if_needed(self, queue: Virtqueue) -> None:
        try:
            wanted = queue.needs_notification()
        except RingError:
            wanted = True
        if wanted and self.host is not None:
            self.host.signal_used(queue.index)
