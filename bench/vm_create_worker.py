"""Child process of the vm-create benchmark: create, boot and tear down VMs one after another in-process.

``python -m bench.vm_create_worker --count N --memory MIB --guest ELF`` prints one JSON object: per VM the
milliseconds to build it, to run it until the guest's exit write to the debug port (0x501) has stopped it,
and to close it. The guest runs no check: it prints its banner and exits at once. VMs alternate between
``close()`` (wait for the kernel to destroy the VM) and ``close(wait=False)`` (leave that to a thread).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

CMDLINE = "console=ttyS0 kvmlet.test="


def create_vms(count: int, memory_mib: int, guest: Path, warmup: int = 2) -> dict[str, Any]:
    from kvmlet.config import simple_config
    from kvmlet.devices.legacy.console import BufferConsole
    from kvmlet.eventloop import EventLoopThread
    from kvmlet.machine import StopKind, build_machine

    image = guest.read_bytes()
    samples: dict[str, list[dict[str, float]]] = {"wait": [], "background": []}
    for index in range(warmup + 2 * count):
        mode = "wait" if index % 2 == 0 else "background"
        console = BufferConsole()
        started = time.perf_counter()
        events = EventLoopThread()
        machine = build_machine(simple_config(guest, cmdline=CMDLINE, mem_size_mib=memory_mib, console="none"),
                                events, console=console, kernel_image=image)
        try:
            built = time.perf_counter()
            status = machine.run(timeout=30)
            ran = time.perf_counter()
        finally:
            machine.close(wait=mode == "wait")
            events.stop()
        closed = time.perf_counter()
        if status.kind is not StopKind.GUEST_EXIT or status.code != 0:
            raise RuntimeError(f"VM {index}: {status.message}; console: {console.output()[-200:]!r}")
        if index >= warmup:
            samples[mode].append({"build_ms": 1000 * (built - started), "run_ms": 1000 * (ran - built),
                            "close_ms": 1000 * (closed - ran), "total_ms": 1000 * (closed - started)})
    return {"count": count, "memory_mib": memory_mib, "cmdline": CMDLINE, "vms": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vm_create_worker")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--memory", type=int, default=64, help="guest memory in MiB")
    parser.add_argument("--guest", type=Path, required=True)
    args = parser.parse_args(argv)
    json.dump(create_vms(args.count, args.memory, args.guest), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
