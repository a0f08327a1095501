"""The KVM bindings against the real /dev/kvm: capabilities, CPUID, MSRs, VM and vCPU state round trips."""

from __future__ import annotations

import pytest

from kvmlet.devices.manager import GsiRouting
from kvmlet.kvm import Cap, Kvm, KvmUnavailableError
from kvmlet.kvm import constants as c
from kvmlet.kvm.constants import MpState
from kvmlet.memory import GuestMemory, MiB


def test_missing_device_is_one_clear_line(tmp_path: object) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist: this host offers no KVM"):
        Kvm("/nonexistent/kvm")


def test_not_a_kvm_device(tmp_path: object) -> None:
    with pytest.raises(KvmUnavailableError, match="not a KVM device"):
        Kvm("/dev/null")


def test_missing_capability_names_what_needs_it() -> None:
    with Kvm() as kvm:
        absent = [cap for cap in Cap if not kvm.check_extension(cap)]
        if not absent:
            pytest.skip("this host's KVM has every capability kvmlet knows of")
        with pytest.raises(KvmUnavailableError, match=f"lacks KVM_CAP_{absent[0].name}, which kvmlet needs for tests"):
            kvm.require(absent[0], "tests")


def test_system_queries() -> None:
    with Kvm() as kvm:
        assert kvm.api_version == 12
        assert kvm.vcpu_mmap_size >= 4096
        assert kvm.check_extension(Cap.IRQCHIP) > 0
        leaves = {e.function for e in kvm.supported_cpuid()}
        assert 0 in leaves and 1 in leaves
        assert len(kvm.msr_index_list()) > 5
        features = kvm.msr_feature_index_list()
        assert set(kvm.msr_features(features)) <= set(features)


def test_vm_and_vcpu_state_round_trip() -> None:
    with Kvm() as kvm:
        vm = kvm.create_vm()
        memory = GuestMemory.with_size(16 * MiB)
        try:
            vm.set_tss_address()
            vm.set_identity_map_address()
            region = memory.regions[0]
            vm.set_user_memory_region(0, region.gpa, region.size, region.host_address, log_dirty=True)
            vm.create_irqchip()
            GsiRouting(vm).set_pc_routes()
            vm.create_pit2()
            vcpu = vm.create_vcpu(0)
            regs = vcpu.get_regs()
            regs.rax, regs.rip = 0x1234, 0x100000
            vcpu.set_regs(regs)
            assert (vcpu.get_regs().rax, vcpu.get_regs().rip) == (0x1234, 0x100000)
            sregs = vcpu.get_sregs()
            vcpu.set_sregs(sregs)
            vcpu.set_fpu(vcpu.get_fpu())
            area = vcpu.get_xsave()
            vcpu.set_xsave(area)
            vcpu.set_xcrs(vcpu.get_xcrs())
            vcpu.set_lapic(vcpu.get_lapic())
            vcpu.set_vcpu_events(vcpu.get_vcpu_events())
            assert vcpu.get_mp_state() is MpState.RUNNABLE
            cpuid = kvm.supported_cpuid()
            vcpu.set_cpuid(cpuid)
            # KVM keeps every leaf it was given except those of dynamically enabled XSAVE features the
            # process has no permission for (ARCH_REQ_XCOMP_GUEST_PERM): on hosts with AMX it drops the
            # tile leaves 0x1d and 0x1e and the AVX10 leaf 0x24; elsewhere nothing
            given = {(e.function, e.index) for e in cpuid}
            kept = {(e.function, e.index) for e in vcpu.get_cpuid()}
            assert kept <= given
            assert {function for function, _ in given - kept} <= {0x1D, 0x1E, 0x24}
            msrs = vcpu.get_msrs(kvm.msr_index_list())
            assert msrs
            stats = vcpu.stats()
            assert "exits" in stats.read()
            stats.close()
            vm_stats = vm.stats()
            assert vm_stats.read()
            vm_stats.close()
            bitmap = vm.get_dirty_log(0, region.size // 4096)
            assert len(bitmap) == region.size // 4096 // 8
            clock = vm.get_clock()
            vm.set_clock(clock)
            assert vm.signal_msi(0xFEE00000, 0x30) >= 0
            # the state a snapshot saves: interrupt controllers, the PIT, debug registers, the TSC rate
            for chip in (c.KVM_IRQCHIP_PIC_MASTER, c.KVM_IRQCHIP_PIC_SLAVE, c.KVM_IRQCHIP_IOAPIC):
                state = vm.get_irqchip(chip)
                assert len(state) == 512
                vm.set_irqchip(chip, state)
                assert vm.get_irqchip(chip) == state
            pit = vm.get_pit2()
            vm.set_pit2(pit)
            assert len(vm.get_pit2()) == len(pit)
            debugregs = vcpu.get_debugregs()
            debugregs.db[0] = 0x1000
            vcpu.set_debugregs(debugregs)
            assert vcpu.get_debugregs().db[0] == 0x1000
            assert vcpu.get_tsc_khz() > 0
        finally:
            vm.close()
            memory.close()
