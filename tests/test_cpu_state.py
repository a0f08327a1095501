"""A vCPU's state captured from a paused VM and restored into a new VM continues the guest exactly.

Integration test on /dev/kvm: the second VM is built with the same build steps minus the kernel load (what a
restore from a snapshot does), gets a copy of the first one's memory, its interrupt controllers, timer and
clock, and the vCPU state; the guest then finishes its CPL3 loop there.
"""

from __future__ import annotations

import time
from pathlib import Path

from kvmlet.config import simple_config
from kvmlet.cpu.state import STATE_VERSION, capture, restore, save_msr_indices
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.eventloop import EventLoopThread
from kvmlet.kvm import constants as c
from kvmlet.machine import Machine, StopKind
from kvmlet.machine.builder import add_devices, build_machine, create_vcpus, create_vm, open_kvm

LOOPS = 10_000_000_000  # a CPL3 loop of seconds on any host: the pause lands in it


def _wait_for(console: BufferConsole, text: bytes, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in console.output():
        assert time.monotonic() < deadline, console.output()[-300:]
        time.sleep(0.005)


def test_a_paused_guest_continues_in_a_new_vm(guest_elf: Path) -> None:
    config = simple_config(guest_elf, cmdline=f"console=ttyS0 kvmlet.test=cpl3 kvmlet.loops={LOOPS}",
                           mem_size_mib=64, console="none")
    events = EventLoopThread()
    first_console, second_console = BufferConsole(), BufferConsole()
    first = build_machine(config, events, console=first_console)
    second = Machine(config, events, console=second_console)
    try:
        first.start()
        _wait_for(first_console, b"kvmlet-guest: boot")
        time.sleep(0.05)
        first.pause()
        assert b"CPL3 loops" not in first_console.output()    # paused inside the loop
        assert first.kvm is not None and first.vm is not None and first.memory is not None
        vcpu_state = capture(first.vcpus[0], save_msr_indices(first.kvm.msr_index_list()))
        assert vcpu_state.version == STATE_VERSION and vcpu_state.msrs
        chips = {chip: first.vm.get_irqchip(chip) for chip in
                 (c.KVM_IRQCHIP_PIC_MASTER, c.KVM_IRQCHIP_PIC_SLAVE, c.KVM_IRQCHIP_IOAPIC)}
        pit, clock = first.vm.get_pit2(), first.vm.get_clock()

        open_kvm(second)
        create_vm(second)
        add_devices(second)
        create_vcpus(second, boot=False)
        assert second.vm is not None and second.memory is not None
        for region in first.memory.regions:
            second.memory.write(region.gpa, first.memory.read(region.gpa, region.size))
        for chip, state in chips.items():
            second.vm.set_irqchip(chip, state)
        second.vm.set_pit2(pit)
        second.vm.set_clock(clock)
        assert restore(second.vcpus[0], vcpu_state) == []   # every MSR taken (under PVM the TSC is ignored)
        first.close()

        status = second.run(timeout=120)
        output = second_console.output().decode(errors="replace")
        assert status.kind is StopKind.GUEST_EXIT and status.code == 0, (status, output[-300:])
        assert f"CPL3 loops={LOOPS} cpl=3" in output and "TEST cpl3 PASS" in output
        assert "kvmlet-guest: boot" not in output     # it continued; it did not boot again
    finally:
        first.close()
        second.close()
        events.stop()
