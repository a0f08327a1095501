"""Intel server generations, Penryn to Sapphire Rapids.

Each list is the feature set of the generation as QEMU's model of the same name defines it (target/i386/cpu.c,
the versions named in docs/cpu-models.md), cross-checked against real CPUID dumps of the generation
(tests/data/cpu/), written here as kvmlet's own names. Differences from QEMU, on purpose: no ``vmx`` (kvmlet
offers no nested virtualization), ``x2apic``/``tsc-deadline`` are platform features (kvmlet.cpu.models),
and Haswell to Icelake-Server leave out TSX (``hle``, ``rtm``) as QEMU's ``-noTSX`` versions do: microcode
turned TSX off on most of those parts, so a model with it would not run on its own generation.
"""

from __future__ import annotations

from kvmlet.cpu.models import INTEL, CpuModel

# Leaf 1 EDX of every model since the Pentium Pro era, as kvmlet's models and QEMU's present it.
PC_BASE = frozenset({"fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge",
                     "mca", "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2", "syscall", "nx", "lm"})

PENRYN = PC_BASE | {"sse3", "ssse3", "sse4.1", "cx16", "lahf-lm"}
NEHALEM = PENRYN | {"sse4.2", "popcnt"}
WESTMERE = NEHALEM | {"aes", "pclmulqdq", "arat"}
SANDYBRIDGE = WESTMERE | {"avx", "xsave", "rdtscp", "xsaveopt"}
IVYBRIDGE = SANDYBRIDGE | {"f16c", "rdrand", "fsgsbase", "smep", "erms"}
HASWELL = IVYBRIDGE | {"fma", "movbe", "pcid", "abm", "bmi1", "avx2", "bmi2", "invpcid"}
BROADWELL = HASWELL | {"3dnowprefetch", "rdseed", "adx", "smap"}
SKYLAKE_SERVER = BROADWELL | {"pdpe1gb", "clwb", "clflushopt", "avx512f", "avx512dq", "avx512bw", "avx512cd",
                              "avx512vl", "pku", "xsavec", "xgetbv1"}
CASCADELAKE_SERVER = SKYLAKE_SERVER | {"avx512vnni", "spec-ctrl", "ssbd"}
ICELAKE_SERVER = CASCADELAKE_SERVER | {"avx512vbmi", "umip", "avx512vbmi2", "gfni", "vaes", "vpclmulqdq",
                                       "avx512bitalg", "avx512-vpopcntdq", "la57", "wbnoinvd", "sha-ni",
                                       "avx512ifma", "rdpid", "fsrm", "xsaves", "arch-capabilities", "rdctl-no",
                                       "ibrs-all", "skip-l1dfl-vmentry", "mds-no", "pschange-mc-no", "taa-no"}
SAPPHIRERAPIDS = (ICELAKE_SERVER - {"taa-no"}) | {
    "hle", "rtm", "ss", "tsc-adjust", "bus-lock-detect", "cldemote", "movdiri", "movdir64b", "serialize",
    "tsx-ldtrk", "amx-bf16", "avx512-fp16", "amx-tile", "amx-int8", "xfd", "avx-vnni", "avx512-bf16", "fzrm",
    "fsrs", "fsrc", "taa-no", "sbdr-ssdp-no", "fbsdp-no", "psdp-no"}


def _intel(name: str, features: frozenset[str] | set[str], family: int, model: int, stepping: int,
           level: int, brand: str, description: str) -> CpuModel:
    return CpuModel(name=name, vendor=INTEL, features=frozenset(features), family=family, model=model,
                    stepping=stepping, level=level, xlevel=0x80000008, model_id=f"kvmlet {brand} CPU",
                    description=description, source="qemu")


MODELS = (
    _intel("Penryn", PENRYN, 6, 23, 3, 0xA, "Penryn-class Intel", "Core 2 / Xeon 5400 (2007): SSE4.1"),
    _intel("Nehalem", NEHALEM, 6, 26, 3, 0xB, "Nehalem-class Intel", "Core i7 / Xeon 5500 (2008): SSE4.2, POPCNT"),
    _intel("Westmere", WESTMERE, 6, 44, 1, 0xB, "Westmere-class Intel", "Xeon 5600 (2010): AES-NI, PCLMULQDQ"),
    _intel("SandyBridge", SANDYBRIDGE, 6, 42, 1, 0xD, "Sandy Bridge-class Intel", "Xeon E5 (2012): AVX"),
    _intel("IvyBridge", IVYBRIDGE, 6, 58, 9, 0xD, "Ivy Bridge-class Intel",
           "Xeon E5 v2 (2013): F16C, RDRAND, FSGSBASE, SMEP"),
    _intel("Haswell", HASWELL, 6, 60, 1, 0xD, "Haswell-class Intel",
           "Xeon E5 v3 (2014): AVX2, FMA, BMI1/2, MOVBE (no TSX)"),
    _intel("Broadwell", BROADWELL, 6, 61, 2, 0xD, "Broadwell-class Intel",
           "Xeon E5 v4 (2016): RDSEED, ADX, SMAP (no TSX)"),
    _intel("Skylake-Server", SKYLAKE_SERVER, 6, 85, 4, 0xD, "Skylake-SP-class Intel",
           "Xeon Scalable 1st gen (2017): AVX-512 F/DQ/BW/CD/VL, PKU (no TSX)"),
    _intel("Cascadelake-Server", CASCADELAKE_SERVER, 6, 85, 6, 0xD, "Cascade Lake-class Intel",
           "Xeon Scalable 2nd gen (2019): AVX-512 VNNI (no TSX)"),
    _intel("Icelake-Server", ICELAKE_SERVER, 6, 106, 6, 0xD, "Ice Lake-SP-class Intel",
           "Xeon Scalable 3rd gen (2021): AVX-512 VBMI/VBMI2/BITALG, GFNI, VAES, SHA, LA57 (no TSX)"),
    _intel("SapphireRapids", SAPPHIRERAPIDS, 6, 143, 4, 0x20, "Sapphire Rapids-class Intel",
           "Xeon Scalable 4th gen (2023): AMX, AVX512-FP16, AVX-VNNI, TSX"),
)
