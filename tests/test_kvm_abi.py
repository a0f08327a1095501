"""The ctypes layouts and ioctl numbers match the kernel headers (compiled with gcc against <linux/kvm.h>)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from kvmlet.kvm import constants as c
from kvmlet.kvm import structs as s

STRUCTS = ["kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu", "kvm_xsave", "kvm_xcr", "kvm_xcrs",
           "kvm_lapic_state", "kvm_msr_entry", "kvm_cpuid_entry2", "kvm_mp_state", "kvm_vcpu_events",
           "kvm_userspace_memory_region", "kvm_irqfd", "kvm_ioeventfd", "kvm_msi", "kvm_irq_level",
           "kvm_clock_data", "kvm_pit_config", "kvm_dirty_log", "kvm_enable_cap", "kvm_translation",
           "kvm_stats_header", "kvm_irq_routing_entry", "kvm_irqchip", "kvm_pit_state2", "kvm_debugregs"]
HEADER_ONLY = {"kvm_msrs_header": "kvm_msrs", "kvm_cpuid2_header": "kvm_cpuid2",
               "kvm_irq_routing_header": "kvm_irq_routing"}
IOCTLS = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
          "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_GET_EMULATED_CPUID",
          "KVM_GET_MSR_FEATURE_INDEX_LIST", "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG",
          "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CREATE_IRQCHIP",
          "KVM_IRQ_LINE", "KVM_IRQ_LINE_STATUS", "KVM_SET_GSI_ROUTING", "KVM_IRQFD", "KVM_CREATE_PIT2",
          "KVM_SET_BOOT_CPU_ID", "KVM_IOEVENTFD", "KVM_SET_CLOCK", "KVM_GET_CLOCK", "KVM_ENABLE_CAP",
          "KVM_SIGNAL_MSI", "KVM_GET_STATS_FD", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS",
          "KVM_SET_SREGS", "KVM_TRANSLATE", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_FPU", "KVM_SET_FPU",
          "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2", "KVM_GET_CPUID2", "KVM_GET_MP_STATE",
          "KVM_SET_MP_STATE", "KVM_NMI", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "KVM_GET_XSAVE",
          "KVM_SET_XSAVE", "KVM_GET_XCRS", "KVM_SET_XCRS", "KVM_GET_TSC_KHZ", "KVM_GET_XSAVE2",
          "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_GET_PIT2", "KVM_SET_PIT2", "KVM_GET_DEBUGREGS",
          "KVM_SET_DEBUGREGS", "KVM_SET_TSC_KHZ"]


@pytest.fixture(scope="module")
def kernel_abi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not Path("/usr/include/linux/kvm.h").exists() or shutil.which("gcc") is None:
        pytest.fail("the ABI check needs gcc and the kernel headers (linux-libc-dev); scripts/setup.sh installs them")
    src = tmp_path_factory.mktemp("abi") / "abi.c"
    lines = ["#include <stdio.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for name in STRUCTS + list(HEADER_ONLY.values()):
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
    for name in IOCTLS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long){name});')
    lines.append('printf("kvm_run_exit_reason %zu\\n", __builtin_offsetof(struct kvm_run, exit_reason));')
    lines.append('printf("kvm_run_immediate_exit %zu\\n", __builtin_offsetof(struct kvm_run, immediate_exit));')
    lines.append('printf("kvm_run_io %zu\\n", __builtin_offsetof(struct kvm_run, io));')
    lines.append('printf("kvm_run_mmio_data %zu\\n", __builtin_offsetof(struct kvm_run, mmio.data));')
    lines.append("return 0; }")
    src.write_text("\n".join(lines))
    binary = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(binary), str(src)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_size_matches_kernel(kernel_abi: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(getattr(s, name)) == kernel_abi[name]


@pytest.mark.parametrize("ours,theirs", sorted(HEADER_ONLY.items()))
def test_variable_length_headers(kernel_abi: dict[str, int], ours: str, theirs: str) -> None:
    assert ctypes.sizeof(getattr(s, ours)) == kernel_abi[theirs]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_kernel(kernel_abi: dict[str, int], name: str) -> None:
    assert getattr(c, name) == kernel_abi[name], f"{name}: {getattr(c, name):#x} != {kernel_abi[name]:#x}"


def test_kvm_run_offsets(kernel_abi: dict[str, int]) -> None:
    assert kernel_abi["kvm_run_exit_reason"] == s.RUN_EXIT_REASON
    assert kernel_abi["kvm_run_immediate_exit"] == s.RUN_IMMEDIATE_EXIT
    assert kernel_abi["kvm_run_io"] == s.RUN_IO
    assert kernel_abi["kvm_run_mmio_data"] == s.RUN_MMIO + 8
