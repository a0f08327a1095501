"""ctypes layouts of the KVM ABI structures (x86-64), as in <linux/kvm.h> and <asm/kvm.h>.

These are used only at the ioctl boundary; the rest of kvmlet works with dataclasses.
Their sizes are checked against the kernel headers in tests/test_kvm_structs.py.
"""

from __future__ import annotations

import ctypes

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s32 = ctypes.c_int32


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
        ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
        ("unusable", u8), ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
        ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32), ("pad2", u32),
    ]


class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs_header(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


def kvm_msrs(count: int) -> ctypes.Structure:
    """A ``struct kvm_msrs`` with room for ``count`` entries."""

    class _kvm_msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * count)]

    return _kvm_msrs()


def kvm_msr_list(count: int) -> ctypes.Structure:
    """A ``struct kvm_msr_list`` with room for ``count`` indices."""

    class _kvm_msr_list(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * count)]

    return _kvm_msr_list()


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
        ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]


class kvm_cpuid2_header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


def kvm_cpuid2(count: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``count`` entries."""

    class _kvm_cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * count)]

    return _kvm_cpuid2()


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class _events_exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _events_interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _events_nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _events_smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _events_exception), ("interrupt", _events_interrupt), ("nmi", _events_nmi),
        ("sipi_vector", u32), ("flags", u32), ("smi", _events_smi),
        ("triple_fault_pending", u8), ("reserved", u8 * 26), ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32), ("pad", u8 * 36),
    ]


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32), ("devid", u32),
        ("pad", u8 * 12),
    ]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


KVM_IRQCHIP_STATE_SIZE = 512  # the union of kvm_pic_state and kvm_ioapic_state, kept as bytes


class kvm_irqchip(ctypes.Structure):
    """KVM_GET/SET_IRQCHIP: one in-kernel interrupt controller's state (chip_id: PIC master, slave, IOAPIC)."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * KVM_IRQCHIP_STATE_SIZE)]


class kvm_pit_state2(ctypes.Structure):
    """KVM_GET/SET_PIT2: the in-kernel PIT's three channels (3 x 24 bytes, kept as bytes) and flags."""

    _fields_ = [("channels", u8 * 72), ("flags", u32), ("reserved", u32 * 9)]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", u64), ("physical_address", u64), ("valid", u8), ("writeable", u8),
        ("usermode", u8), ("pad", u8 * 5),
    ]


class kvm_stats_header(ctypes.Structure):
    _fields_ = [
        ("flags", u32), ("name_size", u32), ("num_desc", u32), ("id_offset", u32),
        ("desc_offset", u32), ("data_offset", u32),
    ]


class kvm_stats_desc_header(ctypes.Structure):
    _fields_ = [
        ("flags", u32), ("exponent", ctypes.c_int16), ("size", u16), ("offset", u32),
        ("bucket_size", u32),
    ]


# -- struct kvm_run (the page shared with KVM_RUN) ----------------------------------------------------
RUN_EXIT_REASON = 8
RUN_IMMEDIATE_EXIT = 1
RUN_IF_FLAG = 13
RUN_EXIT_UNION = 32           # offset of the exit union (256 bytes)
RUN_IO = RUN_EXIT_UNION       # u8 direction, u8 size, u16 port, u32 count, u64 data_offset
RUN_MMIO = RUN_EXIT_UNION     # u64 phys_addr, u8 data[8], u32 len, u8 is_write
RUN_INTERNAL = RUN_EXIT_UNION  # u32 suberror, u32 ndata, u64 data[16]
RUN_SYSTEM_EVENT = RUN_EXIT_UNION  # u32 type, u32 ndata, u64 data[16]
RUN_FAIL_ENTRY = RUN_EXIT_UNION    # u64 hardware_entry_failure_reason, u32 cpu
RUN_EXCEPTION = RUN_EXIT_UNION     # u32 exception, u32 error_code


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32), ("pad", u32 * 6)]


class kvm_irq_routing_msi(ctypes.Structure):
    """The MSI member of the routing entry's union (same 32 bytes as the irqchip member)."""

    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32), ("pad", u32 * 4)]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", kvm_irq_routing_irqchip)]


class kvm_irq_routing_header(ctypes.Structure):
    _fields_ = [("nr", u32), ("flags", u32)]


def kvm_irq_routing(count: int) -> ctypes.Structure:
    """A ``struct kvm_irq_routing`` with room for ``count`` entries."""

    class _kvm_irq_routing(ctypes.Structure):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * count)]

    return _kvm_irq_routing()
