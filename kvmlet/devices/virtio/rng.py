"""virtio-rng, the entropy device (virtio 1.2 section 5.4): one request queue, filled from getrandom(2).

Each request is a chain of device-writable buffers; the device fills up to ``MAX_REQUEST_BYTES`` of it
(the specification lets it use less than the whole buffer) and reports how many bytes it wrote. A chain
with device-readable buffers breaks the driver requirement of section 5.4.6.1 and fails: it is given
back with length 0, as is a chain with no writable space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kvmlet.devices.state import RngState, VirtioDeviceState, expect_state
from kvmlet.devices.virtio.constants import DeviceType
from kvmlet.devices.virtio.device import VirtioDevice
from kvmlet.devices.virtio.queue import DescriptorChain
from kvmlet.devices.virtio.ratelimit import (
    RateLimiter,
    check_rate_limiter,
    restore_rate_limiter,
    save_rate_limiter,
)

QUEUE_SIZE = 256
MAX_REQUEST_BYTES = 64 * 1024


@dataclass
class EntropyStats:
    requests: int = 0
    bytes: int = 0
    refused: int = 0
    throttled: int = 0


class VirtioRng(VirtioDevice):
    """The entropy device."""

    device_type = DeviceType.ENTROPY

    def __init__(self, *, name: str = "virtio-rng", rate_limiter: RateLimiter | None = None) -> None:
        super().__init__([QUEUE_SIZE], name)
        self.rate_limiter = rate_limiter
        self.stats = EntropyStats()

    def specific_features(self) -> int:
        return 0

    def process_queue(self, index: int) -> None:
        self.drain_queue(self.queues[index], self._handle)

    def _handle(self, chain: DescriptorChain) -> bool:
        queue = self.queues[0]
        if chain.readable.length or not chain.writable.length:
            self.stats.refused += 1
            queue.push(chain.head, 0)
            return True
        count = min(chain.writable.length, MAX_REQUEST_BYTES)
        if self.defer_for_rate_limit(queue, self.rate_limiter, count):
            self.stats.throttled += 1
            return False
        written = chain.writable.write(os.getrandom(count))
        self.stats.requests += 1
        self.stats.bytes += written
        queue.complete(chain, written)
        return True

    # -- snapshots ----------------------------------------------------------------------------------
    def save_state(self) -> RngState:
        stats = self.stats
        return RngState(requests=stats.requests, bytes=stats.bytes, refused=stats.refused,
                        throttled=stats.throttled, rate_limiter=save_rate_limiter(self.rate_limiter))

    def check_state(self, state: VirtioDeviceState) -> None:
        saved = expect_state(state, RngState, self.name)
        check_rate_limiter(self.rate_limiter, saved.rate_limiter, self.name)

    def restore_state(self, state: VirtioDeviceState) -> None:
        self.check_state(state)
        assert isinstance(state, RngState)
        self.stats = EntropyStats(state.requests, state.bytes, state.refused, state.throttled)
        restore_rate_limiter(self.rate_limiter, state.rate_limiter, self.name)
