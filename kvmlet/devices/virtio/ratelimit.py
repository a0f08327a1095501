"""Token-bucket rate limiting of device I/O, in the manner of Firecracker's RateLimiter.

A :class:`TokenBucket` holds up to ``size`` tokens and refills from empty to full in ``refill_time`` ms;
``one_time_burst`` extra tokens are available once, at the start, and are used before the bucket's own.
A :class:`RateLimiter` has up to two buckets: bandwidth (tokens are bytes) and operations (one token per
request). A request is admitted only when both buckets allow it, and then consumes from both; a request
larger than a bucket's whole size is admitted when that bucket is full, leaving it in debt, so big
requests are slowed down in proportion instead of being refused.

When a request is not admitted, ``try_consume`` returns how long to wait; the device puts the request
back on its queue and asks its transport to run the queue again after that delay (a timer on the event
loop), so a throttled queue resumes by itself without a new notification from the driver. The transport
keeps at most one such timer per queue, however often the driver notifies while the queue waits.

A guest must not be able to turn the limiter against its own device (issue 13), hence three rules:

* charge what is served: a device validates a request before it asks the limiter, so a request it
  refuses costs no token, and it gives back (:meth:`RateLimiter.refund`) what it charged for a request
  the host then failed to carry out;
* a device reset forgives the debt (:meth:`RateLimiter.reset`): a reset drive answers its next request
  after at most one bucket's refill time, never after the hours a huge request could have cost. A reset
  grants no tokens (the budget is not refilled, a spent one-time burst stays spent), so resetting
  cannot buy bandwidth with small requests; what it can buy is the debt of one oversized request per
  refill (for virtio-blk at most ``seg_max`` x ``size_max`` bytes), the price of not holding a reset
  drive hostage;
* every wait is computed from the buckets, never accumulated per notification.

Snapshots: a bucket saves the tokens it has left, what is left of its one-time burst, and how long ago it last
refilled (a duration: the restoring process has another monotonic clock), so a restored limiter neither
forgets its debt nor gains the time the VM spent saved.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices.state import DeviceStateError, RateLimiterState, TokenBucketState, expect_state

MIN_WAIT = 0.001  # seconds: the shortest timer a throttled queue sets


Clock = Callable[[], float]


class TokenBucket:
    """One bucket; ``clock`` (seconds, monotonic) is injectable for tests."""

    def __init__(self, config: TokenBucketConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.capacity = float(config.size)
        self.rate = config.size / (config.refill_time / 1000.0)  # tokens per second
        self.budget = self.capacity
        self.burst = float(config.one_time_burst)
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self.budget = min(self.capacity, self.budget + elapsed * self.rate)

    def wait_time(self, tokens: int) -> float:
        """0 if ``tokens`` can be consumed now, else the seconds until they can."""
        self._refill()
        need = max(0.0, tokens - self.burst)
        if need == 0:
            return 0.0
        threshold = min(need, self.capacity)
        if self.budget >= threshold:
            return 0.0
        return (threshold - self.budget) / self.rate

    def consume(self, tokens: int) -> None:
        """Take ``tokens`` (burst first); call after wait_time returned 0."""
        from_burst = min(self.burst, float(tokens))
        self.burst -= from_burst
        self.budget -= tokens - from_burst

    def refund(self, tokens: int) -> None:
        """Give back ``tokens`` consumed for work that was not done (up to a full bucket)."""
        self.budget = min(self.capacity, self.budget + tokens)

    def reset(self) -> None:
        """Forget the debt (the device was reset); grant nothing: a non-negative budget is kept as it is."""
        self._refill()
        self.budget = max(self.budget, 0.0)

    def save_state(self) -> TokenBucketState:
        return TokenBucketState(budget=self.budget, one_time_burst=self.burst,
                                since_refill=max(0.0, self._clock() - self._last))

    def restore_state(self, state: TokenBucketState, what: str) -> None:
        """Take the saved tokens (at most this bucket's size and burst, if its configuration changed)."""
        state = expect_state(state, TokenBucketState, what)
        self.budget = min(self.capacity, state.budget)
        self.burst = min(float(self.config.one_time_burst), max(0.0, state.one_time_burst))
        self._last = self._clock() - max(0.0, state.since_refill)


class RateLimiter:
    """Bandwidth and operations buckets; either may be absent (no limit)."""

    def __init__(self, config: RateLimiterConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.bandwidth = TokenBucket(config.bandwidth, clock) if config.bandwidth else None
        self.ops = TokenBucket(config.ops, clock) if config.ops else None
        self.throttled = 0

    def try_consume(self, nbytes: int, ops: int = 1) -> float:
        """Admit a request of ``nbytes`` bytes and ``ops`` operations (0.0), or say how long to wait."""
        wait = 0.0
        if self.bandwidth is not None:
            wait = max(wait, self.bandwidth.wait_time(nbytes))
        if self.ops is not None:
            wait = max(wait, self.ops.wait_time(ops))
        if wait > 0:
            self.throttled += 1
            return max(wait, MIN_WAIT)
        if self.bandwidth is not None:
            self.bandwidth.consume(nbytes)
        if self.ops is not None:
            self.ops.consume(ops)
        return 0.0

    def refund(self, nbytes: int, ops: int = 1) -> None:
        """Give back what :meth:`try_consume` took for a request that was then not served."""
        if self.bandwidth is not None:
            self.bandwidth.refund(nbytes)
        if self.ops is not None:
            self.ops.refund(ops)

    def reset(self) -> None:
        """The device was reset: its debt is forgiven (see the module's documentation)."""
        for bucket in (self.bandwidth, self.ops):
            if bucket is not None:
                bucket.reset()

    def save_state(self) -> RateLimiterState:
        return RateLimiterState(bandwidth=self.bandwidth.save_state() if self.bandwidth is not None else None,
                                ops=self.ops.save_state() if self.ops is not None else None,
                                throttled=self.throttled)

    def check_state(self, state: RateLimiterState, what: str) -> None:
        """DeviceStateError unless ``state`` has the same buckets as this limiter."""
        state = expect_state(state, RateLimiterState, what)
        for name, bucket, saved in (("bandwidth", self.bandwidth, state.bandwidth), ("ops", self.ops, state.ops)):
            if (bucket is None) != (saved is None):
                raise DeviceStateError(f"{what}: the saved rate limiter {'has' if saved else 'has no'} {name} "
                                       f"bucket; this one {'has' if bucket else 'has none'}")

    def restore_state(self, state: RateLimiterState, what: str) -> None:
        self.check_state(state, what)
        if self.bandwidth is not None and state.bandwidth is not None:
            self.bandwidth.restore_state(state.bandwidth, f"{what} bandwidth")
        if self.ops is not None and state.ops is not None:
            self.ops.restore_state(state.ops, f"{what} ops")
        self.throttled = state.throttled


LIMITER_ATTRIBUTES = ("rate_limiter", "rx_rate_limiter", "tx_rate_limiter")  # where devices keep them


def rate_limiters_of(device: object) -> list[RateLimiter]:
    """The limiters a device has (attributes named as in :data:`LIMITER_ATTRIBUTES`)."""
    found = (getattr(device, attribute, None) for attribute in LIMITER_ATTRIBUTES)
    return [limiter for limiter in found if isinstance(limiter, RateLimiter)]


def save_rate_limiter(limiter: RateLimiter | None) -> RateLimiterState | None:
    return limiter.save_state() if limiter is not None else None


def check_rate_limiter(limiter: RateLimiter | None, state: RateLimiterState | None, what: str) -> None:
    """DeviceStateError unless a limiter was saved exactly when this device has one, with the same buckets."""
    if (limiter is None) != (state is None):
        raise DeviceStateError(f"{what}: the saved device {'has' if state else 'has no'} rate limiter; this one "
                               f"{'has' if limiter else 'has none'} (the configuration differs)")
    if limiter is not None and state is not None:
        limiter.check_state(state, what)


def restore_rate_limiter(limiter: RateLimiter | None, state: RateLimiterState | None, what: str) -> None:
    check_rate_limiter(limiter, state, what)
    if limiter is not None and state is not None:
        limiter.restore_state(state, what)


def make_rate_limiter(config: RateLimiterConfig | None, clock: Clock = time.monotonic) -> RateLimiter | None:
    """A limiter for ``config``, or None when it limits nothing."""
    if config is None or not config.enabled:
        return None
    return RateLimiter(config, clock)
