"""What a measured launch measures, and where: the PCR map.

====  ==========  ===========================  =====================================================================
PCR   name        event type                   digest of
====  ==========  ===========================  =====================================================================
17    kvmlet      EV_COMPACT_HASH              kvmlet's installed code: a manifest of every file of the kvmlet
                                               package (SHA-256 and path) with kvmlet's and Python's versions,
                                               measured by a dynamic launch (PCRs 17-22 reset first), like TXT's MLE
18    policy      EV_COMPACT_HASH              the launch policy in force: its signer's key and its canonical body,
                                               or the text ``no launch policy``
1     config      EV_PLATFORM_CONFIG_FLAGS     the VM's guest-visible configuration as canonical JSON (the event
                                               data holds the JSON itself): vCPUs, memory, CPU model and template,
                                               boot protocol, drives, network interfaces, vsock, entropy, TPM
4     kernel      EV_IPL                       the kernel image file
8     cmdline     EV_IPL                       the command line as the guest receives it (the event data holds it)
9     initrd      EV_IPL                       the initrd file (no event without an initrd)
====  ==========  ===========================  =====================================================================

Every event carries SHA-256 and SHA-384 digests (both banks are extended). kvmlet extends PCRs 17 and 18 at
locality 3 (the guest cannot: the TIS front end gives it localities 0-2 only), the others at locality 0.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvmlet.tpm.eventlog import (
    BANKS,
    EV_COMPACT_HASH,
    EV_IPL,
    EV_PLATFORM_CONFIG_FLAGS,
    Event,
    digest,
)

if TYPE_CHECKING:
    from kvmlet.config.models import VmConfig

PCR_KVMLET = 17
PCR_POLICY = 18
PCR_CONFIG = 1
PCR_KERNEL = 4
PCR_CMDLINE = 8
PCR_INITRD = 9
# name -> (PCR, event type), in the order of the launch
PCR_MAP: dict[str, tuple[int, int]] = {
    "kvmlet": (PCR_KVMLET, EV_COMPACT_HASH),
    "policy": (PCR_POLICY, EV_COMPACT_HASH),
    "config": (PCR_CONFIG, EV_PLATFORM_CONFIG_FLAGS),
    "kernel": (PCR_KERNEL, EV_IPL),
    "cmdline": (PCR_CMDLINE, EV_IPL),
    "initrd": (PCR_INITRD, EV_IPL),
}
NAME_BY_PCR = {pcr: name for name, (pcr, _) in PCR_MAP.items()}
LAUNCH_PCRS = tuple(sorted(NAME_BY_PCR))
DRTM_LOCALITY = 3          # kvmlet's own extends of PCRs 17 and 18
NO_POLICY = b"no launch policy"
CONFIG_DOCUMENT_VERSION = 1


@dataclass(frozen=True)
class Measurement:
    """One measured component: what is hashed (``payload``) and what the log records (``event_data``)."""

    name: str
    payload: bytes = field(repr=False)
    event_data: bytes = field(repr=False)

    @property
    def pcr(self) -> int:
        return PCR_MAP[self.name][0]

    @property
    def event_type(self) -> int:
        return PCR_MAP[self.name][1]

    @functools.cached_property
    def digests(self) -> dict[int, bytes]:
        return {alg: digest(alg, self.payload) for alg in BANKS}

    @property
    def sha256(self) -> str:
        return self.digests[BANKS[0]].hex()

    def event(self) -> Event:
        return Event(self.pcr, self.event_type, self.digests, self.event_data)


@functools.cache
def code_manifest() -> bytes:
    """kvmlet's installed code as a manifest: versions, then ``<sha256>  <path>`` per file of the package
    (Python sources and data files, ``__pycache__`` left out), sorted by path."""
    import kvmlet

    root = Path(kvmlet.__file__).resolve().parent
    lines = [f"kvmlet {kvmlet.__version__}",
             f"python {sys.implementation.name} {platform.python_version()}"]
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".json", ".pyi"):
            lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(root).as_posix()}")
    return ("\n".join(lines) + "\n").encode()


def kvmlet_measurement() -> Measurement:
    import kvmlet

    return Measurement("kvmlet", code_manifest(), f"kvmlet {kvmlet.__version__} code manifest".encode())


def config_document(config: VmConfig) -> bytes:
    """The guest-visible configuration as canonical JSON (sorted keys, no spaces): what the guest can tell
    about its machine. Host-side details (file paths, TAP names, sockets, rate limits) are left out, so
    the same VM measures the same on every host."""
    from kvmlet.config import to_builtins

    machine = config.machine_config
    boot = config.boot_source
    document: dict[str, object] = {
        "measurement": CONFIG_DOCUMENT_VERSION,
        "vcpu_count": machine.vcpu_count,
        "mem_size_mib": machine.mem_size_mib,
        "smt": machine.smt,
        "cpu_template": machine.cpu_template,
        "cpu_config": to_builtins(config.cpu_config) if config.cpu_config is not None else None,
        "boot_protocol": boot.boot_protocol if boot is not None else None,
        "drives": [{"drive_id": d.drive_id, "is_root_device": d.is_root_device, "is_read_only": d.is_read_only,
                    "partuuid": d.partuuid} for d in config.drives_in_boot_order()],
        "network_interfaces": [{"iface_id": n.iface_id, "guest_mac": n.guest_mac, "queues": n.queues,
                                "mtu": n.mtu, "offload": n.offload} for n in config.network_interfaces],
        "vsock": {"guest_cid": config.vsock.guest_cid} if config.vsock is not None else None,
        "entropy": config.entropy is not None,
        "tpm": {"family": "2.0", "interface": "tis"},
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def launch_measurements(config: VmConfig, kernel: bytes, initrd: bytes | None, cmdline: str,
                        policy: Measurement) -> list[Measurement]:
    """Every measurement of a launch, in the order they are extended (``policy`` from kvmlet.tpm.policy)."""
    boot = config.boot_source
    kernel_name = Path(boot.kernel_image_path).name if boot is not None else "kernel"
    measurements = [kvmlet_measurement(), policy,
                    Measurement("config", config_document(config), config_document(config)),
                    Measurement("kernel", kernel, f"kernel {kernel_name}".encode()),
                    Measurement("cmdline", cmdline.encode(), cmdline.encode())]
    if initrd is not None:
        initrd_name = Path(boot.initrd_path).name if boot is not None and boot.initrd_path else "initrd"
        measurements.append(Measurement("initrd", initrd, f"initrd {initrd_name}".encode()))
    return measurements
