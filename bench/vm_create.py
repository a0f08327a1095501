"""VM creation in process: create, boot to the guest's debug-port write and tear down VMs one after another.

Runs in a child process (``bench.vm_create_worker``) through kvmlet's Python API; the figure is the median
per VM, to set beside Hyperlight's published 1-2 ms per VM. kvmlet only: QEMU has no in-process API.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench.console import BenchError
from bench.context import Context
from bench.model import BenchResult, Row, Series, Target
from bench.vmms import REPO, kvmlet_env

NAME = "vm-create"


def run(ctx: Context) -> BenchResult:
    sizes = ctx.sizes
    argv = [sys.executable, *ctx.python_flags, "-m", "bench.vm_create_worker", "--count", str(sizes.vm_count),
            "--memory", str(sizes.vm_memory_mib), "--guest", str(ctx.guest)]
    ctx.log(f"vm-create: 2 x {sizes.vm_count} VMs of {sizes.vm_memory_mib} MiB, one after another")
    done = subprocess.run(argv, cwd=REPO, env=kvmlet_env(python_flags=ctx.python_flags), capture_output=True,
                          text=True, timeout=1800)
    if done.returncode != 0:
        raise BenchError(f"vm-create worker failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    data = json.loads(done.stdout)
    result = BenchResult(NAME, details=data)
    background, waited = data["vms"]["background"], data["vms"]["wait"]
    rows = (("create + boot + tear down, per VM", background, "total_ms", Target(5.0, on="value")),
            ("  build (KVM VM, memory, devices, image, vCPU)", background, "build_ms", None),
            ("  run to the guest's debug-exit write, vCPU joined", background, "run_ms", None),
            ("  tear down: close(wait=False)", background, "close_ms", None),
            ("create + boot + tear down, per VM, synchronous close()", waited, "total_ms", None),
            ("  tear down: close(), waits for the kernel", waited, "close_ms", None))
    for metric, vms, key, target in rows:
        row = Row(NAME, metric, "ms", Series("kvmlet", [vm[key] for vm in vms]), target=target)
        if target is not None:
            row.reference = "Hyperlight: 1-2 ms per VM"
            row.note = (f"{sizes.vm_count} VMs, {sizes.vm_memory_mib} MiB each; the kernel's destruction of "
                        f"each VM finishes on a background thread")
        result.rows.append(row)
    return result
