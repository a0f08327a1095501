"""I/O virtualization on the host: IOMMU and VFIO, SR-IOV, TPM, vhost and TAP."""

from __future__ import annotations

from dataclasses import dataclass

from kvmlet.host.model import Feature, Status
from kvmlet.host.tree import Root, exists, link_name, list_dir, read_int, read_line, which

A, V, X = Status.ACTIVE, Status.AVAILABLE, Status.ABSENT

ACPI_TABLES = "/sys/firmware/acpi/tables"
IOMMU_TABLES = {"DMAR": "intel_iommu=on", "IVRS": "amd_iommu=on", "VIOT": "a virtio-iommu driver"}


# -- IOMMU and VFIO -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class IommuState:
    units: tuple[str, ...]
    groups: int
    acpi_tables: tuple[str, ...]
    vfio_container: bool


def read_iommu_state(root: Root = "/") -> IommuState:
    tables = set(list_dir(root, ACPI_TABLES))
    return IommuState(
        units=tuple(list_dir(root, "/sys/class/iommu")),
        groups=len(list_dir(root, "/sys/kernel/iommu_groups")),
        acpi_tables=tuple(t for t in IOMMU_TABLES if t in tables),
        vfio_container=exists(root, "/dev/vfio/vfio"),
    )


def iommu_feature(state: IommuState, root: Root = "/") -> Feature:
    from kvmlet.host.iommu import describe_groups, iommu_groups, read_dmar

    name = "IOMMU (VT-d/AMD-Vi)"
    dmar = read_dmar(root)
    tables = f"; {dmar.describe()}" if dmar is not None else ""
    if state.units or state.groups:
        units = ", ".join(state.units) or "no units listed"
        groups = describe_groups(iommu_groups(root))
        return Feature(name, A, f"DMA remapping on ({units}; {state.groups} groups): devices can be "
                       f"assigned to VMs{tables}{'; ' + groups if groups else ''}")
    if state.acpi_tables and dmar is not None:
        return Feature(name, V, f"ACPI DMAR table but no IOMMU enabled: boot with intel_iommu=on{tables}")
    if state.acpi_tables:
        table = state.acpi_tables[0]
        return Feature(name, V, f"ACPI {table} table but no IOMMU enabled: boot with {IOMMU_TABLES[table]}")
    return Feature(name, X, "no DMA remapping: no device assignment (kvmlet's emulated VT-d still works: "
                   "--iommu vtd)")


def vfio_feature(state: IommuState) -> Feature:
    name = "VFIO"
    if state.vfio_container and state.groups:
        return Feature(name, V, f"/dev/vfio/vfio, {state.groups} IOMMU groups: bind a device to vfio-pci "
                       "to assign it")
    if state.vfio_container:
        return Feature(name, X, "/dev/vfio/vfio but no IOMMU groups: nothing can be assigned safely")
    if state.groups:
        return Feature(name, V, "IOMMU groups but no /dev/vfio/vfio: modprobe vfio-pci")
    return Feature(name, X, "no /dev/vfio/vfio and no IOMMU groups: no device assignment")


# -- SR-IOV -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SriovDevice:
    address: str
    total_vfs: int
    num_vfs: int
    driver: str | None
    interfaces: tuple[str, ...]

    @property
    def label(self) -> str:
        who = ",".join(self.interfaces) or self.driver or "?"
        return f"{who} ({self.address}, {self.num_vfs}/{self.total_vfs} VFs)"


def read_sriov_devices(root: Root = "/") -> list[SriovDevice]:
    found: list[SriovDevice] = []
    for address in list_dir(root, "/sys/bus/pci/devices"):
        base = f"/sys/bus/pci/devices/{address}"
        total = read_int(root, f"{base}/sriov_totalvfs")
        if not total:
            continue
        found.append(SriovDevice(
            address=address,
            total_vfs=total,
            num_vfs=read_int(root, f"{base}/sriov_numvfs") or 0,
            driver=link_name(root, f"{base}/driver"),
            interfaces=tuple(list_dir(root, f"{base}/net")),
        ))
    return found


def _listing(devices: list[SriovDevice], limit: int = 4) -> str:
    text = "; ".join(d.label for d in devices[:limit])
    return text + (f"; +{len(devices) - limit} more" if len(devices) > limit else "")


def sriov_feature(devices: list[SriovDevice]) -> Feature:
    name = "SR-IOV"
    enabled = [d for d in devices if d.num_vfs]
    if enabled:
        return Feature(name, A, f"VFs enabled, each can go to a VM: {_listing(enabled)}")
    if devices:
        return Feature(name, V, f"{len(devices)} capable, no VFs enabled (sriov_numvfs): {_listing(devices)}")
    return Feature(name, X, "no SR-IOV capable devices: VMs get virtio-net over TAP and kvmlet's switch")


# -- TPM ----------------------------------------------------------------------------------------------
def tpm_feature(root: Root = "/") -> Feature:
    name = "TPM"
    nodes = [d for d in ("/dev/tpmrm0", "/dev/tpm0") if exists(root, d)]
    chips = list_dir(root, "/sys/class/tpm")
    version = read_line(root, f"/sys/class/tpm/{chips[0]}/tpm_version_major") if chips else None
    label = f"TPM {version}.0" if version else "TPM"
    if nodes:
        return Feature(name, A, f"host {label} at {nodes[0]}: host boot measured; VMs get vTPMs, not this")
    if chips:
        return Feature(name, V, f"host {label} ({chips[0]}) but no /dev/tpm0 or /dev/tpmrm0 node")
    return Feature(name, X, "no /dev/tpm0 or /dev/tpmrm0: host boot unmeasured; per-VM vTPMs still work")


def vtpm_feature(root: Root = "/") -> Feature:
    name = "vTPM (swtpm)"
    path = which(root, "swtpm")
    if path:
        return Feature(name, V, f"{path}: each VM can have a TPM 2.0 (measured launch, attestation)")
    return Feature(name, X, "swtpm not installed (apt install swtpm swtpm-tools): VMs get no vTPM")


# -- vhost and TAP ------------------------------------------------------------------------------------
def node_feature(root: Root, name: str, node: str, present: str, missing: str) -> Feature:
    if exists(root, node):
        return Feature(name, V, f"{node}: {present}")
    return Feature(name, X, f"no {node}: {missing}")


def switch_feature(root: Root = "/") -> Feature:
    """The vhost-user switch `kvmlet net switch` can run here (docs/networking.md)."""
    name = "vhost-user switch"
    if exists(root, "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"):
        return Feature(name, V, "Open vSwitch with DPDK: kvmlet net switch, per-port MAC, VLAN, rate and trust")
    testpmd = which(root, "dpdk-testpmd")
    if testpmd:
        return Feature(name, V, f"{testpmd}: kvmlet net switch --engine testpmd, no per-port controls "
                                "(apt install openvswitch-switch-dpdk for them)")
    return Feature(name, X, "no switch (apt install openvswitch-switch-dpdk): VMs use TAP networking")


def io_features(root: Root = "/") -> list[Feature]:
    iommu = read_iommu_state(root)
    return [
        iommu_feature(iommu, root),
        vfio_feature(iommu),
        sriov_feature(read_sriov_devices(root)),
        tpm_feature(root),
        vtpm_feature(root),
        node_feature(root, "vhost-net", "/dev/vhost-net",
                     "virtio-net queues can be served in the host kernel (--net tap=..,vhost=on)",
                     "virtio-net served in user space by kvmlet (modprobe vhost_net)"),
        switch_feature(root),
        node_feature(root, "vhost-vsock", "/dev/vhost-vsock",
                     "virtio-vsock can be served in the host kernel",
                     "vsock served in user space by kvmlet (modprobe vhost_vsock)"),
        node_feature(root, "TAP", "/dev/net/tun",
                     "TAP interfaces for guest networking (root or CAP_NET_ADMIN)",
                     "no TAP networking (modprobe tun)"),
    ]
