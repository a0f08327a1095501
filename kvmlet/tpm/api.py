"""The API's vTPM operations (``PUT /tpm/quote``), kept out of the controller."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmlet.errors import ConfigError, StateError
from kvmlet.tpm.measure import LAUNCH_PCRS

if TYPE_CHECKING:
    from kvmlet.machine import Machine

PCR_COUNT = 24


def quote(machine: Machine, nonce_hex: str, pcrs: list[int] | None) -> dict[str, Any]:
    """A quote bundle of ``machine``'s vTPM (ConfigError for a bad nonce or PCR list, StateError without a
    running vTPM)."""
    from kvmlet.tpm.launch import find_vtpm

    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError:
        raise ConfigError(f"nonce {nonce_hex!r} is not hex") from None
    if not 1 <= len(nonce) <= 64:
        raise ConfigError("nonce: give 1 to 64 bytes")
    selection = tuple(sorted(set(pcrs))) if pcrs is not None else LAUNCH_PCRS
    if not selection or any(not 0 <= pcr < PCR_COUNT for pcr in selection):
        raise ConfigError(f"pcrs: give PCR numbers from 0 to {PCR_COUNT - 1}")
    if machine.devices is None:
        raise StateError("the VM's devices are gone")
    try:
        vtpm = find_vtpm(machine.devices)
    except Exception as exc:
        raise StateError(f"cannot quote: {exc}") from None
    return vtpm.quote(nonce, selection)
