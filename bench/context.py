"""Settings shared by every benchmark: sizes, repetitions, the guest, which VMMs are available."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Sizes:
    """How much each benchmark does. ``Sizes()`` is a full run; ``Sizes.tiny()`` is the smoke test's."""

    rounds: int = 5                 # measured kvmlet/QEMU pairs (after the warm-up)
    cold_rounds: int = 10           # pairs for cold start (each run is short)
    warmup: int = 1
    exit_loops: int = 50_000        # port writes and MMIO writes per run
    vm_count: int = 100             # VMs created one after another in one process
    vm_memory_mib: int = 64
    memory_guest_mib: int = 128
    memory_touch_mib: int = 32
    density_cap: int = 32           # VMs per side at most
    density_memory_mib: int = 64
    density_rounds: int = 5
    density_keep_free_mib: int = 4096
    density_slowdown: float = 10.0  # stop when a start-up takes this many times the first
    compute_loops: int = 1_000_000_000
    blk_image_mib: int = 256        # the raw image both VMMs read
    blk_ops: int = 20_000           # random 4 KiB reads per run (depth 1 and depth 8)
    blk_seq_mib: int = 512          # MiB read sequentially per run (wrapping over the image)
    blk_direct_ops: int = 10_000    # the same with O_DIRECT (0: no direct I/O rows)
    blk_direct_seq_mib: int = 256
    net_frames: int = 100_000       # UDP frames the guest sends per run

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(rounds=1, cold_rounds=1, warmup=0, exit_loops=2000, vm_count=3, memory_touch_mib=4,
                   density_cap=2, compute_loops=10_000_000, blk_image_mib=4, blk_ops=200, blk_seq_mib=4,
                   blk_direct_ops=100, blk_direct_seq_mib=2, net_frames=2000)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Context:
    """What a benchmark runs with."""

    sizes: Sizes
    guest: Path
    qemu: str | None
    gcc: str | None
    work_dir: Path
    python_flags: tuple[str, ...] = ()
    verbose: bool = True
    missing: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"  {message}", file=sys.stderr, flush=True)


def alternate(contenders: Sequence[T], rounds: int, warmup: int, measure: Callable[[T], R],
              on_round: Callable[[int, list[T]], None] | None = None) -> list[list[R]]:
    """Run every contender once per round, in an order that alternates from round to round.

    The first ``warmup`` rounds are discarded. Returns one list per contender (in ``contenders``' order),
    index i of each list from the same measured round, so ratios can be taken pair by pair.
    """
    results: list[list[R]] = [[] for _ in contenders]
    indices = list(range(len(contenders)))
    for number in range(warmup + rounds):
        order = indices[number % len(indices):] + indices[:number % len(indices)]
        if number % 2:
            order.reverse()
        if on_round is not None:
            on_round(number - warmup, [contenders[i] for i in order])
        for index in order:
            value = measure(contenders[index])
            if number >= warmup:
                results[index].append(value)
    return results
