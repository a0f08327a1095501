"""KVM ioctl numbers, capabilities and exit reasons (x86-64)."""

from __future__ import annotations

import ctypes
import enum

from kvmlet.kvm import structs as s

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, struct: type[ctypes.Structure] | int) -> int:
    size = struct if isinstance(struct, int) else ctypes.sizeof(struct)
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, struct: type[ctypes.Structure] | int) -> int:
    size = struct if isinstance(struct, int) else ctypes.sizeof(struct)
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, struct: type[ctypes.Structure] | int) -> int:
    size = struct if isinstance(struct, int) else ctypes.sizeof(struct)
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, s.kvm_cpuid2_header)
KVM_GET_EMULATED_CPUID = _iowr(0x09, s.kvm_cpuid2_header)
KVM_GET_MSR_FEATURE_INDEX_LIST = _iowr(0x0A, 4)

# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, s.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, s.kvm_irq_level)
KVM_GET_IRQCHIP = _iowr(0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, s.kvm_irqchip)    # sic: the kernel declares it _IOR
KVM_IRQ_LINE_STATUS = _iowr(0x67, s.kvm_irq_level)
KVM_SET_GSI_ROUTING = _iow(0x6A, s.kvm_irq_routing_header)
KVM_IRQFD = _iow(0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, s.kvm_pit_config)
KVM_SET_BOOT_CPU_ID = _io(0x78)
KVM_IOEVENTFD = _iow(0x79, s.kvm_ioeventfd)
KVM_SET_CLOCK = _iow(0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, s.kvm_clock_data)
KVM_ENABLE_CAP = _iow(0xA3, s.kvm_enable_cap)
KVM_GET_PIT2 = _ior(0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, s.kvm_pit_state2)
KVM_SIGNAL_MSI = _iow(0xA5, s.kvm_msi)
KVM_GET_STATS_FD = _io(0xCE)

# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, s.kvm_regs)
KVM_SET_REGS = _iow(0x82, s.kvm_regs)
KVM_GET_SREGS = _ior(0x83, s.kvm_sregs)
KVM_SET_SREGS = _iow(0x84, s.kvm_sregs)
KVM_TRANSLATE = _iowr(0x85, s.kvm_translation)
KVM_GET_MSRS = _iowr(0x88, s.kvm_msrs_header)
KVM_SET_MSRS = _iow(0x89, s.kvm_msrs_header)
KVM_GET_FPU = _ior(0x8C, s.kvm_fpu)
KVM_SET_FPU = _iow(0x8D, s.kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, s.kvm_cpuid2_header)
KVM_GET_CPUID2 = _iowr(0x91, s.kvm_cpuid2_header)
KVM_GET_MP_STATE = _ior(0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, s.kvm_mp_state)
KVM_NMI = _io(0x9A)
KVM_GET_VCPU_EVENTS = _ior(0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, s.kvm_debugregs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_XSAVE = _ior(0xA4, s.kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, s.kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, s.kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, s.kvm_xcrs)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE2 = _ior(0xCF, s.kvm_xsave)

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# Addresses KVM needs for VMX's real-mode emulation (three pages for the TSS, one for the map),
# placed just below the 4 GiB boundary where nothing else lives.
KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000


class Cap(enum.IntEnum):
    """KVM capabilities kvmlet asks about (KVM_CAP_*)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    COALESCED_MMIO = 15
    SYNC_MMU = 16
    USER_NMI = 22
    IRQ_ROUTING = 25
    MCE = 31
    IRQFD = 32
    PIT2 = 33
    SET_BOOT_CPU_ID = 34
    PIT_STATE2 = 35
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    ENABLE_CAP = 54
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    TSC_DEADLINE_TIMER = 72
    KVMCLOCK_CTRL = 76
    SIGNAL_MSI = 77
    READONLY_MEM = 81
    IRQFD_RESAMPLE = 82
    ENABLE_CAP_VM = 98
    CHECK_EXTENSION_VM = 105
    X86_SMM = 117
    SPLIT_IRQCHIP = 121
    MAX_VCPU_ID = 128
    X2APIC_API = 129
    IMMEDIATE_EXIT = 136
    X86_DISABLE_EXITS = 143
    GET_MSR_FEATURES = 153
    NESTED_STATE = 157
    COALESCED_PIO = 162
    EXCEPTION_PAYLOAD = 164
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    HALT_POLL = 182
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    DIRTY_LOG_RING = 192
    X86_BUS_LOCK_EXIT = 193
    SREGS2 = 200
    BINARY_STATS_FD = 203
    EXIT_ON_EMULATION_FAILURE = 204
    VM_GPA_BITS = 207
    XSAVE2 = 208
    SYSTEM_EVENT_DATA = 215
    X86_TRIPLE_FAULT_EVENT = 218
    X86_NOTIFY_VMEXIT = 219
    GUEST_MEMFD = 234


class ExitReason(enum.IntEnum):
    """KVM_EXIT_* values reported in kvm_run.exit_reason."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    WATCHDOG = 21
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37
    MEMORY_FAULT = 39


class InternalError(enum.IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


class SystemEvent(enum.IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class MpState(enum.IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
