"""virtio-net: VM-to-host UDP throughput (1472-byte payloads), counted by a receiver on the host side.

The guest's ``virtio-net-bench`` check sends ``net_frames`` UDP datagrams of 1472 payload bytes (1514-byte
frames) to a receiver as fast as the transmit queue takes them, polling at CPL3. The network is the tests'
(``tests/support/netlab.py``): a bridge in the root namespace, a veth into a private network namespace
(addresses in 10.213.0.0/24, used only there) where the receiver counts datagrams and bytes and stamps the
first and last. Each run gets a new TAP (``ip tuntap add``, a port of the bridge, deleted afterwards) that
both VMMs attach to the same way: kvmlet ``--net tap=TAP``, QEMU (microvm, modern virtio-mmio)
``-netdev tap,id=n0,ifname=TAP,script=no,downscript=no,vhost=off -device virtio-net-device,netdev=n0``
(vhost-net would move QEMU's data path into the kernel; ``/dev/vhost-net`` is absent on these hosts).

Figures per run: what the guest sent (frames the device took, over the guest's start-to-done window), what
the receiver counted (over the window from the guest's start to the later of its done line and the last
datagram), and the loss between the two. Needs root (TAP devices, namespaces) and ``ip`` (iproute2).

A third contender, ``kvmlet-uso``, runs the same guest with ``kvmlet.net_uso=1``: with VIRTIO_NET_F_HOST_USO
negotiated it sends the same datagrams 44 to a frame (64768 payload bytes, GSO type UDP_L4), so one frame
crosses the virtio boundary and one ``writev`` enters the TAP where there were 44; the kernel segments
them. QEMU 7.2 has no USO (``host_uso`` came with QEMU 8.2; ``-device virtio-net-device,help`` lists none),
so its plain run stays the baseline of that row too.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from bench.console import BenchError, ConsoleProcess
from bench.context import Context, alternate
from bench.guest_bench import GuestBench, fields, timed_bench
from bench.model import BenchResult, Series, Target, paired_row
from bench.vmms import QEMU_VIRTIO_ARGS, QEMU_VIRTIO_MACHINE, Launch, kvmlet_launch, qemu_launch

NAME = "net"
GUEST_MEMORY_MIB = 128
CHECK = "net-udp-tx"
PAYLOAD = 1472
UDP_PORT = 9000
TIMEOUT = 300.0
QUIET_SECONDS = 0.2      # the receiver is done when nothing arrived for this long after the guest's exit

# The receiver, run in the namespace with (address, port): counts datagrams until told on stdin.
# STATS prints the counters as JSON (times are CLOCK_MONOTONIC, as the harness's), RESET zeroes them.
# It polls: it drains the socket, then sleeps POLL_SECONDS when it is empty, instead of being woken for
# every datagram; so it takes little CPU from the VMM it measures on a small host (the 32 MiB socket
# buffer holds over ten thousand datagrams, far more than arrive in one sleep).
RECEIVER = r"""
import json, select, socket, sys, time
POLL_SECONDS = 0.0005
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)   # SO_RCVBUFFORCE (root): 32 MiB of socket buffer
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
s.setblocking(False)
def udp_errors():
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))
base = udp_errors()
frames = size = 0
first = last = 0.0
buffer = bytearray(65536)
recv_into = s.recv_into
print("READY", flush=True)
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [], 0)
    if not ready:
        time.sleep(POLL_SECONDS)
        continue
    if s in ready:
        while True:
            try:
                n = recv_into(buffer)
            except BlockingIOError:
                break
            last = time.perf_counter()
            if not frames:
                first = last
            frames += 1
            size += n
    if sys.stdin in ready:
        command = sys.stdin.readline().strip()
        if command == "STATS":
            now = udp_errors()
            errors = {key: now[key] - base.get(key, 0) for key in ("RcvbufErrors", "InErrors") if key in now}
            print(json.dumps({"frames": frames, "bytes": size, "first": first, "last": last, **errors}),
                  flush=True)
        elif command == "RESET":
            frames = size = 0
            first = last = 0.0
            base = udp_errors()
            print("OK", flush=True)
        else:
            break
"""


def net_problem() -> str | None:
    """Why the network benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "TAP devices and network namespaces need root"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (modprobe tun)"
    if shutil.which("ip") is None:
        return "ip (iproute2) not found: apt-get install iproute2"
    return None


class Receiver:
    """The receiver process in the namespace, driven through its stdin."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = process.stdout

    def _ask(self, command: str) -> str:
        self._stdin.write(command + "\n")
        self._stdin.flush()
        ready, _, _ = select.select([self._stdout], [], [], 10)
        line = self._stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"the receiver did not answer {command}")
        return line.strip()

    def reset(self) -> None:
        self._ask("RESET")

    def stats(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self._ask("STATS"))
        return parsed

    def settled(self, timeout: float = 10.0) -> dict[str, Any]:
        """The counters once nothing has arrived for QUIET_SECONDS."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if time.perf_counter() - stats["last"] >= QUIET_SECONDS or time.monotonic() > deadline:
                return stats
            time.sleep(QUIET_SECONDS / 2)


@dataclass
class NetRun:
    sent: GuestBench
    received_frames: int
    received_bytes: int
    received_seconds: float
    socket_drops: int           # RcvbufErrors in the receiver's namespace: its socket buffer was full
    guest: dict[str, str]       # the guest's NET bench line (tx, rx, notifies)

    @property
    def loss_percent(self) -> float:
        return 100.0 * (self.sent.ops - self.received_frames) / self.sent.ops


class Tap:
    """A persistent TAP for one run, a port of the bridge; deleted on exit."""

    def __init__(self, name: str, bridge: str) -> None:
        from tests.support.netlab import disable_ipv6, run

        self.name = name
        self._run = run
        run("ip", "tuntap", "add", "dev", name, "mode", "tap")
        try:
            disable_ipv6(name)
            run("ip", "link", "set", name, "master", bridge, "up")
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        if os.path.exists(f"/sys/class/net/{self.name}"):
            self._run("ip", "link", "del", self.name, check=False)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


USO_SIDE = "kvmlet-uso"
USO_OPTION = "kvmlet.net_uso=1"


def launches(ctx: Context, cmdline: str, *, uso: bool = False) -> list[Launch]:
    """The contenders, with ``{tap}`` in place of the TAP's name (each run gets its own TAP); with ``uso``,
    kvmlet once more with the guest sending through UDP segmentation offload (last)."""
    out = [kvmlet_launch(ctx.guest, cmdline, GUEST_MEMORY_MIB, python_flags=ctx.python_flags,
                         extra_args=("--net", "tap={tap}"))]
    if ctx.qemu is not None:
        out.append(qemu_launch(ctx.qemu, ctx.guest, cmdline, GUEST_MEMORY_MIB, machine=QEMU_VIRTIO_MACHINE,
                               extra_args=(*QEMU_VIRTIO_ARGS,
                                           "-netdev", "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off",
                                           "-device", "virtio-net-device,netdev=n0")))
    if uso:
        out.append(kvmlet_launch(ctx.guest, f"{cmdline} {USO_OPTION}", GUEST_MEMORY_MIB, side=USO_SIDE,
                                 python_flags=ctx.python_flags, extra_args=("--net", "tap={tap}")))
    return out


def with_tap(launch: Launch, tap: str) -> Launch:
    return Launch(launch.side, [arg.replace("{tap}", tap) for arg in launch.argv], launch.env, launch.cwd,
                  launch.qemu_exit_code)


def net_run(launch: Launch, bridge: str, receiver: Receiver, number: list[int]) -> NetRun:
    number[0] += 1
    with Tap(f"kvbt{os.getpid() % 10000}x{number[0]}", bridge) as tap:
        receiver.reset()
        with ConsoleProcess(with_tap(launch, tap.name)) as vmm:
            sent, offset = timed_bench(vmm, CHECK, TIMEOUT)
            vmm.check_exit(60)
            output = vmm.output()
            if b"TESTS DONE 1 0" not in output:
                raise BenchError(f"{launch.side}: the network benchmark did not pass: {vmm.text()[-300:]!r}")
            if launch.side == USO_SIDE and b"NET host_uso=1" not in output:
                raise BenchError(f"{launch.side}: the device did not offer VIRTIO_NET_F_HOST_USO (a kernel "
                                 "before 6.2 refuses TUN_F_USO4|USO6)")
            at = output.find(b"NET bench ", offset)
            guest = fields(output[at:output.find(b"\n", at)]) if at >= 0 else {}
        stats = receiver.settled()
    # Received: from the guest's start to the later of its done line and the last datagram's arrival.
    window = max(sent.ended, stats["last"]) - sent.started
    return NetRun(sent, stats["frames"], stats["bytes"], window, stats.get("RcvbufErrors", 0), guest)


def run(ctx: Context) -> BenchResult:
    result = BenchResult(NAME)
    problem = net_problem()
    if problem is not None:
        result.skipped.append(f"the network benchmark: {problem}")
        return result
    from tests.support.netlab import peer_network

    frames = ctx.sizes.net_frames
    with peer_network(UDP_PORT, server_program=RECEIVER, stdin=True) as net:
        assert net.server is not None
        receiver = Receiver(net.server)
        cmdline = (f"console=ttyS0 kvmlet.test=virtio-net-bench kvmlet.net_ip={net.guest_ip} "
                   f"kvmlet.net_peer={net.peer_ip} kvmlet.net_port={net.udp_port} kvmlet.loops={frames} "
                   f"kvmlet.timeout=60")
        contenders = launches(ctx, cmdline, uso=True)
        counter = [0]
        runs = alternate(contenders, ctx.sizes.rounds, ctx.sizes.warmup,
                         lambda launch: net_run(launch, net.bridge, receiver, counter),
                         lambda n, order: ctx.log(f"net round {n} ({frames} frames): "
                                                  f"{', '.join(c.side for c in order)}"))
    by_side = {c.side: side_runs for c, side_runs in zip(contenders, runs, strict=True)}
    kvmlet_runs = by_side["kvmlet"]
    qemu_runs = by_side.get("qemu")
    uso_runs = by_side[USO_SIDE]
    target = Target(1.0, higher_is_better=True)
    rows: tuple[tuple[str, str, Any, Target | None], ...] = (
        ("UDP to the host, received (1472-byte payloads)", "frames/s",
         lambda r: r.received_frames / r.received_seconds, target),
        ("  received payload throughput", "MB/s", lambda r: r.received_bytes / 1e6 / r.received_seconds, target),
        ("  sent by the guest (frames the device took)", "frames/s", lambda r: r.sent.ops_per_second, None),
        ("  lost between the guest and the receiver", "%", lambda r: r.loss_percent, None))
    for index, (metric, unit, pick, row_target) in enumerate(rows):
        subject = Series("kvmlet", [pick(r) for r in kvmlet_runs])
        baseline = Series("qemu", [pick(r) for r in qemu_runs]) if qemu_runs else None
        row = paired_row(NAME, metric, unit, subject, baseline, target=row_target)
        if unit == "%":
            row.ratios = []   # a ratio of losses says nothing (and QEMU's is often 0)
        if index == 0:
            row.note = (f"{frames} frames per run; TAP -> bridge -> veth -> receiver in a namespace; "
                        f"QEMU vhost=off (no /dev/vhost-net here)")
        result.rows.append(row)
    uso_rows: tuple[tuple[str, str, Any], ...] = (
        ("UDP to the host with USO (44 datagrams a virtio frame), received", "frames/s",
         lambda r: r.received_frames / r.received_seconds),
        ("  USO received payload throughput", "MB/s", lambda r: r.received_bytes / 1e6 / r.received_seconds),
        ("  USO lost between the guest and the receiver", "%", lambda r: r.loss_percent))
    for index, (metric, unit, pick) in enumerate(uso_rows):
        subject = Series("kvmlet", [pick(r) for r in uso_runs])
        baseline = Series("qemu", [pick(r) for r in qemu_runs]) if qemu_runs else None
        row = paired_row(NAME, metric, unit, subject, baseline)
        if unit == "%":
            row.ratios = []
        if index == 0:
            row.note = ("kvmlet.net_uso=1: the guest sends 64768-byte UDP_L4 frames, the TAP's kernel segments "
                        "them; QEMU 7.2 has no USO (host_uso is QEMU 8.2's), so QEMU is its plain run")
        result.rows.append(row)
    speedup = Series("kvmlet", [u.received_frames / u.received_seconds / (p.received_frames / p.received_seconds)
                                for u, p in zip(uso_runs, kvmlet_runs, strict=True)])
    result.rows.append(paired_row(NAME, "  kvmlet USO over kvmlet plain, datagrams received", "x", speedup, None))
    uso_frames = Series("kvmlet", [float(r.guest.get("tx", "0")) for r in uso_runs])
    row = paired_row(NAME, "  USO: frames across the virtio boundary per run", "frames", uso_frames, None)
    row.note = f"plain: {frames}, one per datagram"
    result.rows.append(row)
    result.details = {"cmdline": cmdline, "frames": frames, "argv": {c.side: c.argv for c in contenders},
                      "runs": {c.side: [{**vars(r), "sent": vars(r.sent)} for r in side_runs]
                               for c, side_runs in zip(contenders, runs, strict=True)}}
    if ctx.qemu is None:
        result.skipped.append("QEMU half: qemu-system-x86_64 not found")
    return result
