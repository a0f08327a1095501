"""The one size parser: '128M', '1G', '2GiB', '64K', '512' (in the caller's default unit)."""

from __future__ import annotations

import re

from kvmlet.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmgt])(?:i?b)?|(b))?\s*$", re.IGNORECASE)
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, *, default_unit: int = 1, what: str = "size") -> int:
    """Bytes. Suffixes K, M, G, T (powers of 1024, optionally with iB/B); a plain number is in
    ``default_unit`` bytes; a ``b`` suffix always means bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size like 64K, 128M or 2G")
    number = int(match.group(1))
    if match.group(3):
        return number
    return number * (_UNITS[match.group(2).lower()] if match.group(2) else default_unit)
