"""The x86-64 psABI micro-architecture levels, v1 to v4: vendor-neutral, so they run on Intel and AMD alike.

The levels (x86-64 psABI, "Micro-Architecture Levels", 2020) name instruction-set features only; a guest
also needs the platform every x86-64 CPU has, so v1 is the psABI baseline (CMOV, CX8, FPU, FXSR, MMX,
OSFXSR, SCE, SSE, SSE2) plus the rest of kvmlet's PC base (long mode, NX, PAE, APIC, ... see
``intel.PC_BASE``). The levels keep the host's vendor, family, model and stepping.
"""

from __future__ import annotations

from kvmlet.cpu.models import CpuModel
from kvmlet.cpu.models.intel import PC_BASE

V1 = PC_BASE
V2 = V1 | {"cx16", "lahf-lm", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

MODELS = tuple(
    CpuModel(name=f"x86-64-v{level}", vendor=None, features=frozenset(features), level=0xD,
             xlevel=0x80000008, model_id=f"kvmlet x86-64-v{level} CPU", source="psabi",
             description=description)
    for level, features, description in (
        (1, V1, "x86-64 baseline (AMD K8, Intel Prescott)"),
        (2, V2, "+ CMPXCHG16B, LAHF/SAHF, POPCNT, SSE3, SSSE3, SSE4.1, SSE4.2 (Nehalem, Bulldozer)"),
        (3, V3, "+ AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE (Haswell, Excavator)"),
        (4, V4, "+ AVX-512 F, BW, CD, DQ, VL (Skylake-SP, Zen 4)")))
