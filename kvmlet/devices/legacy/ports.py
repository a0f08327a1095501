"""Which I/O-port ranges a legacy device needs on the PIO bus."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmlet.devices.bus import Bus, BusDevice


@dataclass(frozen=True)
class PortClaim:
    """One I/O-port range: ``device`` is called with offsets relative to ``base``."""

    base: int
    size: int
    device: BusDevice
    name: str


def register_claims(bus: Bus, claims: Iterable[PortClaim]) -> None:
    """Register every range of ``claims`` on ``bus`` (raises BusConflictError on overlap)."""
    for claim in claims:
        bus.register(claim.base, claim.size, claim.device, claim.name)


def all_ones(size: int) -> int:
    """The value a read of ``size`` bytes from nothing returns on a PC bus."""
    return (1 << (8 * size)) - 1
