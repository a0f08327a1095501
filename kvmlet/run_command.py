"""`kvmlet run`: build a VM from command-line options, run it, report how it ended."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from kvmlet.config import ConfigError, MachineConfig, parse_size


def _process_start_perf() -> float | None:
    """This process's start time on the perf_counter clock (10 ms resolution: /proc ticks)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        boot_now = time.clock_gettime(time.CLOCK_BOOTTIME)
        age = boot_now - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - age
    except (OSError, ValueError, IndexError):
        return None


def _print_boot_timer(marks: dict[str, float], start: float | None) -> None:
    order = ["cli", "machine", "image-read", "vm-created", "image-loaded", "vcpus-created", "start",
             "first-console-byte", "exit"]
    labels = {"cli": "interpreter start and imports", "machine": "configuration",
              "image-read": "image read", "vm-created": "VM, memory, irqchip, devices",
              "image-loaded": "image loaded", "vcpus-created": "vCPUs set up",
              "start": "threads started", "first-console-byte": "first console byte",
              "exit": "guest exit"}
    origin = start if start is not None else marks.get("cli", 0.0)
    previous = origin
    err = sys.stderr
    print("boot timer (ms since process start; process start is from /proc, 10 ms resolution):", file=err)
    for name in order:
        if name not in marks:
            continue
        at = marks[name]
        print(f"  {labels[name]:<32} {1000 * (at - origin):8.1f}  (+{1000 * (at - previous):.1f})", file=err)
        previous = at


def _print_stats(stats: list[dict[str, object]]) -> None:
    err = sys.stderr
    keys = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "signal_exits",
            "irq_window_exits", "insn_emulation", "insn_emulation_fail", "pf_taken", "hypercalls")
    for entry in stats:
        print(f"vCPU {entry['vcpu']} exits:", file=err)
        kvm_stats = entry["kvm"]
        assert isinstance(kvm_stats, dict)
        own = entry["kvmlet"]
        assert isinstance(own, dict)
        print("  KVM (binary stats):", file=err)
        for key in keys:
            if key in kvm_stats:
                print(f"    {key:<22} {kvm_stats[key]:>12}", file=err)
        print("  kvmlet (handled in user space):", file=err)
        for key, value in sorted(own.items(), key=lambda kv: -kv[1]):
            print(f"    {key:<22} {value:>12}", file=err)


def run_main(args: argparse.Namespace) -> int:
    cli_mark = time.perf_counter()
    from kvmlet.boot.errors import BootImageError
    from kvmlet.guest_image import GuestBuildError
    from kvmlet.kvm.errors import KvmError, KvmUnavailableError
    from kvmlet.memory import GuestMemoryError
    from kvmlet.vm import Machine, MachineError

    try:
        config = MachineConfig(kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                               vcpus=args.vcpus, memory=parse_size(args.memory), boot=args.boot,
                               console=args.console)
    except ConfigError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
        return 1
    machine = Machine(config)
    machine.timeline.marks["cli"] = cli_mark
    try:
        try:
            machine.build()
        except (ConfigError, BootImageError, GuestBuildError, KvmUnavailableError, KvmError,
                GuestMemoryError, MachineError, OSError) as exc:
            print(f"kvmlet: {exc}", file=sys.stderr)
            return 1
        for warning in machine.warnings:
            print(f"kvmlet: warning: {warning}", file=sys.stderr)
        signal.signal(signal.SIGTERM, lambda signum, frame: machine.request_stop())
        try:
            status = machine.run(timeout=args.timeout)
        except KeyboardInterrupt:  # SIGINT when the console is not a raw terminal
            machine.request_stop()
            status = machine.wait(10)
        machine.timeline.mark("exit")
        if args.stats:
            _print_stats(machine.exit_statistics())
    finally:
        machine.close()
    if args.boot_timer:
        _print_boot_timer(machine.timeline.marks, _process_start_perf())
    if status.kind.value not in ("guest-exit",):
        serial = machine.serial
        unfinished_line = serial is not None and serial.last_byte_out not in (None, 0x0A)
        if unfinished_line and args.console == "stdio":
            print(file=sys.stderr)  # the guest's last console line had no newline
        print(f"kvmlet: {status.message}", file=sys.stderr)
    return status.code
