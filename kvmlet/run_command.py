"""`kvmlet run`: build a VM from command-line options, run it, report how it ended."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, TypeVar

from kvmlet.errors import ConfigError
from kvmlet.jsonfile import read_json_file

if TYPE_CHECKING:
    from kvmlet.config import MachineConfig, VmConfig
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.machine import ExitStatus, Machine

T = TypeVar("T")

BOOT_TIMER_ORIGIN_ENV = "KVMLET_BOOT_TIMER_ORIGIN"
"""A CLOCK_MONOTONIC time in seconds (taken by a launcher right before it started kvmlet) that --boot-timer
counts from instead of the process start time in /proc, which has a 10 ms resolution."""


def _process_start_perf() -> tuple[float | None, str]:
    """This process's start time on the perf_counter clock, and where it comes from."""
    given = os.environ.get(BOOT_TIMER_ORIGIN_ENV)
    if given:
        try:
            return float(given), f"${BOOT_TIMER_ORIGIN_ENV}"
        except ValueError:
            pass
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        boot_now = time.clock_gettime(time.CLOCK_BOOTTIME)
        age = boot_now - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - age, "/proc, 10 ms resolution"
    except (OSError, ValueError, IndexError):
        return None, "unknown"


BOOT_TIMER_STEPS = (
    ("kvmlet-imported", "interpreter start"),
    ("cli", "interpreter start and imports"),
    ("machine", "VMM imports and configuration"),
    ("image-read", "image read"),
    ("vm-created", "VM, memory, irqchip, devices"),
    ("image-loaded", "image loaded"),
    ("vcpus-created", "vCPUs set up"),
    ("start", "threads started"),
    ("first-run", "first guest instruction (KVM_RUN)"),
    ("first-console-byte", "first console byte"),
    ("exit", "guest exit"),
)


def _print_boot_timer(marks: dict[str, float], start: float | None, source: str) -> None:
    origin = start if start is not None else marks.get("cli", 0.0)
    previous = origin
    err = sys.stderr
    print(f"boot timer (ms since process start; process start is from {source}):", file=err)
    for name, label in BOOT_TIMER_STEPS:
        if name not in marks:
            continue
        at = marks[name]
        print(f"  {label:<34} {1000 * (at - origin):8.1f}  (+{1000 * (at - previous):.1f})", file=err)
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


def _print_iommu_stats(machine: Machine) -> None:
    """The VT-d unit's counters, one line (the vtd benchmark reads it)."""
    devices = machine.devices
    unit = devices.pci.vtd if devices is not None and devices.pci is not None else None
    if unit is not None:
        counters = {k: v for k, v in vars(unit.stats).items() if isinstance(v, int)}
        print("vtd: " + " ".join(f"{key}={value}" for key, value in counters.items()), file=sys.stderr)


def config_from_args(args: argparse.Namespace) -> VmConfig:
    """The VM that ``kvmlet run``'s flags (and ``--config-file``) describe; the built-in guest by default."""
    import msgspec

    from kvmlet.config import BootSource, MachineConfig, VmConfig, load_config_file, parse_size
    from kvmlet.config.models import MAX_VCPUS_SUPPORTED, MIN_MEM_SIZE_MIB
    from kvmlet.config.specs import parse_drive, parse_net, parse_rng, parse_vsock
    from kvmlet.guest_image import with_builtin_guest

    config = load_config_file(args.config_file) if args.config_file else VmConfig()
    changes: dict[str, object] = {}
    if args.kernel is not None or args.initrd is not None or args.cmdline is not None or args.boot is not None:
        boot = config.boot_source
        if args.kernel is None and boot is None:
            from kvmlet.guest_image import builtin_guest

            boot = BootSource(kernel_image_path=str(builtin_guest()))
        elif args.kernel is not None:
            boot = BootSource(kernel_image_path=str(args.kernel))
        assert boot is not None
        boot = msgspec.structs.replace(
            boot,
            initrd_path=str(args.initrd) if args.initrd is not None else boot.initrd_path,
            boot_args=args.cmdline if args.cmdline is not None else boot.boot_args,
            boot_protocol=args.boot if args.boot is not None else boot.boot_protocol)
        changes["boot_source"] = boot
    if args.vcpus is not None or args.memory is not None:
        machine = config.machine_config
        memory = machine.mem_size_mib
        if args.memory is not None:
            size = parse_size(args.memory, default_unit=1 << 20, what="--memory")
            if size % (1 << 20):
                raise ConfigError(f"--memory {args.memory}: give a whole number of MiB")
            memory = size >> 20
        vcpus = args.vcpus if args.vcpus is not None else machine.vcpu_count
        if not 1 <= vcpus <= MAX_VCPUS_SUPPORTED:
            raise ConfigError(f"--vcpus {vcpus}: choose 1 to {MAX_VCPUS_SUPPORTED}")
        if memory < MIN_MEM_SIZE_MIB:
            raise ConfigError(f"--memory {args.memory}: kvmlet needs at least {MIN_MEM_SIZE_MIB} MiB")
        changes["machine_config"] = _checked(MachineConfig, vcpu_count=vcpus, mem_size_mib=memory,
                                             cpu_template=machine.cpu_template, iommu=machine.iommu)
    if getattr(args, "iommu", None) is not None:   # kvmlet: the VT-d unit in front of the PCI devices
        machine_config = changes.get("machine_config", config.machine_config)
        assert isinstance(machine_config, MachineConfig)
        changes["machine_config"] = msgspec.structs.replace(machine_config, iommu=args.iommu)
    if getattr(args, "cpu_model", None) is not None:
        machine_config = changes.get("machine_config", config.machine_config)
        assert isinstance(machine_config, MachineConfig)
        changes.update(cpu_model_changes(args.cpu_model, machine_config))
    if args.drive:
        changes["drives"] = [*config.drives, *(parse_drive(spec, n)
                                               for n, spec in enumerate(args.drive, len(config.drives)))]
    if args.net:
        changes["network_interfaces"] = [*config.network_interfaces,
                                         *(parse_net(spec, n)
                                           for n, spec in enumerate(args.net, len(config.network_interfaces)))]
    if args.rng is not None:
        changes["entropy"] = parse_rng(args.rng)
    if args.vsock:
        changes["vsock"] = parse_vsock(args.vsock)
    if args.console is not None:
        changes["console"] = args.console
    if getattr(args, "tpm", None) is not None:
        from kvmlet.tpm.cli import parse_tpm

        changes["tpm"] = parse_tpm(args.tpm)
    return with_builtin_guest(msgspec.structs.replace(config, **changes))


def cpu_model_changes(spec: str, machine: MachineConfig) -> dict[str, object]:
    """``--cpu-model NAME|FILE``: a model name or model file goes to machine-config's cpu_template, a
    custom template (Firecracker's JSON) to cpu-config."""

    import msgspec

    from kvmlet.cpu.models import check_cpu_template, is_model_file
    from kvmlet.cpu.template import is_template, load_template

    if is_model_file(spec):
        data = read_json_file(spec, f"--cpu-model {spec}", ConfigError)
        if is_template(data):
            return {"cpu_config": load_template(spec)}
    check_cpu_template(spec)
    return {"machine_config": msgspec.structs.replace(machine, cpu_template=spec)}


def _checked(model: type[T], **fields: object) -> T:
    """A model made from command-line values, checked as a decoded body would be."""
    from kvmlet.config import decode, encode

    return decode(encode(fields), model, "command line")


def run_in_foreground(machine: Machine, timeout: float | None) -> ExitStatus | None:
    """Print the machine's warnings, run it until it ends (SIGTERM and SIGINT stop it) and return how it
    ended; None, said on stderr, if a vCPU could not be stopped."""
    from kvmlet.machine import MachineError

    for warning in machine.warnings:
        print(f"kvmlet: warning: {warning}", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda signum, frame: machine.request_stop())
    try:
        return machine.run(timeout=timeout)
    except KeyboardInterrupt:  # SIGINT when the console is not a raw terminal
        machine.request_stop()
        return machine.wait(10)
    except MachineError as exc:  # a vCPU that cannot be stopped: say so, release what can be
        print(f"kvmlet: {exc}", file=sys.stderr)
        return None


def release(machine: Machine, events: EventLoopThread) -> None:
    """Close the machine and stop the event loop. The process ends next: the kernel's destruction of the VM
    (15-25 ms asleep on PVM hosts) overlaps with the interpreter's shutdown instead of preceding it."""
    from kvmlet.machine import MachineError

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        machine.close(wait=False)
    except MachineError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
    events.stop()


def run_main(args: argparse.Namespace) -> int:
    cli_mark = time.perf_counter()
    from kvmlet.errors import KvmletError

    try:
        config = config_from_args(args)
    except KvmletError as exc:
        print(f"kvmlet: {exc}", file=sys.stderr)
        return 1
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.machine import build_machine
    from kvmlet.process import raise_open_file_limit

    raise_open_file_limit()
    events = EventLoopThread()
    try:
        machine = build_machine(config, events)
    except KvmletError as exc:
        events.stop()
        print(f"kvmlet: {exc}", file=sys.stderr)
        return 1
    machine.timeline.marks["cli"] = cli_mark
    try:
        status = run_in_foreground(machine, args.timeout)
        if status is None:
            return 1
        machine.timeline.mark("exit")
        if args.stats:
            _print_stats(machine.exit_statistics())
            _print_iommu_stats(machine)
    finally:
        release(machine, events)
    if args.boot_timer:
        import kvmlet

        marks = machine.timeline.marks
        marks["kvmlet-imported"] = kvmlet.IMPORTED_AT
        if machine.threads and machine.threads[0].first_run_at is not None:
            marks["first-run"] = machine.threads[0].first_run_at
        _print_boot_timer(marks, *_process_start_perf())
    if status.warning is not None:
        print(f"kvmlet: warning: {status.warning}", file=sys.stderr)
    if status.kind.value not in ("guest-exit",):
        serial = machine.serial
        unfinished_line = serial is not None and serial.last_byte_out not in (None, 0x0A)
        if unfinished_line and config.console == "stdio":
            print(file=sys.stderr)  # the guest's last console line had no newline
        print(f"kvmlet: {status.message}", file=sys.stderr)
    return status.code
