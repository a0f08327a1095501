"""What a guest sees with a CPU model: the test guest's ``cpuid`` check reads leaf 0 and leaf 1 at CPL0 and
CPL3 (guest/README.md). This runs on VMX and SVM hosts only: under PVM a guest does not see the CPUID set
with KVM_SET_CPUID2 (CPL0 reads PVM's values, CPL3 the host's), and there the models are checked through
KVM_GET_CPUID2 and the migration gate instead (tests/test_cpu_models.py)."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from kvmlet.cpu.baseline import closest_model
from kvmlet.cpu.capture import capture_host
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.host.model import Backend
from kvmlet.host.virt import detect_backend
from kvmlet.memory import MiB
from tests.support.vmrun import built_machine, vm_config

LINE = re.compile(r"^(USER)?CPUID vendor=(\S+) leaf1\.ecx=0x([0-9a-f]{8}) leaf1\.edx=0x([0-9a-f]{8})", re.MULTILINE)
ECX_DYNAMIC = 1 << 27               # OSXSAVE: follows the guest's CR4
EDX_DYNAMIC = (1 << 9) | (1 << 28)  # APIC (follows APIC_BASE), HTT (topology)


@pytest.fixture(scope="module")
def hardware_backend() -> Backend:
    backend = detect_backend()
    if backend is Backend.PVM:
        pytest.skip("PVM host: a guest does not see the CPUID set with KVM_SET_CPUID2 (CPL0 reads PVM's values, "
                    "CPL3 the host's); models are checked through KVM_GET_CPUID2 and the gate instead")
    if backend is Backend.NONE:
        pytest.skip("no KVM back end detected")
    return backend


def test_the_guest_sees_the_models_cpuid(hardware_backend: Backend, guest_elf: Path) -> None:
    from kvmlet.cpu.plan import plan_cpu
    from kvmlet.kvm.system import Kvm

    host = capture_host()
    model = closest_model(host.vendor, host.features)
    assert model is not None, "this host offers not even x86-64-v1"
    config = vm_config(guest_elf, cmdline="console=ttyS0 kvmlet.test=cpuid", memory=64 * MiB)
    config = msgspec.structs.replace(
        config, machine_config=msgspec.structs.replace(config.machine_config, cpu_template=model.name))
    with Kvm() as kvm:
        expected = {(e.function, e.index): e for e in plan_cpu(kvm, model.name, None).vcpu_cpuid(0, 1)}[(1, 0)]
    console = BufferConsole()
    with built_machine(config, console=console) as machine:
        machine.start()
        machine.wait(60)
    output = console.output().decode(errors="replace")
    assert "TEST cpuid PASS" in output, output
    seen = LINE.findall(output)
    assert len(seen) == 2, output           # the kernel-mode and the user-mode view
    for _, vendor, ecx, edx in seen:
        assert vendor == host.vendor
        assert int(ecx, 16) & ~ECX_DYNAMIC == expected.ecx & ~ECX_DYNAMIC, f"{model.name}: {output}"
        assert int(edx, 16) & ~EDX_DYNAMIC == expected.edx & ~EDX_DYNAMIC, f"{model.name}: {output}"
