"""vhost-user: UDP from a VM to the host and between two VMs through a software switch, with what it costs the host.

The guest's ``virtio-net-bench`` check sends ``net_frames`` UDP datagrams of 1472 payload bytes (1514-byte frames).
Paths, each run alternating with the others (``bench.context.alternate``):

* VM -> host (the receiver of the ``net`` benchmark, in a network namespace behind a Linux bridge):
  ``kvmlet-vhost-user`` and ``qemu-vhost-user``: the guest's rings served by the switch (kvmlet's managed Open vSwitch
  with DPDK, or DPDK's testpmd where OVS is absent), whose uplink is a port of that bridge; ``kvmlet-tap`` and
  ``qemu-tap``: the VMM's own TAP on the bridge (QEMU ``vhost=off``: no ``/dev/vhost-net`` on these hosts).
* VM -> VM: a second kvmlet VM runs ``virtio-net-sink`` and counts what arrives; through the switch (both VMs on
  vhost-user ports), against both VMs on TAPs in a Linux bridge (the path a hypervisor without VMDq takes).

Figures: frames/s and MB/s as received (the host receiver's count over the window from the guest's start line to the
later of its done line and the last datagram; for VM -> VM the sink's own start/done window), and the host CPU per
received frame: busy time of all CPUs (``/proc/stat``, sampled every 20 ms) over the same window, divided by the
frames. That includes the sending guest's vCPU, which polls its queue the whole time on every path; the differences
between paths are what each data path adds. Last, the switch's own CPU while nothing flows, for each polling policy
(``--poll busy``: a core spinning; ``sleep``: the poller sleeps when idle), so a user can choose.

Needs root (TAP devices, namespaces, the switch) and the switch's binaries; what is missing is named in ``skipped``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.console import BenchError, ConsoleProcess
from bench.context import Context, alternate
from bench.guest_bench import GuestBench, fields, timed_bench
from bench.model import BenchResult, Row, Series, Target, paired_row
from bench.virtio_net import RECEIVER, Receiver, Tap, net_problem
from bench.vmms import QEMU_VIRTIO_ARGS, QEMU_VIRTIO_MACHINE, Launch, kvmlet_launch, qemu_launch

NAME = "vhost-user"
SUMMARY = "UDP VM -> host and VM -> VM through a vhost-user switch against TAP paths, kvmlet and QEMU, CPU per frame"
GUEST_MEMORY_MIB = 128
UDP_PORT = 9000
SINK_IP = "10.213.0.3"        # the receiving VM of the VM -> VM runs (the peer namespace is 10.213.0.1)
TIMEOUT = 300.0
IDLE_SECONDS = 2.0            # how long the idle switch is watched
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- host CPU -------------------------------------------------------------------------------------------------

def host_busy_seconds() -> float:
    """CPU time all CPUs spent not idle since boot (``/proc/stat``: every field but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice: guest time is already inside user/nice
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuSampler:
    """Samples ``host_busy_seconds`` every 20 ms on a thread, so any window's busy time can be read afterwards."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), host_busy_seconds()))
            if self._stop.wait(0.02):
                self.samples.append((time.perf_counter(), host_busy_seconds()))
                return

    def busy(self, start: float, end: float) -> float:
        """Busy CPU seconds between two perf_counter() times (linear between samples)."""
        return self._at(end) - self._at(start)

    def _at(self, moment: float) -> float:
        samples = self.samples
        if not samples:
            return 0.0
        for (t0, b0), (t1, b1) in itertools.pairwise(samples):
            if t0 <= moment <= t1:
                return b0 + (b1 - b0) * (moment - t0) / (t1 - t0) if t1 > t0 else b1
        return samples[0][1] if moment < samples[0][0] else samples[-1][1]

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- the switch -----------------------------------------------------------------------------------------------

def switch_problem() -> str | None:
    """Why no switch can run here, or None."""
    from kvmlet.net import ovs, switch

    if ovs.ovs_problem() is None or switch.testpmd_path() is not None:
        return None
    return f"no vhost-user switch: {ovs.ovs_problem()}; and {switch.TESTPMD} is not installed (Debian dpdk-dev)"


def switch_engine() -> str:
    """The engine ``kvmlet net switch`` would choose here."""
    from kvmlet.net import ovs

    return "ovs" if ovs.ovs_problem() is None else "testpmd"


@contextlib.contextmanager
def running_switch(workdir: Path, ports: list[str], bridge: str | None, *, poll: str = "auto") -> Iterator[Any]:
    """The switch with a vhost-user port per name (socket ``workdir/NAME.sock``) and, with ``bridge``, an uplink
    that is a port of that Linux bridge; yields the switch object (``pids()``: its processes)."""
    from kvmlet.net import ovs, switch

    sockets = [str(workdir / f"{name}.sock") for name in ports]
    uplink = f"kvbu{os.getpid() % 10000}" if bridge is not None else None
    vhost_ports = [switch.VhostPort(name, sock) for name, sock in zip(ports, sockets, strict=True)]
    if switch_engine() == "ovs":
        the_switch: Any = ovs.OvsSwitch(vhost_ports, name=f"kvbs{os.getpid() % 10000}", directory=workdir / "ovs",
                                        uplink_tap=uplink, poll=poll)
    else:
        the_switch = switch.TestpmdSwitch(vhost_ports, uplink_tap=uplink, forward_mode="io")
    with the_switch:
        if uplink is not None:
            from tests.support.netlab import disable_ipv6, run

            disable_ipv6(uplink)
            run("ip", "link", "set", uplink, "master", bridge or "", "up")
        yield the_switch


# ---- the paths ------------------------------------------------------------------------------------------------

@dataclass
class PathRun:
    """One run of one path, as received."""

    frames: int
    bytes: int
    seconds: float
    cpu_seconds: float          # host CPU busy over the window, all CPUs
    sent: GuestBench | None

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / self.seconds

    @property
    def delivered_percent(self) -> float:
        return 100.0 * self.frames / self.sent.ops if self.sent is not None and self.sent.ops else 0.0

    @property
    def cpu_us_per_frame(self) -> float:
        return self.cpu_seconds * 1e6 / self.frames if self.frames else 0.0


def _sender_cmdline(frames: int, peer: str, guest_ip: str = "10.213.0.2") -> str:
    return (f"console=ttyS0 kvmlet.test=virtio-net-bench kvmlet.net_ip={guest_ip} kvmlet.net_peer={peer} "
            f"kvmlet.net_port={UDP_PORT} kvmlet.loops={frames} kvmlet.timeout=60")


def _sink_cmdline(frames: int) -> str:
    return (f"console=ttyS0 kvmlet.test=virtio-net-sink kvmlet.net_ip={SINK_IP} kvmlet.net_peer=10.213.0.2 "
            f"kvmlet.net_port={UDP_PORT} kvmlet.loops={frames} kvmlet.timeout=60")


def _qemu_vhost_user(ctx: Context, cmdline: str, sock: str) -> Launch:
    assert ctx.qemu is not None
    return qemu_launch(ctx.qemu, ctx.guest, cmdline, GUEST_MEMORY_MIB,
                       machine=f"{QEMU_VIRTIO_MACHINE},memory-backend=mem", side="qemu-vhost-user",
                       extra_args=(*QEMU_VIRTIO_ARGS,
                                   "-object", f"memory-backend-memfd,id=mem,size={GUEST_MEMORY_MIB}M,share=on",
                                   "-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                                   "-device", "virtio-net-device,netdev=n0"))


def _qemu_tap(ctx: Context, cmdline: str, tap: str) -> Launch:
    assert ctx.qemu is not None
    return qemu_launch(ctx.qemu, ctx.guest, cmdline, GUEST_MEMORY_MIB, machine=QEMU_VIRTIO_MACHINE, side="qemu-tap",
                       extra_args=(*QEMU_VIRTIO_ARGS,
                                   "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                                   "-device", "virtio-net-device,netdev=n0"))


def _kvmlet(ctx: Context, cmdline: str, net: str, side: str) -> Launch:
    return kvmlet_launch(ctx.guest, cmdline, GUEST_MEMORY_MIB, python_flags=ctx.python_flags,
                         extra_args=("--net", net), side=side)


def _expect_pass(vmm: ConsoleProcess) -> None:
    vmm.check_exit(60)
    if b"TESTS DONE 1 0" not in vmm.output():
        raise BenchError(f"{vmm.launch.side}: the guest's check did not pass: {vmm.text()[-300:]!r}")


def to_host_run(launch: Launch, receiver: Receiver, sampler: CpuSampler) -> PathRun:
    """The guest sends to the receiver in the namespace; counted there."""
    receiver.reset()
    with ConsoleProcess(launch) as vmm:
        sent, _ = timed_bench(vmm, "net-udp-tx", TIMEOUT)
        _expect_pass(vmm)
    stats = receiver.settled()
    end = max(sent.ended, stats["last"])
    if not stats["frames"]:
        raise BenchError(f"{launch.side}: nothing reached the receiver")
    return PathRun(stats["frames"], stats["bytes"], end - sent.started, sampler.busy(sent.started, end), sent)


def guest_tsc_hz() -> float:
    """The TSC frequency KVM gives guests here (KVM_GET_TSC_KHZ of a scratch vCPU)."""
    from kvmlet.kvm.system import Kvm

    kvm = Kvm()
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    try:
        return vcpu.get_tsc_khz() * 1000.0
    finally:
        vcpu.close()
        vm.close()
        kvm.close()


def vm_to_vm_run(sender: Launch, sink: Launch, sampler: CpuSampler, tsc_hz: float) -> PathRun:
    """The sink VM first (until its device is up), then the sender; counted by the sink, over its first to last
    frame (its own TSC count: its done line may come an idle period after the last frame)."""
    with ConsoleProcess(sink) as receiving:
        receiving.wait_for(b"NET serve ready", 60)
        with ConsoleProcess(sender) as sending:
            sent, _ = timed_bench(sending, "net-udp-tx", TIMEOUT)
            got, offset = timed_bench(receiving, "net-udp-rx", TIMEOUT)
            _expect_pass(sending)
        _expect_pass(receiving)
        at = receiving.output().find(b"NET sink ", offset)
        line = receiving.output()[at:receiving.output().find(b"\n", at)] if at >= 0 else b""
    cycles = int(fields(line).get("cycles", "0"))
    seconds = cycles / tsc_hz if cycles > 0 else got.seconds
    return PathRun(got.ops, got.bytes, seconds, sampler.busy(got.started, got.started + seconds), sent)


# ---- the benchmark --------------------------------------------------------------------------------------------

def _rows(rows: list[Row], label: str, runs: dict[str, list[PathRun]], subject: str, baseline: str | None,
          target: Target | None, note: str = "") -> None:
    if subject not in runs or not runs[subject]:
        return
    base = runs.get(baseline or "") or []
    picks: tuple[tuple[str, str, Callable[[PathRun], float], Target | None], ...] = (
        (f"{label}, received", "frames/s", lambda r: r.frames_per_second, target),
        ("  received payload throughput", "MB/s", lambda r: r.megabytes_per_second, target),
        ("  host CPU per received frame", "us", lambda r: r.cpu_us_per_frame, None),
        ("  delivered of what the guest sent", "%", lambda r: r.delivered_percent, None))
    for index, (metric, unit, pick, row_target) in enumerate(picks):
        row = paired_row(NAME, metric, unit, Series(subject, [pick(r) for r in runs[subject]]),
                         Series(baseline, [pick(r) for r in base]) if base and baseline else None,
                         target=row_target)
        if index == 0 and note:
            row.note = note
        if unit == "%":
            row.ratios = []   # a ratio of delivery rates says little
        rows.append(row)


def idle_cost(workdir: Path) -> dict[str, float]:
    """CPU percent of one core the switch's processes take while nothing flows, per polling policy."""
    out: dict[str, float] = {}
    policies = ("busy", "sleep") if switch_engine() == "ovs" else ("busy",)
    for poll in policies:
        with running_switch(workdir, ["idle0"], None, poll=poll) as the_switch:
            time.sleep(1.0)   # past start-up
            pids = the_switch.pids()
            before = sum(process_cpu_seconds(pid) for pid in pids)
            began = time.perf_counter()
            time.sleep(IDLE_SECONDS)
            used = sum(process_cpu_seconds(pid) for pid in pids) - before
            out[poll] = 100.0 * used / (time.perf_counter() - began)
    return out


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    problem = net_problem() or switch_problem()
    if problem is not None:
        result.skipped.append(f"the vhost-user benchmark: {problem}")
        return result
    from tests.support.netlab import peer_network

    frames = ctx.sizes.net_frames
    engine = switch_engine()
    workdir = ctx.work_dir / "vhost-user"
    workdir.mkdir(parents=True, exist_ok=True)
    counter = [0]

    def tap_name() -> str:
        counter[0] += 1
        return f"kvbv{os.getpid() % 10000}x{counter[0]}"

    runs: dict[str, list[PathRun]] = {}
    tsc_hz = guest_tsc_hz()
    with peer_network(UDP_PORT, server_program=RECEIVER, stdin=True) as net, CpuSampler() as sampler:
        assert net.server is not None
        receiver = Receiver(net.server)
        to_host = _sender_cmdline(frames, net.peer_ip)
        sock = str(workdir / "vm0.sock")

        def host_side(side: str) -> PathRun:
            if side.endswith("-tap"):
                with Tap(tap_name(), net.bridge) as tap:
                    launch = (_kvmlet(ctx, to_host, f"tap={tap.name}", side) if side.startswith("kvmlet")
                              else _qemu_tap(ctx, to_host, tap.name))
                    return to_host_run(launch, receiver, sampler)
            with running_switch(workdir, ["vm0"], net.bridge):
                launch = (_kvmlet(ctx, to_host, f"vhost-user={sock}", side) if side.startswith("kvmlet")
                          else _qemu_vhost_user(ctx, to_host, sock))
                return to_host_run(launch, receiver, sampler)

        sides = ["kvmlet-vhost-user", "kvmlet-tap"]
        if ctx.qemu is not None:
            sides[1:1] = ["qemu-vhost-user"]
            sides.append("qemu-tap")
        measured = alternate(sides, ctx.sizes.rounds, ctx.sizes.warmup, host_side,
                             lambda n, order: ctx.log(f"vhost-user VM -> host round {n} ({frames} frames): "
                                                      f"{', '.join(order)}"))
        runs.update(zip(sides, measured, strict=True))

        def vm_side(side: str) -> PathRun:
            sender_line = _sender_cmdline(frames, SINK_IP)
            if side == "switch":
                sockets = [str(workdir / "vm0.sock"), str(workdir / "vm1.sock")]
                with running_switch(workdir, ["vm0", "vm1"], None):
                    return vm_to_vm_run(_kvmlet(ctx, sender_line, f"vhost-user={sockets[0]}", "sender"),
                                        _kvmlet(ctx, _sink_cmdline(frames), f"vhost-user={sockets[1]}", "sink"),
                                        sampler, tsc_hz)
            with Tap(tap_name(), net.bridge) as tap0, Tap(tap_name(), net.bridge) as tap1:
                return vm_to_vm_run(_kvmlet(ctx, sender_line, f"tap={tap0.name}", "sender"),
                                    _kvmlet(ctx, _sink_cmdline(frames), f"tap={tap1.name}", "sink"), sampler,
                                    tsc_hz)

        vm_sides = ["switch", "bridge"]
        vm_measured = alternate(vm_sides, ctx.sizes.rounds, ctx.sizes.warmup, vm_side,
                                lambda n, order: ctx.log(f"vhost-user VM -> VM round {n}: {', '.join(order)}"))
        runs["kvmlet-kvmlet-switch"], runs["kvmlet-kvmlet-bridge"] = vm_measured
    idle = idle_cost(workdir)

    at_least_qemu = Target(1.0, higher_is_better=True)
    _rows(result.rows, f"VM -> host UDP over vhost-user ({engine})", runs, "kvmlet-vhost-user", "qemu-vhost-user",
          at_least_qemu, f"{frames} frames of 1514 bytes; both VMMs on the same switch, uplink to a Linux bridge")
    _rows(result.rows, "VM -> host UDP, kvmlet vhost-user vs QEMU on its own TAP", runs, "kvmlet-vhost-user",
          "qemu-tap", None)
    _rows(result.rows, "VM -> host UDP, kvmlet on its own TAP vs QEMU on its own TAP", runs, "kvmlet-tap",
          "qemu-tap", None)
    _rows(result.rows, f"VM -> VM UDP through the switch ({engine}) vs two TAPs on a Linux bridge", runs,
          "kvmlet-kvmlet-switch", "kvmlet-kvmlet-bridge", None,
          "both VMs kvmlet; counted by the receiving guest; seed's claim for VMDq: more than 3x")
    for poll, percent in idle.items():
        result.rows.append(Row(NAME, f"switch idle, polling policy {poll}", "% of a CPU",
                               Series(engine, [percent])))
    result.details = {"frames": frames, "engine": engine, "idle_cpu_percent": idle,
                      "runs": {side: [vars(r) | {"sent": vars(r.sent) if r.sent else None} for r in side_runs]
                               for side, side_runs in runs.items()}}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
