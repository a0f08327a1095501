"""Linux as the reference client of the boot protocol: Debian's cloud kernel prints what kvmlet passed.

On PVM hosts the stock kernel stops after its early log (see shared/PLATFORM.md); the early log is
all these tests read, so they hold on VMX/SVM hosts too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvmlet.boot.e820 import E820Entry, E820Type
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.machine import Machine
from kvmlet.memory import MiB
from tests.support.debian_kernel import DebianKernel, debian_cloud_kernel
from tests.support.initrd import make_initrd
from tests.support.vmrun import built_machine, vm_config

CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0 noxsave clearcpuid=141 kvmlet.marker=reference-check"
LINUX_E820_NAMES = {E820Type.RAM: "usable", E820Type.RESERVED: "reserved", E820Type.ACPI: "ACPI data",
                    E820Type.NVS: "ACPI NVS", E820Type.UNUSABLE: "unusable"}
PAGE = 4096


@pytest.fixture(scope="module")
def kernel() -> DebianKernel:
    return debian_cloud_kernel()


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("initrd") / "initrd.cpio"
    path.write_bytes(make_initrd({"init": b"#!/bin/sh\necho hi\n", "data/blob": bytes(range(256)) * 700}))
    return path


def _boot_until(kernel_path: Path, initrd: Path | None, boot: str, marker: bytes, timeout: float,
                vcpus: int = 1) -> tuple[Machine, str]:
    console = BufferConsole()
    config = vm_config(kernel_path, initrd=initrd, cmdline=CMDLINE, memory=256 * MiB, boot=boot, vcpus=vcpus)
    with built_machine(config, console=console) as machine:
        machine.start()
        seen = console.wait_for(marker, timeout)
        if seen:  # let the rest of that line arrive
            console.wait_for(b"\n", 10, start=console.output().find(marker))
        machine.request_stop()
        machine.wait(10)
    text = console.output().decode(errors="replace")
    assert seen, f"{marker!r} not printed within {timeout} s; the kernel printed:\n{text[-3000:]}"
    return machine, text


def _linux_e820(text: str) -> list[str]:
    return re.findall(r"BIOS-e820: (\[mem 0x[0-9a-f]+-0x[0-9a-f]+\] [A-Za-z ]+?)\s*$", text, re.MULTILINE)


def _expected_e820(entries: list[E820Entry], boot: str) -> list[str]:
    spans = [(e.addr, e.addr + e.size, e.type) for e in entries]
    if boot == "pvh":
        # Linux's PVH entry adds the ISA hole (0xa0000-0xfffff) as reserved to the map it was given,
        # then merges adjacent entries of one type (arch/x86/platform/pvh/enlighten.c).
        spans = sorted([*spans, (0xA0000, 0x100000, E820Type.RESERVED)])
        merged: list[tuple[int, int, E820Type]] = []
        for start, end, kind in spans:
            if merged and merged[-1][2] == kind and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]), kind)
            else:
                merged.append((start, end, kind))
        spans = merged
    return [f"[mem {start:#018x}-{end - 1:#018x}] {LINUX_E820_NAMES[kind]}" for start, end, kind in spans]


@pytest.mark.parametrize("boot", ["linux64", "pvh"])
def test_vmlinux_early_log_shows_what_kvmlet_passed(kernel: DebianKernel, initrd: Path, boot: str) -> None:
    machine, text = _boot_until(kernel.vmlinux, initrd, boot, b"RAMDISK:", 120, vcpus=2)
    assert f"Linux version {kernel.version}" in text
    assert f"Command line: {CMDLINE}" in text
    assert "Hypervisor detected: KVM" in text
    info = machine.boot_info
    assert info is not None and info.initrd_range is not None
    assert _linux_e820(text) == _expected_e820(info.e820, boot)
    start, end = info.initrd_range
    shown_end = ((end + PAGE - 1) // PAGE) * PAGE - 1
    assert f"RAMDISK: [mem {start:#010x}-{shown_end:#010x}]" in text


def test_vmlinux_finds_both_cpus_in_acpi_madt(kernel: DebianKernel) -> None:
    _, text = _boot_until(kernel.vmlinux, None, "linux64", b"Allowing", 120, vcpus=2)
    assert "Allowing 2 CPUs" in text, text[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_bzimage_boots_through_its_decompressor(kernel: DebianKernel, initrd: Path) -> None:
    """The decompressor runs emulated on PVM (about 100 s) and prints nothing in Debian's build."""
    _, text = _boot_until(kernel.bzimage, initrd, "linux64", b"Command line:", 240)
    assert f"Linux version {kernel.version}" in text
    assert f"Command line: {CMDLINE}" in text
