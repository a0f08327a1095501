"""The measured launch of a VM, run by the machine builder before the kernel is loaded and any vCPU exists.

1. The launch policy, if the configuration names one, is loaded and its signature checked against the
   configured key (an unsigned or badly signed policy refuses the launch).
2. Every component is measured (:mod:`kvmlet.tpm.measure`); the policy must allow each one, or the launch is
   refused naming the component, its digest and the allowed digests. Nothing has run in the VM yet.
3. The vTPM is started and the measurements extended (:meth:`kvmlet.tpm.vtpm.Vtpm.launch`); the event log is
   written at :data:`~kvmlet.boot.layout.TPM_EVENT_LOG_ADDR` (reserved in the e820 map) and the ACPI tables gain
   the TPM2 table (LAML/LASA pointing at the log) and the DSDT device ``MSFT0101``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvmlet.boot.acpi import AcpiExtras, build_tpm2_table, build_tpm_aml
from kvmlet.boot.layout import TPM_EVENT_LOG_ADDR, TPM_EVENT_LOG_SIZE
from kvmlet.devices.tpm_tis import TIS_BASE, TIS_SIZE, TpmTis
from kvmlet.tpm.errors import TpmError
from kvmlet.tpm.measure import Measurement, launch_measurements
from kvmlet.tpm.policy import LaunchPolicy, load_policy, no_policy_measurement

if TYPE_CHECKING:
    from kvmlet.config.models import Tpm, VmConfig
    from kvmlet.devices.manager import DeviceManager
    from kvmlet.memory import GuestMemory
    from kvmlet.tpm.vtpm import Vtpm

log = logging.getLogger("kvmlet.tpm")


@dataclass(frozen=True)
class TpmLaunch:
    """What the loader adds for the vTPM, and the log to write once the kernel is loaded."""

    acpi: AcpiExtras
    reserved: tuple[tuple[int, int], ...]
    event_log: bytes
    measurements: tuple[Measurement, ...]

    def write_log(self, memory: GuestMemory) -> None:
        memory.write(TPM_EVENT_LOG_ADDR, self.event_log.ljust(TPM_EVENT_LOG_SIZE, b"\0"))


def platform_additions(event_log: bytes = b"") -> tuple[AcpiExtras, tuple[tuple[int, int], ...]]:
    """The TPM2 table, the MSFT0101 device and the event log's reserved range."""
    return (AcpiExtras(tables=(build_tpm2_table(TPM_EVENT_LOG_ADDR, TPM_EVENT_LOG_SIZE),),
                       dsdt_aml=build_tpm_aml(TIS_BASE, TIS_SIZE)),
            ((TPM_EVENT_LOG_ADDR, TPM_EVENT_LOG_SIZE),))


def find_vtpm(devices: DeviceManager) -> Vtpm:
    from kvmlet.tpm.vtpm import Vtpm

    managed = devices.find("tpm")
    if managed is None or not isinstance(managed.device, TpmTis) or not isinstance(managed.device.backend, Vtpm):
        raise TpmError("the VM has no vTPM")
    return managed.device.backend


def launch_policy(tpm: Tpm) -> LaunchPolicy | None:
    if tpm.policy is None:
        return None
    assert tpm.policy_key is not None   # validate() requires both
    return load_policy(Path(tpm.policy), Path(tpm.policy_key))


def measure(config: VmConfig, kernel: bytes, initrd: bytes | None, cmdline: str) -> list[Measurement]:
    """The launch's measurements, checked against the configured policy (PolicyError if it refuses)."""
    assert config.tpm is not None
    policy = launch_policy(config.tpm)
    measurements = launch_measurements(config, kernel, initrd, cmdline,
                                       policy.measurement() if policy is not None else no_policy_measurement())
    if policy is not None:
        policy.check(measurements)
        log.info("launch allowed by policy %r (key %s)", policy.name, policy.key_id[:16])
    return measurements


def measured_launch(config: VmConfig, devices: DeviceManager, kernel: bytes, initrd: bytes | None,
                    cmdline: str) -> TpmLaunch:
    """Measure, check the policy, extend into the VM's vTPM; see the module's docstring."""
    measurements = measure(config, kernel, initrd, cmdline)
    vtpm = find_vtpm(devices)
    event_log = vtpm.launch(measurements)
    if len(event_log) > TPM_EVENT_LOG_SIZE:
        raise TpmError(f"the event log is {len(event_log)} bytes; its area holds {TPM_EVENT_LOG_SIZE}")
    acpi, reserved = platform_additions(event_log)
    return TpmLaunch(acpi, reserved, event_log, tuple(measurements))
