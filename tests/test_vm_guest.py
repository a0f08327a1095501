"""The built-in test guest in real VMs: boot protocols, SMP, console, exit status, lifecycle."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kvmlet.boot.e820 import E820Entry
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.eventloop import EventLoopThread
from kvmlet.machine import Machine, StopKind, VmState
from tests.conftest import RunGuest


def _e820_lines(entries: list[E820Entry]) -> list[str]:
    return [f"E820 {e.addr:#018x} {e.addr + e.size - 1:#018x} {int(e.type)}" for e in entries]


@pytest.mark.parametrize("boot", ["linux64", "pvh"])
def test_guest_sees_e820_and_cmdline_kvmlet_passed(run_guest: RunGuest, boot: str) -> None:
    run = run_guest("serial,bootinfo,e820,cmdline", boot=boot, extra="kvmlet.marker=abc123")
    assert run.status.kind is StopKind.GUEST_EXIT and run.status.code == 0, run.output
    assert "TESTS DONE 4 0" in run.output
    assert run.lines("BOOT ") == [f"BOOT {'64bit' if boot == 'linux64' else 'pvh'}"]
    boot_info = run.machine.boot_info
    assert boot_info is not None
    assert run.lines("E820 ") == _e820_lines(boot_info.e820)
    assert run.lines("CMDLINE ") == [
        "CMDLINE console=ttyS0 kvmlet.test=serial,bootinfo,e820,cmdline kvmlet.marker=abc123"]


@pytest.mark.parametrize("vcpus", [1, 2])
def test_guest_boots_smp(run_guest: RunGuest, vcpus: int) -> None:
    run = run_guest("smp,cpl3", vcpus=vcpus, extra="kvmlet.loops=100000")
    assert run.status.code == 0, run.output
    assert f"SMP cpus={vcpus} started={vcpus - 1}" in run.output
    assert run.passed("smp") and run.passed("cpl3")


def test_more_vcpus_than_the_ebda_holds(run_guest: RunGuest) -> None:
    """48 vCPUs: more processor entries than the 1 KiB EBDA holds; the guest finds the configuration
    table in the BIOS area through the floating pointer and starts every application processor."""
    run = run_guest("smp", vcpus=48)
    assert run.status.code == 0, run.output
    assert "MPTABLE at=0x9fc00 config=0xf8000" in run.output
    assert f"apic_ids={','.join(map(str, range(48)))}" in run.output
    assert "SMP cpus=48 started=47" in run.output and run.passed("smp")


def test_exit_status_is_what_the_guest_reports(run_guest: RunGuest) -> None:
    run = run_guest("serial", extra="kvmlet.exit=7")
    assert run.status.kind is StopKind.GUEST_EXIT
    assert run.status.code == 7


def test_failed_check_gives_status_1(run_guest: RunGuest) -> None:
    run = run_guest("no-such-check")
    assert "TEST no-such-check FAIL unknown check" in run.output
    assert run.status.code == 1


def test_console_input_reaches_guest_through_receive_interrupt(run_guest: RunGuest) -> None:
    def type_line(machine: Machine, console: BufferConsole) -> None:
        assert console.wait_for(b"READY uart-rx", 30)
        console.feed(b"hello from the host\n")

    run = run_guest("uart-rx", during=type_line)
    assert "RX hello from the host" in run.output, run.output
    assert run.passed("uart-rx")
    assert run.machine.serial is not None and run.machine.serial.stats().interrupts > 0


def test_transmit_empty_interrupt(run_guest: RunGuest) -> None:
    run = run_guest("uart-thre")
    assert run.passed("uart-thre"), run.output


def test_emulation_failure_is_reported_not_a_hang(run_guest: RunGuest) -> None:
    started = time.monotonic()
    run = run_guest("serial,emufail", timeout=30)
    assert time.monotonic() - started < 25
    assert run.status.kind is StopKind.INTERNAL_ERROR, run.status
    assert "RIP 0x" in run.status.message and "instruction bytes" in run.status.message
    assert "TEST emufail FAIL continued" not in run.output


def test_pause_and_resume(run_guest: RunGuest) -> None:
    observed: dict[str, object] = {}

    def pause_resume(machine: Machine, console: BufferConsole) -> None:
        assert console.wait_for(b"HELLO", 30)
        machine.pause()
        observed["state"] = machine.state
        before = len(console.output())
        time.sleep(0.3)
        observed["quiet"] = len(console.output()) == before
        machine.resume()
        observed["resumed"] = machine.state

    run = run_guest("serial,cpl3,cpl3,cpl3", extra="kvmlet.loops=20000000", during=pause_resume)
    assert observed == {"state": VmState.PAUSED, "quiet": True, "resumed": VmState.RUNNING}
    assert run.status.code == 0 and "TESTS DONE 4 0" in run.output


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_shutdown_leaves_no_thread_or_fd(guest_elf: object, run_guest: RunGuest) -> None:
    run_guest("serial")  # warm up lazy imports and the guest build
    fds, threads = _open_fds(), set(threading.enumerate())
    for vcpus in (1, 2):
        run = run_guest("serial,smp", vcpus=vcpus)
        assert run.status.code == 0
    time.sleep(0.1)
    assert set(threading.enumerate()) - threads == set()
    assert _open_fds() - fds == set()


def test_stop_from_the_host_while_guest_runs(run_guest: RunGuest) -> None:
    def stop(machine: Machine, console: BufferConsole) -> None:
        assert console.wait_for(b"READY uart-rx", 30)
        machine.request_stop()

    run = run_guest("uart-rx", vcpus=2, during=stop)
    assert run.status.kind is StopKind.STOPPED


def test_emulation_failure_in_ram_shows_the_instruction_bytes(run_guest: RunGuest) -> None:
    """cmpxchg16b at CPL0: native on VT-x/AMD-V (the check passes), beyond KVM's emulator under PVM."""
    run = run_guest("serial,emufail-insn", timeout=30)
    if run.status.kind is StopKind.GUEST_EXIT:
        assert run.passed("emufail-insn")
        return
    assert run.status.kind is StopKind.INTERNAL_ERROR, run.status
    assert "instruction bytes: f0 48 0f c7" in run.status.message  # lock cmpxchg16b


def test_a_guest_that_crashes_does_not_exit_0(tmp_path: Path) -> None:
    """ud2 with no IDT: #UD, #DF, triple fault. A crash must never read as success."""
    from tests.support.boot_images import Seg, make_elf
    from tests.support.vmrun import built_machine, vm_config

    image = tmp_path / "crash.elf"
    image.write_bytes(make_elf([Seg(paddr=0x100000, data=b"\x0f\x0b")], entry=0x100000))
    with built_machine(vm_config(image, cmdline="", memory=32 << 20), console=BufferConsole()) as machine:
        status = machine.run(timeout=30)
    assert status.kind is StopKind.TRIPLE_FAULT
    assert status.code == 3 and "triple-faulted" in status.message


def test_guest_status_above_255_is_not_success(guest_elf: Path) -> None:
    from kvmlet.config import simple_config

    events = EventLoopThread()
    machine = Machine(simple_config(guest_elf), events, console=BufferConsole())
    try:
        machine.guest_exit(256)  # what a 16-bit write of 0x100 to port 0x501 reports
        assert machine.exit_status is not None and machine.exit_status.code == 255
        assert machine.exit_status.warning is not None and "256" in machine.exit_status.warning
    finally:
        machine.close()
        events.stop()
