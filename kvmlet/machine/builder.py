"""Building a machine from a configuration: a sequence of steps, each usable on its own.

``build_machine`` runs them all for a fresh boot: open KVM and check the configuration against it, read
the images, create the VM (memory, interrupt controllers, GSI routing, timer), add the devices, load the
kernel, create the vCPUs with their boot registers. A restore from a snapshot runs the same steps except
the image reading and loading, and sets the vCPUs' saved state instead of boot registers.
Nothing here knows the test guest: the caller resolves what to boot (``kvmlet.guest_image``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvmlet.config.models import VmConfig
from kvmlet.kvm import constants as c
from kvmlet.machine.machine import Machine
from kvmlet.machine.state import MachineError

if TYPE_CHECKING:
    from kvmlet.boot.loader import KernelImage
    from kvmlet.devices.legacy.console import Console
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.memory import GuestMemory

REQUIRED_CAPS = ((c.Cap.IRQCHIP, "the in-kernel interrupt controllers"), (c.Cap.IRQFD, "device interrupts"),
                 (c.Cap.IOEVENTFD, "device notifications"), (c.Cap.USER_MEMORY, "guest memory"),
                 (c.Cap.IMMEDIATE_EXIT, "pausing vCPUs"), (c.Cap.PIT2, "the in-kernel timer"))
PVM_LINUX_WARNING = (
    "this host's KVM is PVM (software virtualization, no VT-x/AMD-V) and this Linux kernel is not PVM-aware: "
    "its kernel-mode code is emulated, so it prints its early boot log and then stops (emulation failure). "
    "Boot a PVM guest kernel, or use a VMX/SVM host")


def preload() -> None:
    """Import what building a machine needs (a server does this while it waits for its first VM, so that
    InstanceStart does not pay for the imports)."""
    import kvmlet.boot.loader
    import kvmlet.cpu.setup
    import kvmlet.devices.factory
    import kvmlet.devices.legacy.console
    import kvmlet.devices.legacy.debug_exit
    import kvmlet.devices.legacy.i8042
    import kvmlet.devices.legacy.post_code
    import kvmlet.devices.legacy.serial
    import kvmlet.devices.manager
    import kvmlet.host.virt
    import kvmlet.kvm.system
    import kvmlet.memory
    import kvmlet.vcpu_runner  # noqa: F401


def build_machine(config: VmConfig, events: EventLoopThread, *, console: Console | None = None,
                  kernel_image: bytes | None = None) -> Machine:
    """A machine ready to ``start()``; on failure everything created so far is released."""
    machine = Machine(config, events, console)
    try:
        open_kvm(machine)
        kernel, initrd = read_images(machine, kernel_image)
        create_vm(machine)
        add_devices(machine)
        load_kernel(machine, kernel, initrd)
        create_vcpus(machine, boot=True)
    except BaseException:
        try:
            machine.close()
        except MachineError:
            pass  # the build failure is the error worth reporting
        raise
    return machine


def open_kvm(machine: Machine, *, restoring: bool = False) -> None:
    """Open /dev/kvm, require what kvmlet needs, check the configuration against this host (``restoring``:
    a snapshot's, which boots no kernel)."""
    from kvmlet.kvm.system import Kvm
    from kvmlet.vcpu_kick import install_kick_handler

    install_kick_handler()
    machine.kvm = kvm = Kvm()
    for cap, purpose in REQUIRED_CAPS:
        kvm.require(cap, purpose)
    machine.config.validate(kvm.max_vcpus, restoring=restoring)


def read_images(machine: Machine, kernel_image: bytes | None = None) -> tuple[KernelImage, bytes | None]:
    from kvmlet.boot.errors import BootImageError
    from kvmlet.boot.loader import identify_kernel

    boot = machine.config.boot_source
    assert boot is not None  # validate() requires it
    if kernel_image is None:
        try:
            kernel_image = Path(boot.kernel_image_path).read_bytes()
        except OSError as exc:
            raise MachineError(f"cannot read kernel {boot.kernel_image_path}: {exc.strerror}") from None
    kernel = identify_kernel(kernel_image, Path(boot.kernel_image_path))
    if kernel.linux_version and not kernel.pvm_aware and _pvm_host():
        machine.warnings.append(PVM_LINUX_WARNING)
    initrd = None
    if boot.initrd_path is not None:
        path = Path(boot.initrd_path)
        size = path.stat().st_size
        memory = machine.config.machine_config.memory_bytes
        if size > memory:  # refuse before reading a file that cannot fit anyway
            raise BootImageError(f"initrd {path} is {size / (1 << 20):.1f} MiB, more than the guest's "
                                 f"{memory >> 20} MiB of memory")
        initrd = path.read_bytes()
    machine.timeline.mark("image-read")
    return kernel, initrd


def _pvm_host() -> bool:
    from kvmlet.host.model import Backend
    from kvmlet.host.virt import detect_backend

    return detect_backend() is Backend.PVM


def create_vm(machine: Machine, memory: GuestMemory | None = None) -> None:
    """The KVM VM, its guest memory slots (``memory``, or new zeroed memory), interrupt controllers, GSI
    routing and timer; dirty-page logging from the start if the configuration tracks dirty pages."""
    from kvmlet.devices.manager import DeviceManager
    from kvmlet.memory import GuestMemory, GuestMemoryError
    from kvmlet.snapshot.dirty import DirtyLog

    assert machine.kvm is not None
    if memory is not None:
        machine.memory = memory   # owned by the machine from here on (closed with it)
    machine.vm = vm = machine.kvm.create_vm()
    vm.set_tss_address()
    vm.set_identity_map_address()
    size = machine.config.machine_config.memory_bytes
    if memory is None:
        try:
            machine.memory = memory = GuestMemory.with_size(size)
        except GuestMemoryError as exc:
            raise MachineError(f"guest memory: {exc}") from None
        except OSError as exc:
            raise MachineError(f"cannot allocate {size >> 20} MiB of guest memory: {exc.strerror}") from None
    track = machine.config.machine_config.track_dirty_pages
    for region in memory.regions:
        vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address, log_dirty=track)
    machine.dirty_log = DirtyLog(vm, memory)
    if track:
        machine.dirty_log.start()
    vm.create_irqchip()
    machine.devices = DeviceManager(vm, memory, machine.events, machine.pio, machine.mmio)
    machine.devices.routing.set_pc_routes()
    vm.create_pit2()


def add_devices(machine: Machine) -> None:
    """The legacy devices, then every device the configuration asks for."""
    from kvmlet.devices.factory import add_configured_devices, add_legacy_devices
    from kvmlet.devices.legacy.console import console_from_spec

    assert machine.devices is not None
    if machine.console is None:
        machine.console = console_from_spec(machine.config.console, on_escape=machine.request_stop,
                                            on_snapshot=machine.snapshot_from_console)
    machine.legacy = add_legacy_devices(machine.devices, machine.console, on_first_byte=machine.first_byte,
                                        on_reset=machine.guest_reset, on_exit=machine.guest_exit)
    add_configured_devices(machine.devices, machine.config)
    machine.timeline.mark("vm-created")


def load_kernel(machine: Machine, kernel: KernelImage, initrd: bytes | None) -> None:
    from kvmlet.boot.acpi import AcpiExtras
    from kvmlet.boot.loader import BootProtocol, load
    from kvmlet.devices.vmgenid import write_generation_id

    assert machine.memory is not None and machine.devices is not None and machine.config.boot_source
    cmdline = machine.devices.extend_cmdline(machine.config.kernel_cmdline())
    tpm = None
    if machine.config.tpm is not None:   # measured launch: policy, measurements, vTPM (kvmlet.tpm.launch)
        from kvmlet.tpm.launch import measured_launch

        tpm = measured_launch(machine.config, machine.devices, kernel.data, initrd, cmdline)
        machine.timeline.mark("measured")
    acpi, reserved = machine.devices.acpi()      # the PCI host bridge and VT-d unit (MCFG, DMAR, DSDT)
    if tpm is not None:
        acpi = tpm.acpi if acpi is None else AcpiExtras(tpm.acpi.tables + acpi.tables,
                                                        tpm.acpi.dsdt_aml + acpi.dsdt_aml)
        reserved = tuple(tpm.reserved) + reserved
    machine.boot_info = load(machine.memory, kernel, cmdline=cmdline, initrd=initrd,
                             protocol=BootProtocol(machine.config.boot_source.boot_protocol),
                             cpus=machine.config.machine_config.vcpu_count, acpi=acpi, reserved=reserved)
    if tpm is not None:
        tpm.write_log(machine.memory)
    machine.generation_id = write_generation_id(machine.memory)   # the VMGENID device's first generation
    machine.timeline.mark("image-loaded")


def create_vcpus(machine: Machine, *, boot: bool, configure: bool = True) -> None:
    """Every vCPU with its CPUID and MSRs (the CPU model and custom template, checked against this host
    first: kvmlet.cpu.plan); with ``boot``, vCPU 0 gets the boot protocol's registers.
    ``configure=False`` (a restore, which sets every vCPU's saved state next): the vCPUs only."""
    from kvmlet.cpu.plan import plan_cpu
    from kvmlet.cpu.setup import configure_vcpu, set_boot_registers
    from kvmlet.vcpu_runner import VcpuThread

    assert machine.kvm is not None and machine.vm is not None
    config = machine.config
    cpu = plan_cpu(machine.kvm, config.machine_config.cpu_template, config.cpu_config) if configure else None
    if cpu is not None:
        machine.cpu_plan = cpu
    count = config.machine_config.vcpu_count
    for index in range(count):
        vcpu = machine.vm.create_vcpu(index)
        if cpu is not None:
            machine.warnings.extend(configure_vcpu(vcpu, cpu, count))
        if boot and index == 0:
            assert machine.boot_info is not None
            set_boot_registers(vcpu, machine.boot_info.cpu_state)
        machine.vcpus.append(vcpu)
        machine.threads.append(VcpuThread(vcpu, machine.pio, machine.mmio, machine.vcpu_stopped,
                                          machine.describe_failure))
    machine.timeline.mark("vcpus-created")
