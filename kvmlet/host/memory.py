"""Huge pages for guest memory: transparent huge pages (anonymous and shmem/memfd) and hugetlbfs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvmlet.host.model import Feature, Status
from kvmlet.host.tree import Root, list_dir, read_int, read_line

A, V, X = Status.ACTIVE, Status.AVAILABLE, Status.ABSENT

THP = "/sys/kernel/mm/transparent_hugepage"
HUGETLB = "/sys/kernel/mm/hugepages"


def selected(line: str | None) -> str | None:
    """The bracketed choice of a sysfs selector such as ``always [madvise] never``."""
    if line is None:
        return None
    match = re.search(r"\[([^\]]+)\]", line)
    return match.group(1) if match else (line.strip() or None)


def thp_mode(root: Root, setting: str) -> str | None:
    """The THP mode for PMD-sized pages: the per-size setting (kernels with mTHP) unless it is "inherit"."""
    pmd_size = read_int(root, f"{THP}/hpage_pmd_size")
    if pmd_size:
        per_size = selected(read_line(root, f"{THP}/hugepages-{pmd_size // 1024}kB/{setting}"))
        if per_size is not None and per_size != "inherit":
            return per_size
    return selected(read_line(root, f"{THP}/{setting}"))


def thp_anon_feature(root: Root = "/") -> Feature:
    name = "THP (anonymous)"
    mode = thp_mode(root, "enabled")
    if mode == "always":
        return Feature(name, A, "enabled=always: anonymous memory gets 2 MiB pages")
    if mode == "madvise":
        return Feature(name, V, "enabled=madvise: 2 MiB pages where the VMM asks (MADV_HUGEPAGE)")
    if mode is None:
        return Feature(name, X, "kernel without transparent huge pages")
    return Feature(name, X, f"enabled={mode}: anonymous memory uses 4 KiB pages")


def thp_shmem_feature(root: Root = "/") -> Feature:
    name = "THP (shmem/memfd)"
    mode = thp_mode(root, "shmem_enabled")
    if mode in ("always", "within_size", "force"):
        return Feature(name, A, f"shmem_enabled={mode}: memfd guest memory gets 2 MiB pages")
    if mode == "advise":
        return Feature(name, V, "shmem_enabled=advise: memfd guest memory gets 2 MiB pages if madvised")
    if mode is None:
        return Feature(name, X, "kernel without shmem huge pages: memfd guest memory uses 4 KiB pages")
    return Feature(name, X, f"shmem_enabled={mode}: memfd guest memory in 4 KiB pages (more TLB misses)")


@dataclass(frozen=True)
class HugetlbPool:
    size_kib: int
    total: int
    free: int

    @property
    def size_label(self) -> str:
        return f"{self.size_kib // (1024 * 1024)} GiB" if self.size_kib >= 1024 * 1024 else \
            f"{self.size_kib // 1024} MiB"


def read_hugetlb_pools(root: Root = "/") -> list[HugetlbPool]:
    pools: list[HugetlbPool] = []
    for entry in list_dir(root, HUGETLB):
        match = re.fullmatch(r"hugepages-(\d+)kB", entry)
        if not match:
            continue
        pools.append(HugetlbPool(
            size_kib=int(match.group(1)),
            total=read_int(root, f"{HUGETLB}/{entry}/nr_hugepages") or 0,
            free=read_int(root, f"{HUGETLB}/{entry}/free_hugepages") or 0,
        ))
    return sorted(pools, key=lambda pool: pool.size_kib)


def hugetlb_feature(pools: list[HugetlbPool]) -> Feature:
    name = "Hugetlb pages"
    if not pools:
        return Feature(name, X, "kernel without hugetlbfs")
    reserved = [p for p in pools if p.total]
    if any(p.free for p in reserved):
        text = ", ".join(f"{p.free}/{p.total} x {p.size_label} free" for p in reserved)
        return Feature(name, V, f"{text}: guest memory can use reserved huge pages")
    if reserved:
        return Feature(name, X, "all reserved huge pages are in use")
    sizes = "/".join(p.size_label for p in pools)
    return Feature(name, X, f"none reserved ({sizes} supported; set vm.nr_hugepages)")


def memory_features(root: Root = "/") -> list[Feature]:
    return [thp_anon_feature(root), thp_shmem_feature(root), hugetlb_feature(read_hugetlb_pools(root))]
