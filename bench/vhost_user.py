"""vhost-user: what the test guest's UDP sender (``virtio-net-bench``, 1514-byte frames) reaches with its data path in
DPDK's testpmd, kvmlet and QEMU side by side, against kvmlet's own TAP path.

Sides (each run alternates them, ``--rounds`` times):

* ``kvmlet-vhost-user`` / ``qemu-vhost-user``: the guest's rings served by ``dpdk-testpmd``, which forwards
  (``io``) to a TAP uplink (DPDK ``net_tap``) on the tests' bridge (``tests/support/netlab.py``: a peer namespace at
  10.213.0.1 answers ARP; the datagrams go to a port nobody listens on). QEMU: microvm with a shared memfd RAM
  backend, ``-chardev socket`` + ``-netdev vhost-user`` + ``virtio-net-device``, as docs/networking.md describes.
* ``kvmlet-tap``: kvmlet's in-process virtio-net on a TAP on the same bridge.

The figure is the guest's own: frames it queued between its ``start`` and ``done`` lines, over that wall time as
the harness sees the console. testpmd runs only during its side's run (one polling core: half of a 2-CPU host) and
is stopped on every exit path. Run as root: ``python -m bench.vhost_user [--frames N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmlet.net.switch import TestpmdSwitch, VhostPort

GUEST = Path(__file__).resolve().parent.parent / "guest" / "build" / "kvmlet-guest.elf"
MEMORY_MIB = 128
CMDLINE = ("console=ttyS0 kvmlet.test=virtio-net-bench kvmlet.net_ip=10.213.0.2 kvmlet.net_peer=10.213.0.1 "
           "kvmlet.net_port=9 kvmlet.loops={frames} kvmlet.timeout=60")


def _timed(argv: list[str], timeout: float = 300.0) -> tuple[float | None, int, str]:
    """Run a VMM; returns (seconds from the guest's start line to its done line, frames, output)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    output = b""
    start = done = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            now = time.perf_counter()
            output += chunk
            if start is None and b"BENCH net-udp-tx start" in output:
                start = now
            if done is None and b"BENCH net-udp-tx done" in output:
                done = now
            if b"TESTS DONE" in output:
                break
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdout.close()
    text = output.decode(errors="replace")
    frames = 0
    for line in text.splitlines():
        if line.startswith("BENCH net-udp-tx done"):
            frames = int(line.split("ops=")[1].split()[0])
    if start is None or done is None or done <= start:
        return None, frames, text
    return done - start, frames, text


def _kvmlet(frames: int, net: str) -> list[str]:
    return [sys.executable, "-m", "kvmlet", "run", "--kernel", str(GUEST), "--cmdline", CMDLINE.format(frames=frames),
            "--memory", f"{MEMORY_MIB}M", "--console", "stdio", "--net", net]


def _qemu(frames: int, sock: str) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    return [qemu, "-M", "microvm,acpi=off,memory-backend=mem", "-accel", "kvm", "-cpu", "qemu64",
            "-m", str(MEMORY_MIB), "-nographic", "-no-reboot", "-kernel", str(GUEST),
            "-append", CMDLINE.format(frames=frames), "-global", "virtio-mmio.force-legacy=false",
            "-device", "isa-debug-exit,iobase=0x501,iosize=2",
            "-object", f"memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on",
            "-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
            "-device", "virtio-net-device,netdev=n0"]


def run_side(side: str, frames: int, workdir: str, bridge: str) -> tuple[float | None, int]:
    sock = os.path.join(workdir, "vm0.sock")
    tap = f"kvbt{os.getpid() % 100000}"
    if side == "kvmlet-tap":
        seconds, sent, text = _timed(_kvmlet(frames, f"tap=auto,bridge={bridge}"))
    else:
        with TestpmdSwitch([VhostPort("vm0", sock)], uplink_tap=tap, forward_mode="io"):
            subprocess.run(["ip", "link", "set", tap, "master", bridge, "up"], check=True)
            argv = _kvmlet(frames, f"vhost-user={sock}") if side == "kvmlet-vhost-user" else _qemu(frames, sock)
            seconds, sent, text = _timed(argv)
    if seconds is None:
        print(f"{side}: no result\n{text[-1500:]}", file=sys.stderr)
    return seconds, sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", default="kvmlet-vhost-user,qemu-vhost-user,kvmlet-tap")
    args = parser.parse_args(argv)
    sides = args.sides.split(",")
    rates: dict[str, list[float]] = {side: [] for side in sides}
    load = os.getloadavg()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support.netlab import peer_network

    with tempfile.TemporaryDirectory(prefix="kvmlet-vu-") as workdir, peer_network(udp_port=7777) as peer:
        for _ in range(args.rounds):
            for side in sides:
                seconds, sent = run_side(side, args.frames, workdir, peer.bridge)
                if seconds:
                    rates[side].append(sent / seconds)
    print(f"vhost-user benchmark: {args.frames} frames of 1514 bytes per run, {args.rounds} rounds, "
          f"load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}")
    best = {side: max(values) for side, values in rates.items() if values}
    reference = best.get("qemu-vhost-user")
    for side in sides:
        if side not in best:
            print(f"  {side:20s} no result")
            continue
        ratio = f"  {best[side] / reference:5.2f}x qemu-vhost-user" if reference else ""
        runs = ", ".join(f"{rate / 1000:.0f}k" for rate in rates[side])
        print(f"  {side:20s} {best[side] / 1000:8.0f} k frames/s (runs: {runs}){ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
