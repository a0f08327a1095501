"""Configuration of virtio drives and the entropy device, and the command-line syntax for them.

``--drive path=disk.img[,readonly=on][,direct=on][,id=NAME][,bps=SIZE][,bps-burst=SIZE][,iops=N]
[,iops-burst=N][,refill-ms=MS]`` and ``--rng [bps=SIZE][,bps-burst=SIZE][,refill-ms=MS]``.
``bps`` / ``iops`` are the token buckets' sizes, refilled every ``refill-ms`` milliseconds (default
1000, so they are per second); the bursts are one-time extra tokens. Sizes take K, M, G suffixes (powers
of 1024) and are bytes without one. A bare first item is the path: ``--drive disk.img,readonly=on``.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kvmlet.config import ConfigError
from kvmlet.devices.virtio.ratelimit import RateLimiterConfig, RateLimitError, TokenBucketConfig

MAX_ID_BYTES = 20  # the virtio-blk GET_ID string
_AMOUNT = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BOOLEANS = {"on": True, "yes": True, "true": True, "1": True,
             "off": False, "no": False, "false": False, "0": False}
_RATE_KEYS = ("bps", "bps-burst", "iops", "iops-burst", "refill-ms")
DRIVE_KEYS = ("path", "readonly", "direct", "id", *_RATE_KEYS)
RNG_KEYS = ("bps", "bps-burst", "refill-ms")


@dataclass
class DriveConfig:
    """One virtio-blk drive."""

    path: Path
    readonly: bool = False
    direct: bool = False
    id: str = ""                          # the GET_ID string; "" gives "drive<N>"
    rate_limit: RateLimiterConfig = field(default_factory=RateLimiterConfig)

    def validate(self, label: str) -> None:
        try:
            mode = os.stat(self.path).st_mode
        except OSError as exc:
            raise ConfigError(f"{label}: {self.path}: {exc.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ConfigError(f"{label}: {self.path} is not a regular file or a block device")
        if not self.readonly and not os.access(self.path, os.W_OK):
            raise ConfigError(f"{label}: {self.path} is not writable (add readonly=on)")
        if len(self.id.encode("ascii", "replace")) > MAX_ID_BYTES or not self.id.isascii() or (
                self.id and not self.id.isprintable()):
            raise ConfigError(f"{label}: id {self.id!r} must be printable ASCII of at most {MAX_ID_BYTES} bytes")
        try:
            self.rate_limit.validate(label)
        except RateLimitError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class RngConfig:
    """The virtio entropy device."""

    rate_limit: RateLimiterConfig = field(default_factory=RateLimiterConfig)

    def validate(self, label: str = "--rng") -> None:
        try:
            self.rate_limit.validate(label)
        except RateLimitError as exc:
            raise ConfigError(str(exc)) from None


def validate_devices(drives: list[DriveConfig], rng: RngConfig | None) -> None:
    """Check every drive and the entropy device; drive IDs must be unique."""
    seen: set[str] = set()
    for number, drive in enumerate(drives):
        label = f"--drive {drive.path}"
        drive.validate(label)
        drive_id = drive.id or f"drive{number}"
        if drive_id in seen:
            raise ConfigError(f"{label}: id {drive_id!r} is used by another drive")
        seen.add(drive_id)
    if rng is not None:
        rng.validate()


def _amount(option: str, key: str, text: str) -> int:
    match = _AMOUNT.match(text)
    if not match:
        raise ConfigError(f"{option}: {key}={text!r} is not a number like 1000, 64K or 10M")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _boolean(option: str, key: str, text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ConfigError(f"{option}: {key}={text!r}: use on or off") from None


def _key_values(option: str, spec: str, known: tuple[str, ...], bare_key: str | None) -> dict[str, str]:
    values: dict[str, str] = {}
    for position, item in enumerate(part for part in spec.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep:
            if position == 0 and bare_key is not None:
                key, value = bare_key, item
            else:
                raise ConfigError(f"{option}: {item!r} is not key=value (known keys: {', '.join(known)})")
        if key not in known:
            raise ConfigError(f"{option}: unknown key {key!r} (known keys: {', '.join(known)})")
        if key in values:
            raise ConfigError(f"{option}: {key} is given twice")
        values[key] = value.strip()
    return values


def bucket_pair(option: str, values: dict[str, str], keys: tuple[str, str], refill: int) -> RateLimiterConfig:
    """A bandwidth and an operations bucket from ``<key>`` and ``<key>-burst`` values (either may be absent)."""
    buckets: list[TokenBucketConfig | None] = []
    for key in keys:
        burst = _amount(option, f"{key}-burst", values[f"{key}-burst"]) if f"{key}-burst" in values else 0
        if key in values:
            size = _amount(option, key, values[key])
            if size <= 0:
                raise ConfigError(f"{option}: {key} must be positive")
            buckets.append(TokenBucketConfig(size, refill, burst))
        elif burst:
            raise ConfigError(f"{option}: {key}-burst needs {key}")
        else:
            buckets.append(None)
    return RateLimiterConfig(bandwidth=buckets[0], ops=buckets[1])


def _rate_limit(option: str, values: dict[str, str]) -> RateLimiterConfig:
    refill = _amount(option, "refill-ms", values["refill-ms"]) if "refill-ms" in values else 1000
    if refill <= 0:
        raise ConfigError(f"{option}: refill-ms must be positive")
    return bucket_pair(option, values, ("bps", "iops"), refill)


def parse_drive(spec: str) -> DriveConfig:
    """``path=FILE,readonly=on,...`` -> DriveConfig (ConfigError with a one-line reason)."""
    option = f"--drive {spec!r}"
    values = _key_values(option, spec, DRIVE_KEYS, "path")
    if not values.get("path"):
        raise ConfigError(f"{option}: path=FILE is required")
    drive = DriveConfig(
        path=Path(values["path"]),
        readonly=_boolean(option, "readonly", values["readonly"]) if "readonly" in values else False,
        direct=_boolean(option, "direct", values["direct"]) if "direct" in values else False,
        id=values.get("id", ""),
        rate_limit=_rate_limit(option, values))
    return drive


def parse_rng(spec: str) -> RngConfig:
    """``""`` or ``bps=1M,...`` -> RngConfig."""
    option = f"--rng {spec!r}" if spec else "--rng"
    return RngConfig(rate_limit=_rate_limit(option, _key_values(option, spec, RNG_KEYS, None)))
