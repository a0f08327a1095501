"""Token buckets and the two-bucket rate limiter, on a fake clock."""

from __future__ import annotations

import pytest

from kvmlet.config import decode
from kvmlet.config.models import RateLimiterConfig, TokenBucketConfig
from kvmlet.devices.virtio.ratelimit import MIN_WAIT, RateLimiter, TokenBucket, make_rate_limiter
from kvmlet.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_starts_full_and_refills_linearly() -> None:
    clock = Clock()
    bucket = TokenBucket(TokenBucketConfig(size=1000, refill_time=1000), clock)
    assert bucket.wait_time(1000) == 0
    bucket.consume(1000)
    assert bucket.wait_time(1) == pytest.approx(0.001)
    assert bucket.wait_time(500) == pytest.approx(0.5)
    clock.now += 0.25
    assert bucket.wait_time(250) == 0
    clock.now += 10
    assert bucket.budget <= 1000 and bucket.wait_time(1000) == 0  # capped at the size


def test_one_time_burst_is_used_first_and_not_refilled() -> None:
    clock = Clock()
    bucket = TokenBucket(TokenBucketConfig(size=100, refill_time=1000, one_time_burst=500), clock)
    assert bucket.wait_time(550) == 0
    bucket.consume(550)
    assert bucket.burst == 0 and bucket.budget == 50
    clock.now += 100
    assert bucket.burst == 0 and bucket.wait_time(100) == 0


def test_request_larger_than_the_bucket_is_admitted_when_full_and_leaves_debt() -> None:
    clock = Clock()
    bucket = TokenBucket(TokenBucketConfig(size=100, refill_time=1000), clock)
    assert bucket.wait_time(300) == 0
    bucket.consume(300)
    assert bucket.budget == -200
    assert bucket.wait_time(300) == pytest.approx(3.0)  # back to full: 300 tokens at 100/s


def test_limiter_needs_both_buckets_and_consumes_nothing_when_waiting() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimiterConfig(bandwidth=TokenBucketConfig(size=1000, refill_time=1000),
                                            ops=TokenBucketConfig(size=2, refill_time=1000)), clock)
    assert limiter.try_consume(100) == 0
    assert limiter.try_consume(100) == 0
    wait = limiter.try_consume(100)  # ops exhausted, bandwidth not
    assert wait == pytest.approx(0.5) and limiter.throttled == 1
    assert limiter.bandwidth is not None and limiter.bandwidth.budget == 800
    clock.now += 0.5
    assert limiter.try_consume(100) == 0


def test_minimum_wait() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimiterConfig(ops=TokenBucketConfig(size=1_000_000, refill_time=1)), clock)
    limiter.try_consume(0, ops=1_000_000)
    assert limiter.try_consume(0, ops=1) >= MIN_WAIT


@pytest.mark.parametrize("body", ['{"size": 0, "refill_time": 1000}', '{"size": 10, "refill_time": 0}',
                                  '{"size": 10, "refill_time": 10, "one_time_burst": -1}'])
def test_bad_bucket_configurations(body: str) -> None:
    """A bucket as a config file or API body gives it: refused by decoding (a negative count) or by
    validation (a zero size or refill time), either way as a ConfigError."""
    with pytest.raises(ConfigError):
        RateLimiterConfig(bandwidth=decode(body, TokenBucketConfig, "bucket")).validate("test")


def test_no_limit_gives_no_limiter() -> None:
    assert make_rate_limiter(None) is None
    assert make_rate_limiter(RateLimiterConfig()) is None
    assert make_rate_limiter(RateLimiterConfig(ops=TokenBucketConfig(size=5, refill_time=1000))) is not None


def test_reset_forgives_the_debt_and_grants_nothing() -> None:
    """Issue 13: a device reset clears the debt of an oversized request (the drive answers again within
    one refill), but neither refills the bucket nor gives back a spent one-time burst."""
    clock = Clock()
    limiter = RateLimiter(RateLimiterConfig(bandwidth=TokenBucketConfig(size=100, refill_time=1000,
                                                                        one_time_burst=50)), clock)
    assert limiter.try_consume(5050) == 0       # burst 50, then 5000 against a full bucket of 100
    bucket = limiter.bandwidth
    assert bucket is not None and bucket.budget == -4900 and bucket.burst == 0
    assert limiter.try_consume(10) == pytest.approx(49.1)
    limiter.reset()
    assert bucket.budget == 0 and bucket.burst == 0
    assert limiter.try_consume(10) == pytest.approx(0.1)
    clock.now += 0.5
    limiter.reset()                              # a positive budget is kept as it is: no gift
    assert bucket.budget == pytest.approx(50)


def test_refund_gives_back_at_most_a_full_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimiterConfig(bandwidth=TokenBucketConfig(size=100, refill_time=1000),
                                            ops=TokenBucketConfig(size=2, refill_time=1000)), clock)
    assert limiter.try_consume(80) == 0
    limiter.refund(80)
    assert limiter.bandwidth is not None and limiter.bandwidth.budget == 100
    assert limiter.ops is not None and limiter.ops.budget == 2
    limiter.refund(1000)
    assert limiter.bandwidth.budget == 100
