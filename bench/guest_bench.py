"""The test guest's benchmark checks, timed from outside the VM the same way for every VMM.

A benchmark check prints ``BENCH <name> start`` right before its loop and ``BENCH <name> done ops=<n>
bytes=<b>`` right after it (guest/README.md). The window is from the arrival of the first line's end to the
arrival of the second line's ``done`` on the console pipe (both stamped by ``bench.console``), so neither
process start-up nor device set-up counts. Lines such as ``BLK bench <name> req=4096 depth=8 ...`` before the
start line report what the guest actually did (a depth it had to lower, for instance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from bench.console import BenchError, ConsoleProcess

_FIELD = re.compile(rb"(\w+)=(\S+)")


def fields(line: bytes) -> dict[str, str]:
    """``key=value`` pairs of a console line."""
    return {key.decode(): value.decode(errors="replace") for key, value in _FIELD.findall(line)}


@dataclass
class GuestBench:
    """One benchmark loop as seen from the host."""

    name: str
    started: float      # perf_counter() when the start line had arrived
    ended: float        # ... and the done line
    ops: int
    bytes: int
    info: dict[str, str] = field(default_factory=dict)   # from the guest's own line about this loop

    @property
    def seconds(self) -> float:
        # a loop short enough for both lines to arrive in one read (tiny smoke-test sizes) counts as one
        # microsecond rather than zero
        return max(self.ended - self.started, 1e-6)

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds

    @property
    def mib_per_second(self) -> float:
        return self.bytes / (1 << 20) / self.seconds


def timed_bench(vmm: ConsoleProcess, name: str, timeout: float, start: int = 0,
                info_prefix: bytes | None = None) -> tuple[GuestBench, int]:
    """Wait for guest benchmark ``name`` (from console offset ``start``); returns it and the offset after it.

    ``info_prefix`` (e.g. ``b"BLK bench"``): the guest's line ``<prefix> <name> key=value...`` before the
    start line, whose fields go to ``GuestBench.info``.
    """
    began, offset = vmm.wait_for(f"BENCH {name} start\n".encode(), timeout, start)
    ended, done_at = vmm.wait_for(f"BENCH {name} done ".encode(), timeout, offset)
    _, line_end = vmm.wait_for(b"\n", timeout, done_at)
    output = vmm.output()
    result = fields(output[done_at:line_end])
    try:
        ops, size = int(result["ops"]), int(result["bytes"])
    except (KeyError, ValueError):
        raise BenchError(f"{vmm.launch.side}: unexpected line "
                         f"{output[done_at - 64:line_end]!r}") from None
    info: dict[str, str] = {}
    if info_prefix is not None:
        marker = info_prefix + b" " + name.encode() + b" "
        at = output.rfind(marker, start, offset)
        if at >= 0:
            info = fields(output[at + len(marker):output.find(b"\n", at)])
    if ended < began or ops <= 0:
        raise BenchError(f"{vmm.launch.side}: benchmark {name} did nothing ({ops} ops)")
    return GuestBench(name, began, ended, ops, size, info), line_end
