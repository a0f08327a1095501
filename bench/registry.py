"""The benchmarks by name, in the order a full run does them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench import (
    api,
    cold_start,
    compute,
    density,
    exits,
    memory,
    tpm,
    vhost_user,
    virtio_blk,
    virtio_net,
    vm_create,
    vtd,
)
from bench.context import Context
from bench.model import BenchResult


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    run: Callable[[Context], BenchResult]


def _summary(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


BENCHMARKS: dict[str, Benchmark] = {
    module.NAME: Benchmark(module.NAME, _summary(module.__doc__), module.run)
    for module in (cold_start, vm_create, api, exits, memory, density, compute, virtio_blk, virtio_net, vhost_user,
                   tpm, vtd)
}
