"""AMD EPYC generations: Naples (Zen), Rome (Zen 2), Milan (Zen 3), Genoa (Zen 4).

Feature lists as QEMU's EPYC models define them (target/i386/cpu.c, versions named in docs/cpu-models.md),
cross-checked against real CPUID dumps (tests/data/cpu/), in kvmlet's own names. Left out on purpose:
``svm`` (no nested virtualization) and ``monitor`` (KVM does not give guests MONITOR/MWAIT by default).
"""

from __future__ import annotations

from kvmlet.cpu.models import AMD, CpuModel
from kvmlet.cpu.models.intel import PC_BASE

EPYC = PC_BASE | {
    "sse3", "pclmulqdq", "ssse3", "fma", "cx16", "sse4.1", "sse4.2", "movbe", "popcnt", "aes", "xsave", "avx",
    "f16c", "rdrand", "mmxext", "fxsr-opt", "pdpe1gb", "rdtscp", "lahf-lm", "cr8legacy", "abm", "sse4a",
    "misalignsse", "3dnowprefetch", "osvw", "topoext", "perfctr-core", "fsgsbase", "bmi1", "avx2", "smep", "bmi2",
    "rdseed", "adx", "smap", "clflushopt", "sha-ni", "xsaveopt", "xsavec", "xgetbv1", "xsaves", "arat", "clzero",
    "xsaveerptr", "ibpb"}
EPYC_ROME = EPYC | {"wbnoinvd", "amd-stibp", "clwb", "umip", "rdpid", "ibrs", "amd-ssbd"}
EPYC_MILAN = EPYC_ROME | {"pcid", "erms", "invpcid", "pku", "fsrm", "vaes", "vpclmulqdq", "stibp-always-on",
                          "amd-psfd", "no-nested-data-bp", "lfence-always-serializing", "null-sel-clr-base"}
EPYC_GENOA = EPYC_MILAN | {
    "avx512f", "avx512dq", "avx512ifma", "avx512cd", "avx512bw", "avx512vl", "avx512vbmi", "avx512vbmi2", "gfni",
    "avx512vnni", "avx512bitalg", "avx512-vpopcntdq", "la57", "avx512-bf16", "auto-ibrs"}


def _amd(name: str, features: frozenset[str], family: int, model: int, stepping: int, xlevel: int,
         brand: str, description: str) -> CpuModel:
    return CpuModel(name=name, vendor=AMD, features=features, family=family, model=model, stepping=stepping,
                    level=0xD, xlevel=xlevel, model_id=f"kvmlet {brand} CPU", description=description,
                    source="qemu")


MODELS = (
    _amd("EPYC", EPYC, 23, 1, 2, 0x8000001E, "EPYC (Naples)-class AMD", "EPYC 7001 (2017, Zen)"),
    _amd("EPYC-Rome", EPYC_ROME, 23, 49, 0, 0x8000001E, "EPYC Rome-class AMD",
         "EPYC 7002 (2019, Zen 2): CLWB, WBNOINVD, RDPID, UMIP"),
    _amd("EPYC-Milan", EPYC_MILAN, 25, 1, 1, 0x80000021, "EPYC Milan-class AMD",
         "EPYC 7003 (2021, Zen 3): PCID, INVPCID, PKU, FSRM, VAES"),
    _amd("EPYC-Genoa", EPYC_GENOA, 25, 17, 0, 0x80000022, "EPYC Genoa-class AMD",
         "EPYC 9004 (2022, Zen 4): AVX-512, LA57, AUTO_IBRS"),
)
