"""One model per API resource, shared by the command line, the JSON config file and the HTTP API.

The field names and JSON shapes are Firecracker's (its ``firecracker.yaml``), so a Firecracker client's
bodies and config files decode unchanged; fields Firecracker does not have are kvmlet extensions and say
so. Decoding (:func:`kvmlet.config.decode`) checks types and refuses unknown fields, naming the field;
``validate()`` checks what types cannot say (ranges, files that must exist, names that must be unique).
Nothing here imports a device or creates a file descriptor: a configuration is checked completely
before any VM, memory or device exists.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from kvmlet.errors import ConfigError, UnsupportedError

MiB = 1 << 20
DEFAULT_MEM_SIZE_MIB = 128
MIN_MEM_SIZE_MIB = 16
MAX_VCPUS_SUPPORTED = 254  # what the MP table's 8-bit APIC ids describe (kvmlet.boot.mptable.MAX_CPUS)
DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1"
MAX_DRIVE_ID_BYTES = 20  # the virtio-blk GET_ID string
MAX_QUEUE_PAIRS = 16     # kvmlet.net.tap.MAX_QUEUES
MAX_TAP_MTU = 65521      # the largest MTU Linux lets a TAP have
MAX_CID = 0xFFFFFFFE     # 0xFFFFFFFF is VMADDR_CID_ANY
UNIX_PATH_MAX = 107      # sun_path without its NUL
_MAC = re.compile(r"^([0-9a-f]{2})(:[0-9a-f]{2}){5}$", re.IGNORECASE)
_IFNAME_BAD = re.compile(r"[/:\s]")
_ID = re.compile(r"^[A-Za-z0-9_]+$")  # Firecracker's resource ids: alphanumerics and underscores
AUTO_TAP = "auto"

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
# kvmlet extensions: how a virtio device is attached (virtio-mmio, the default, or virtio-pci with MSI-X), and
# whether the PCI devices sit behind an emulated Intel VT-d DMA-remapping unit (kvmlet.devices.iommu)
Transport = Literal["mmio", "pci"]
Iommu = Literal["none", "vtd"]
Positive = Annotated[int, msgspec.Meta(gt=0)]


class Model(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every model: unknown fields are refused; encoding gives every field, unset ones as null."""


# -- rate limiters ----------------------------------------------------------------------------------
class TokenBucketConfig(Model):
    """``size`` tokens per ``refill_time`` milliseconds, plus ``one_time_burst`` extra tokens once."""

    size: NonNegative
    refill_time: NonNegative
    one_time_burst: NonNegative = 0

    def validate(self, what: str) -> None:
        if self.one_time_burst < 0:
            raise ConfigError(f"{what}: the one-time burst cannot be negative")
        if self.size <= 0:
            raise ConfigError(f"{what}: the bucket size must be positive (got {self.size})")
        if self.refill_time <= 0:
            raise ConfigError(f"{what}: the refill time must be positive (got {self.refill_time} ms)")


class RateLimiterConfig(Model):
    """Limits for one device: ``bandwidth`` (bytes) and ``ops`` (requests, or frames)."""

    bandwidth: TokenBucketConfig | None = None
    ops: TokenBucketConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.bandwidth is not None or self.ops is not None

    def validate(self, what: str) -> None:
        if self.bandwidth is not None:
            self.bandwidth.validate(f"{what} bandwidth limit")
        if self.ops is not None:
            self.ops.validate(f"{what} operations limit")


# -- boot source and machine ------------------------------------------------------------------------
class BootSource(Model):
    """``PUT /boot-source``: the kernel, its command line and initrd."""

    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None
    boot_protocol: Literal["auto", "linux64", "pvh"] = "auto"  # kvmlet extension

    def validate(self) -> None:
        for label, path in (("kernel_image_path", self.kernel_image_path), ("initrd_path", self.initrd_path)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"boot-source: {label} {path} does not exist or is not a file")


class MachineConfig(Model):
    """``PUT /machine-config``: vCPUs, memory and CPU options."""

    vcpu_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPUS_SUPPORTED)] = 1
    mem_size_mib: Annotated[int, msgspec.Meta(ge=MIN_MEM_SIZE_MIB)] = DEFAULT_MEM_SIZE_MIB
    smt: bool = False
    track_dirty_pages: bool = False
    cpu_template: str | None = None
    huge_pages: Literal["None", "2M"] = "None"
    iommu: Iommu = "none"        # kvmlet extension: "vtd" puts the PCI devices behind a VT-d unit

    @property
    def memory_bytes(self) -> int:
        return self.mem_size_mib * MiB

    def validate(self, max_vcpus: int | None = None) -> None:
        if self.smt:
            raise ConfigError("machine-config: smt=true is not supported (each vCPU is its own core)")
        if self.cpu_template not in (None, "None"):
            from kvmlet.cpu.models import check_cpu_template

            check_cpu_template(self.cpu_template)
        if max_vcpus is not None and self.vcpu_count > max_vcpus:
            raise ConfigError(f"machine-config: vcpu_count {self.vcpu_count} is more than this host's KVM "
                              f"allows ({max_vcpus})")
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if self.memory_bytes > host:
            raise ConfigError(f"machine-config: mem_size_mib {self.mem_size_mib} is more than this host has "
                              f"({host // MiB} MiB)")


class MachineConfigUpdate(Model):
    """``PATCH /machine-config``: any subset of the fields."""

    vcpu_count: Annotated[int, msgspec.Meta(ge=1, le=MAX_VCPUS_SUPPORTED)] | None = None
    mem_size_mib: Annotated[int, msgspec.Meta(ge=MIN_MEM_SIZE_MIB)] | None = None
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: str | None = None
    huge_pages: Literal["None", "2M"] | None = None
    iommu: Iommu | None = None

    def apply(self, current: MachineConfig) -> MachineConfig:
        changes = {f: getattr(self, f) for f in self.__struct_fields__ if getattr(self, f) is not None}
        return msgspec.structs.replace(current, **changes)


# -- devices --------------------------------------------------------------------------------------
class Drive(Model):
    """``PUT /drives/{drive_id}``: a virtio-blk drive backed by a file or block device."""

    drive_id: str
    path_on_host: str | None = None
    is_root_device: bool = False
    is_read_only: bool = False
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] = "Unsafe"
    io_engine: Literal["Sync", "Async"] = "Sync"
    rate_limiter: RateLimiterConfig | None = None
    socket: str | None = None   # vhost-user-blk: not supported
    direct: bool = False        # kvmlet extension: O_DIRECT, bypassing the host page cache
    transport: Transport = "mmio"   # kvmlet extension: virtio-mmio or virtio-pci

    def validate(self) -> None:
        label = f"drive {self.drive_id!r}"
        check_id(self.drive_id, "drive_id")
        if len(self.drive_id.encode()) > MAX_DRIVE_ID_BYTES:
            raise ConfigError(f"{label}: drive_id is longer than {MAX_DRIVE_ID_BYTES} bytes (the virtio-blk ID)")
        if self.socket is not None:
            raise ConfigError(f"{label}: vhost-user drives (socket) are not supported; give path_on_host")
        if self.path_on_host is None:
            raise ConfigError(f"{label}: path_on_host is required")
        try:
            mode = os.stat(self.path_on_host).st_mode
        except OSError as exc:
            raise ConfigError(f"{label}: {self.path_on_host}: {exc.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise ConfigError(f"{label}: {self.path_on_host} is not a regular file or a block device")
        if not self.is_read_only and not os.access(self.path_on_host, os.W_OK):
            raise ConfigError(f"{label}: {self.path_on_host} is not writable (set is_read_only)")
        if self.rate_limiter is not None:
            self.rate_limiter.validate(label)


class DriveUpdate(Model):
    """``PATCH /drives/{drive_id}`` after boot: a new backing file and/or a new rate limiter."""

    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiterConfig | None = None


class NetworkInterface(Model):
    """``PUT /network-interfaces/{iface_id}``: a virtio-net interface on a TAP."""

    iface_id: str
    host_dev_name: str = AUTO_TAP
    guest_mac: str | None = None
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None
    # kvmlet extensions: queue pairs, TAP offloads, and the host side of the TAP
    queues: Annotated[int, msgspec.Meta(ge=1, le=MAX_QUEUE_PAIRS)] = 1
    offload: bool = True
    mtu: Annotated[int, msgspec.Meta(ge=68, le=MAX_TAP_MTU)] | None = None
    address: str | None = None
    bridge: str | None = None
    transport: Transport = "mmio"
    # kvmlet extension: the data path in a vhost-user back end (its socket; kvmlet connects) instead of a TAP
    vhost_user_socket: str | None = None
    # kvmlet extension: the TAP's data path in the kernel's vhost-net (/dev/vhost-net) instead of kvmlet's
    vhost_net: bool = False

    def validate(self) -> None:
        label = f"network interface {self.iface_id!r}"
        check_id(self.iface_id, "iface_id")
        if self.vhost_user_socket is not None:
            if not self.vhost_user_socket or len(os.fsencode(self.vhost_user_socket)) > UNIX_PATH_MAX:
                raise ConfigError(f"{label}: vhost_user_socket {self.vhost_user_socket!r} is not a Unix socket "
                                  f"path (1 to {UNIX_PATH_MAX} bytes)")
            if self.transport != "mmio":
                raise ConfigError(f"{label}: a vhost-user interface needs transport mmio (its back end interrupts "
                                  "the guest through the device's one irqfd; virtio-pci MSI-X is not wired for it)")
            for field_name in ("address", "bridge", "rx_rate_limiter", "tx_rate_limiter"):
                if getattr(self, field_name) is not None:
                    raise ConfigError(f"{label}: {field_name} applies to TAP interfaces; a vhost-user interface's "
                                      "host side and limits belong to its back end (see kvmlet net)")
        if self.vhost_net:
            if self.vhost_user_socket is not None:
                raise ConfigError(f"{label}: vhost_net (the kernel's data path for a TAP) and vhost_user_socket (a "
                                  "vhost-user back end) exclude each other")
            if self.transport != "mmio":
                raise ConfigError(f"{label}: a vhost-net interface needs transport mmio (the kernel interrupts the "
                                  "guest through the device's one irqfd; virtio-pci MSI-X is not wired for it)")
            for field_name in ("rx_rate_limiter", "tx_rate_limiter"):
                if getattr(self, field_name) is not None:
                    raise ConfigError(f"{label}: {field_name} needs kvmlet's own TAP data path; with vhost_net the "
                                      "kernel moves the frames and kvmlet cannot limit them")
        if not 1 <= self.queues <= MAX_QUEUE_PAIRS:
            raise ConfigError(f"{label}: queues {self.queues}: choose 1 to {MAX_QUEUE_PAIRS} queue pairs")
        if self.mtu is not None and not 68 <= self.mtu <= MAX_TAP_MTU:
            raise ConfigError(f"{label}: mtu {self.mtu}: choose 68 to {MAX_TAP_MTU}")
        if self.host_dev_name != AUTO_TAP and not valid_ifname(self.host_dev_name):
            raise ConfigError(f"{label}: host_dev_name {self.host_dev_name!r} is not an interface name "
                              "(1-15 characters, no '/', ':' or spaces) or auto")
        if self.guest_mac is not None:
            parse_mac(self.guest_mac, label)
        if self.address is not None:
            import ipaddress

            try:
                ipaddress.ip_interface(self.address)
            except ValueError:
                raise ConfigError(f"{label}: address {self.address!r} is not like 172.16.0.1/24") from None
        if self.bridge is not None and not valid_ifname(self.bridge):
            raise ConfigError(f"{label}: bridge {self.bridge!r} is not an interface name")
        for side, limiter in (("rx", self.rx_rate_limiter), ("tx", self.tx_rate_limiter)):
            if limiter is not None:
                limiter.validate(f"{label} {side}")


class NetworkInterfaceUpdate(Model):
    """``PATCH /network-interfaces/{iface_id}`` after boot: new rate limiters."""

    iface_id: str
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None


class Vsock(Model):
    """``PUT /vsock``: the guest's context ID and the host's Unix socket."""

    guest_cid: Annotated[int, msgspec.Meta(ge=3, le=MAX_CID)]
    uds_path: str
    vsock_id: str | None = None  # deprecated by Firecracker, accepted and ignored
    transport: Transport = "mmio"   # kvmlet extension

    def validate(self) -> None:
        uds = Path(self.uds_path)
        if len(os.fsencode(uds)) + len("_4294967295") > UNIX_PATH_MAX:
            raise ConfigError(f"vsock: uds_path {uds} is too long for a Unix socket path with a port suffix "
                              f"(at most {UNIX_PATH_MAX - 11} bytes)")
        if not uds.parent.is_dir():
            raise ConfigError(f"vsock: uds_path {uds}: directory {uds.parent} does not exist")
        if uds.exists() and not uds.is_socket():
            raise ConfigError(f"vsock: uds_path {uds} exists and is not a socket")


class Tpm(Model):
    """``PUT /tpm`` (kvmlet extension): a vTPM (swtpm behind a TPM TIS interface), a measured launch and,
    optionally, a signed launch policy that must allow what is launched (docs/tpm.md)."""

    state_dir: str | None = None    # the vTPM's state (kept: EK, keys, NV); none: a new vTPM removed with the VM
    policy: str | None = None       # a signed launch policy file
    policy_key: str | None = None   # the Ed25519 public key the policy must be signed with

    def validate(self) -> None:
        if (self.policy is None) != (self.policy_key is None):
            raise ConfigError("tpm: give both policy and policy_key (the key that must have signed the policy)")
        for label, path in (("policy", self.policy), ("policy_key", self.policy_key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"tpm: {label} {path} does not exist or is not a file")
        if self.state_dir is not None:
            state = Path(self.state_dir)
            if state.exists() and not state.is_dir():
                raise ConfigError(f"tpm: state_dir {state} is not a directory")
            if not state.exists() and not state.parent.is_dir():
                raise ConfigError(f"tpm: state_dir {state}: directory {state.parent} does not exist")


class Entropy(Model):
    """``PUT /entropy``: a virtio-rng device, optionally rate limited."""

    rate_limiter: RateLimiterConfig | None = None
    transport: Transport = "mmio"   # kvmlet extension

    def validate(self) -> None:
        if self.rate_limiter is not None:
            self.rate_limiter.validate("entropy")


LogLevel = Literal["Error", "Warning", "Info", "Debug", "Trace", "Off",
                   "ERROR", "WARNING", "INFO", "DEBUG", "TRACE", "OFF",
                   "error", "warning", "info", "debug", "trace", "off"]


class Logger(Model):
    """``PUT /logger``: where kvmlet's log goes and how much of it."""

    log_path: str | None = None
    level: LogLevel = "Info"
    show_level: bool = False
    show_log_origin: bool = False
    module: str | None = None

    def validate(self) -> None:
        if self.log_path is not None:
            check_writable_path(self.log_path, "logger: log_path")


class Metrics(Model):
    """``PUT /metrics``: where the metrics JSON lines go."""

    metrics_path: str

    def validate(self) -> None:
        check_writable_path(self.metrics_path, "metrics: metrics_path")


class CpuidRegisterModifier(Model):
    register: Literal["eax", "ebx", "ecx", "edx"]
    bitmap: str


class CpuidLeafModifier(Model):
    leaf: str | int
    subleaf: str | int
    flags: int
    modifiers: list[CpuidRegisterModifier]


class MsrModifier(Model):
    addr: str | int
    bitmap: str


class CpuConfig(Model):
    """``PUT /cpu-config``: a custom CPU template in Firecracker's format, applied at InstanceStart over the
    CPU model (kvmlet.cpu.template)."""

    kvm_capabilities: list[str] = msgspec.field(default_factory=list)
    cpuid_modifiers: list[CpuidLeafModifier] = msgspec.field(default_factory=list)
    msr_modifiers: list[MsrModifier] = msgspec.field(default_factory=list)
    vcpu_features: list[dict[str, Any]] = msgspec.field(default_factory=list)
    reg_modifiers: list[dict[str, Any]] = msgspec.field(default_factory=list)

    def validate(self) -> None:
        from kvmlet.cpu.template import parse_template

        parse_template(self)   # bitmaps, numbers, x86 parts only: ConfigError (TemplateError) naming the field


# -- the whole VM -----------------------------------------------------------------------------------
class VmConfig(Model):
    """A whole VM: Firecracker's ``--config-file`` and ``GET /vm/config`` shape."""

    boot_source: BootSource | None = msgspec.field(default=None, name="boot-source")
    machine_config: MachineConfig = msgspec.field(default_factory=MachineConfig, name="machine-config")
    drives: list[Drive] = msgspec.field(default_factory=list)
    network_interfaces: list[NetworkInterface] = msgspec.field(default_factory=list, name="network-interfaces")
    vsock: Vsock | None = None
    entropy: Entropy | None = None
    logger: Logger | None = None
    metrics: Metrics | None = None
    cpu_config: CpuConfig | None = msgspec.field(default=None, name="cpu-config")
    tpm: Tpm | None = None   # kvmlet extension: a vTPM and a measured launch
    console: str = "stdio"   # kvmlet extension: stdio | file:PATH | socket:PATH | none

    def validate(self, max_vcpus: int | None = None, *, restoring: bool = False) -> None:
        """Every check that can be made before a VM exists (files included). A VM ``restoring`` from a
        snapshot boots nothing: its kernel need not exist any more."""
        if not restoring:
            if self.boot_source is None:
                raise ConfigError("boot-source is missing: give kernel_image_path (PUT /boot-source, or --kernel)")
            self.boot_source.validate()
        self.machine_config.validate(max_vcpus)
        check_console(self.console)
        unique([d.drive_id for d in self.drives], "drive_id")
        if sum(d.is_root_device for d in self.drives) > 1:
            raise ConfigError("drives: only one drive can be the root device")
        for drive in self.drives:
            drive.validate()
        unique([n.iface_id for n in self.network_interfaces], "iface_id")
        unique([n.host_dev_name for n in self.network_interfaces if n.host_dev_name != AUTO_TAP], "host_dev_name")
        unique([parse_mac(n.guest_mac, "network-interfaces") for n in self.network_interfaces
                if n.guest_mac is not None], "guest_mac")
        for net in self.network_interfaces:
            net.validate()
        for part in (self.vsock, self.entropy, self.logger, self.metrics, self.cpu_config, self.tpm):
            if part is not None:
                part.validate()

    def drives_in_boot_order(self) -> list[Drive]:
        """The root device first (it becomes /dev/vda, as under Firecracker), the others in order."""
        return sorted(self.drives, key=lambda d: not d.is_root_device)

    def kernel_cmdline(self) -> str:
        """The boot arguments plus what the root device needs (``root=`` and ``ro``/``rw``)."""
        assert self.boot_source is not None
        args = self.boot_source.boot_args if self.boot_source.boot_args is not None else DEFAULT_CMDLINE
        root = next((d for d in self.drives if d.is_root_device), None)
        if root is None:
            return args
        target = f"PARTUUID={root.partuuid}" if root.partuuid else "/dev/vda"
        return f"{args} root={target} {'ro' if root.is_read_only else 'rw'}".strip()


# -- shared checks ----------------------------------------------------------------------------------
def check_id(value: str, field: str) -> None:
    if not _ID.match(value) or len(value) > 64:
        raise ConfigError(f"{field} {value!r} must be 1-64 letters, digits or underscores")


def unique(values: list[Any], field: str) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            shown = format_mac(value) if isinstance(value, bytes) else value
            raise ConfigError(f"{field} {shown!r} is used twice")
        seen.add(value)


def valid_ifname(name: str) -> bool:
    return 0 < len(name.encode()) <= 15 and not _IFNAME_BAD.search(name) and name not in (".", "..")


def parse_mac(text: str, label: str = "mac") -> bytes:
    if not _MAC.match(text):
        raise ConfigError(f"{label}: mac {text!r} is not like 02:00:00:12:34:56")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ConfigError(f"{label}: mac {text} is a multicast address (the lowest bit of the first byte is set)")
    if mac == bytes(6):
        raise ConfigError(f"{label}: mac 00:00:00:00:00:00 is not a usable address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def check_writable_path(path: str, label: str) -> None:
    parent = Path(path).parent
    if not parent.is_dir():
        raise ConfigError(f"{label} {path}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise ConfigError(f"{label} {path} is a directory")


CONSOLE_SPECS = "stdio, file:PATH, socket:PATH or none"


def check_console(spec: str) -> None:
    kind, colon, argument = spec.partition(":")
    if (kind in ("stdio", "none") and not colon) or (kind in ("file", "socket") and argument):
        return
    if kind in ("file", "socket"):
        raise ConfigError(f"console {spec!r} needs a path after '{kind}:'")
    raise ConfigError(f"console {spec!r} is not one of {CONSOLE_SPECS}")


# -- snapshots --------------------------------------------------------------------------------------
SnapshotType = Literal["Full", "Diff"]
MemCopy = Literal["none", "background"]
DEFAULT_MEM_COPY: MemCopy = "background"   # measured: bench snapshot, docs/performance.md


class SnapshotCreateParams(Model):
    """``PUT /snapshot/create``: save the paused VM to a state file and a memory file."""

    snapshot_path: str
    mem_file_path: str
    snapshot_type: SnapshotType = "Full"

    def validate(self) -> None:
        try:
            for field_name in ("snapshot_path", "mem_file_path"):
                if not getattr(self, field_name):
                    raise ConfigError(f"snapshot: {field_name} is empty")
                path = Path(getattr(self, field_name))
                if path.is_dir():
                    raise ConfigError(f"snapshot: {field_name} {path} is a directory")
                if not path.parent.is_dir():
                    raise ConfigError(f"snapshot: {field_name} {path}: directory {path.parent} does not exist")
            if Path(self.snapshot_path).resolve() == Path(self.mem_file_path).resolve():
                raise ConfigError("snapshot: snapshot_path and mem_file_path are the same file")
        except OSError as exc:   # a name too long, a loop of links...
            raise ConfigError(f"snapshot: {exc.filename}: {exc.strerror}") from None


class MemBackend(Model):
    """Where a restored guest's memory comes from (Firecracker's ``mem_backend``)."""

    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(Model):
    """A restored network interface attached to another TAP (clones need one each)."""

    iface_id: str
    host_dev_name: str


class DriveOverride(Model):
    """kvmlet extension: a restored drive backed by another file (a clone's own copy of the disk)."""

    drive_id: str
    path_on_host: str


class VsockOverride(Model):
    """A restored vsock device listening on another Unix socket."""

    uds_path: str


class SnapshotLoadParams(Model):
    """``PUT /snapshot/load``: build the VM from a snapshot instead of booting it."""

    snapshot_path: str
    mem_file_path: str | None = None          # deprecated by Firecracker in favour of mem_backend
    mem_backend: MemBackend | None = None
    enable_diff_snapshots: bool = False       # deprecated by Firecracker: track_dirty_pages
    track_dirty_pages: bool = False
    resume_vm: bool = False
    network_overrides: list[NetworkOverride] = msgspec.field(default_factory=list)
    vsock_override: VsockOverride | None = None
    drive_overrides: list[DriveOverride] = msgspec.field(default_factory=list)   # kvmlet
    mem_copy: MemCopy = DEFAULT_MEM_COPY      # kvmlet: "background" copies the file's data in ahead of the guest

    @property
    def memory_path(self) -> str:
        if self.mem_backend is not None:
            return self.mem_backend.backend_path
        assert self.mem_file_path is not None
        return self.mem_file_path

    def validate(self) -> None:
        if (self.mem_file_path is None) == (self.mem_backend is None):
            raise ConfigError("snapshot load: give exactly one of mem_backend and mem_file_path")
        if self.mem_backend is not None and self.mem_backend.backend_type == "Uffd":
            raise UnsupportedError("snapshot load: the Uffd memory backend is not supported (use File)")
        unique([o.iface_id for o in self.network_overrides], "network_overrides iface_id")
        unique([o.drive_id for o in self.drive_overrides], "drive_overrides drive_id")
