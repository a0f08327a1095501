"""Named CPU features: where each lives in CPUID (or in a feature MSR), and the feature set of a CPUID table.

Names follow the ones QEMU and libvirt use for ``-cpu``/``<feature>`` (so a feature list reads the same
everywhere), the bit positions are the Intel SDM's (vol. 2A, CPUID) and the AMD APM's (vol. 3, appendix E).
A *feature register* is a CPUID register that holds only feature flags; a CPU model sets exactly the bits
of its features in those registers and nothing else. Bits that are state rather than features (OSXSAVE,
OSPKE, HTT, the hypervisor bit) are never features: KVM or kvmlet set them, whatever the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvmlet.kvm.cpuid import CpuidEntry

MSR_IA32_ARCH_CAPABILITIES = 0x10A

RegisterKey = tuple[int, int, str]   # (leaf, subleaf, register)


@dataclass(frozen=True)
class CpuidFeature:
    """One feature flag: CPUID ``leaf``.``subleaf`` ``register`` bit ``bit``."""

    name: str
    leaf: int
    subleaf: int
    register: str
    bit: int
    xsave: tuple[int, ...] = ()       # XSAVE state components the feature needs (CPUID 0xD)
    requires: tuple[str, ...] = ()    # features that must come with it

    @property
    def key(self) -> RegisterKey:
        return (self.leaf, self.subleaf, self.register)


@dataclass(frozen=True)
class MsrFeature:
    """A feature bit in a feature MSR (today IA32_ARCH_CAPABILITIES), read with KVM_GET_MSRS on /dev/kvm."""

    name: str
    msr: int
    bit: int
    requires: tuple[str, ...] = ()


def _reg(leaf: int, subleaf: int, register: str, bits: dict[int, str]) -> list[CpuidFeature]:
    return [CpuidFeature(name, leaf, subleaf, register, bit) for bit, name in bits.items()]


_TABLE: list[CpuidFeature] = [
    *_reg(1, 0, "edx", {0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce", 8: "cx8",
                        9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov", 16: "pat",
                        17: "pse36", 18: "pn", 19: "clflush", 21: "ds", 22: "acpi", 23: "mmx", 24: "fxsr",
                        25: "sse", 26: "sse2", 27: "ss", 29: "tm", 30: "ia64", 31: "pbe"}),
    *_reg(1, 0, "ecx", {0: "sse3", 1: "pclmulqdq", 2: "dtes64", 3: "monitor", 4: "ds-cpl", 5: "vmx", 6: "smx",
                        7: "est", 8: "tm2", 9: "ssse3", 10: "cid", 11: "sdbg", 12: "fma", 13: "cx16", 14: "xtpr",
                        15: "pdcm", 17: "pcid", 18: "dca", 19: "sse4.1", 20: "sse4.2", 21: "x2apic", 22: "movbe",
                        23: "popcnt", 24: "tsc-deadline", 25: "aes", 26: "xsave", 28: "avx", 29: "f16c",
                        30: "rdrand"}),
    *_reg(6, 0, "eax", {2: "arat"}),
    *_reg(7, 0, "ebx", {0: "fsgsbase", 1: "tsc-adjust", 2: "sgx", 3: "bmi1", 4: "hle", 5: "avx2",
                        6: "fdp-excptn-only", 7: "smep", 8: "bmi2", 9: "erms", 10: "invpcid", 11: "rtm",
                        12: "pqm", 13: "zero-fcs-fds", 14: "mpx", 15: "pqe", 16: "avx512f", 17: "avx512dq",
                        18: "rdseed", 19: "adx", 20: "smap", 21: "avx512ifma", 22: "pcommit", 23: "clflushopt",
                        24: "clwb", 25: "intel-pt", 26: "avx512pf", 27: "avx512er", 28: "avx512cd", 29: "sha-ni",
                        30: "avx512bw", 31: "avx512vl"}),
    *_reg(7, 0, "ecx", {0: "prefetchwt1", 1: "avx512vbmi", 2: "umip", 3: "pku", 5: "waitpkg", 6: "avx512vbmi2",
                        7: "cet-ss", 8: "gfni", 9: "vaes", 10: "vpclmulqdq", 11: "avx512vnni", 12: "avx512bitalg",
                        13: "tme", 14: "avx512-vpopcntdq", 16: "la57", 22: "rdpid", 23: "kl", 24: "bus-lock-detect",
                        25: "cldemote", 27: "movdiri", 28: "movdir64b", 29: "enqcmd", 30: "sgxlc", 31: "pks"}),
    *_reg(7, 0, "edx", {2: "avx512-4vnniw", 3: "avx512-4fmaps", 4: "fsrm", 5: "uintr", 8: "avx512-vp2intersect",
                        9: "srbds-ctrl", 10: "md-clear", 11: "rtm-always-abort", 13: "tsx-force-abort",
                        14: "serialize", 15: "hybrid", 16: "tsx-ldtrk", 18: "pconfig", 19: "arch-lbr", 20: "ibt",
                        22: "amx-bf16", 23: "avx512-fp16", 24: "amx-tile", 25: "amx-int8", 26: "spec-ctrl",
                        27: "stibp", 28: "flush-l1d", 29: "arch-capabilities", 30: "core-capability", 31: "ssbd"}),
    *_reg(7, 1, "eax", {0: "sha512", 1: "sm3", 2: "sm4", 4: "avx-vnni", 5: "avx512-bf16", 7: "cmpccxadd",
                        10: "fzrm", 11: "fsrs", 12: "fsrc", 17: "fred", 18: "lkgs", 19: "wrmsrns", 21: "amx-fp16",
                        22: "hreset", 23: "avx-ifma", 26: "lam", 27: "msrlist"}),
    *_reg(7, 1, "edx", {4: "avx-vnni-int8", 5: "avx-ne-convert", 10: "avx-vnni-int16", 14: "prefetchiti",
                        19: "avx10"}),
    *_reg(7, 2, "edx", {0: "intel-psfd", 1: "ipred-ctrl", 2: "rrsba-ctrl", 3: "ddpd-u", 4: "bhi-ctrl",
                        5: "mcdt-no"}),
    *_reg(0xD, 1, "eax", {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves", 4: "xfd"}),
    *_reg(0x80000001, 0, "ecx", {0: "lahf-lm", 1: "cmp-legacy", 2: "svm", 3: "extapic", 4: "cr8legacy", 5: "abm",
                                 6: "sse4a", 7: "misalignsse", 8: "3dnowprefetch", 9: "osvw", 10: "ibs", 11: "xop",
                                 12: "skinit", 13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid-msr",
                                 21: "tbm", 22: "topoext", 23: "perfctr-core", 24: "perfctr-nb", 26: "bpext",
                                 28: "perfctr-l2", 29: "mwaitx"}),
    *_reg(0x80000001, 0, "edx", {11: "syscall", 20: "nx", 22: "mmxext", 25: "fxsr-opt", 26: "pdpe1gb",
                                 27: "rdtscp", 29: "lm", 30: "3dnowext", 31: "3dnow"}),
    *_reg(0x80000007, 0, "edx", {8: "invtsc"}),
    *_reg(0x80000008, 0, "ebx", {0: "clzero", 1: "irperf", 2: "xsaveerptr", 4: "rdpru", 9: "wbnoinvd", 12: "ibpb",
                                 14: "ibrs", 15: "amd-stibp", 17: "stibp-always-on", 23: "amd-ppin", 24: "amd-ssbd",
                                 25: "virt-ssbd", 26: "amd-no-ssb", 28: "amd-psfd"}),
    *_reg(0x80000021, 0, "eax", {0: "no-nested-data-bp", 2: "lfence-always-serializing", 6: "null-sel-clr-base",
                                 8: "auto-ibrs"}),
]

# XSAVE state components (CPUID 0xD sub-leaf = component number) and the features that need them.
XSAVE_COMPONENTS: dict[int, str] = {0: "x87", 1: "sse", 2: "avx", 3: "mpx-bndregs", 4: "mpx-bndcsr",
                                    5: "avx512-opmask", 6: "avx512-zmm-hi256", 7: "avx512-hi16-zmm", 9: "pkru",
                                    17: "amx-xtilecfg", 18: "amx-xtiledata"}
XSAVE_LEGACY = 0b11          # x87 and SSE: always there when XSAVE is
XTILE_DATA = 18              # the dynamic component ARCH_REQ_XCOMP_GUEST_PERM asks for
_NEEDS_XSAVE = {"avx": (2,), "mpx": (3, 4), "avx512f": (5, 6, 7), "pku": (9,), "amx-tile": (17, 18)}
_AVX512 = ("avx512dq", "avx512ifma", "avx512pf", "avx512er", "avx512cd", "avx512bw", "avx512vl", "avx512vbmi",
           "avx512vbmi2", "avx512vnni", "avx512bitalg", "avx512-vpopcntdq", "avx512-4vnniw", "avx512-4fmaps",
           "avx512-vp2intersect", "avx512-fp16", "avx512-bf16")
_REQUIRES: dict[str, tuple[str, ...]] = {
    "avx": ("xsave",), "fma": ("avx",), "f16c": ("avx",), "avx2": ("avx",), "vaes": ("avx", "aes"),
    "vpclmulqdq": ("avx", "pclmulqdq"), "avx-vnni": ("avx2",), "avx-ifma": ("avx2",), "avx512f": ("avx2",),
    **{name: ("avx512f",) for name in _AVX512},
    "xsaveopt": ("xsave",), "xsavec": ("xsave",), "xgetbv1": ("xsave",), "xsaves": ("xsave",), "xfd": ("xsave",),
    "amx-tile": ("xsave",), "amx-bf16": ("amx-tile",), "amx-int8": ("amx-tile",), "amx-fp16": ("amx-tile",),
    "pku": ("xsave",), "ssse3": ("sse3",), "sse4.1": ("ssse3",), "sse4.2": ("sse4.1",), "sse3": ("sse2",),
    "sse2": ("sse",), "sse": ("fxsr",),
}
FEATURES: dict[str, CpuidFeature] = {
    f.name: CpuidFeature(f.name, f.leaf, f.subleaf, f.register, f.bit, _NEEDS_XSAVE.get(f.name, ()),
                         _REQUIRES.get(f.name, ()))
    for f in _TABLE}

MSR_FEATURES: dict[str, MsrFeature] = {
    name: MsrFeature(name, MSR_IA32_ARCH_CAPABILITIES, bit, ("arch-capabilities",))
    for bit, name in {0: "rdctl-no", 1: "ibrs-all", 2: "rsba", 3: "skip-l1dfl-vmentry", 4: "ssb-no", 5: "mds-no",
                      6: "pschange-mc-no", 7: "tsx-ctrl", 8: "taa-no", 13: "sbdr-ssdp-no", 14: "fbsdp-no",
                      15: "psdp-no", 17: "fb-clear", 20: "bhi-no", 24: "pbrsb-no", 26: "gds-no",
                      27: "rfds-no"}.items()}
FEATURE_MSRS = (MSR_IA32_ARCH_CAPABILITIES,)

# Spellings other tools use for the same features (Linux /proc/cpuinfo, libvirt, psABI).
ALIASES = {"pni": "sse3", "sse4_1": "sse4.1", "sse4_2": "sse4.2", "lahf_lm": "lahf-lm", "lzcnt": "abm",
           "pclmuldq": "pclmulqdq", "tsc_deadline_timer": "tsc-deadline", "sha_ni": "sha-ni", "bmi": "bmi1",
           "cx8b": "cx8", "cmpxchg16b": "cx16", "avx512_vnni": "avx512vnni", "avx512_bf16": "avx512-bf16",
           "avx512_fp16": "avx512-fp16", "amx_tile": "amx-tile", "amx_bf16": "amx-bf16", "amx_int8": "amx-int8",
           "sce": "syscall", "osfxsr": "fxsr", "arch_capabilities": "arch-capabilities",
           "tsc_adjust": "tsc-adjust", "lahf-sahf": "lahf-lm"}

# Leaf 1 EDX bits that AMD CPUs repeat in 0x80000001 EDX: not features of their own.
AMD_EDX_ALIASES = 0x0183F3FF


def _registers() -> dict[RegisterKey, int]:
    out: dict[RegisterKey, int] = {}
    for feature in FEATURES.values():
        out[feature.key] = out.get(feature.key, 0) | (1 << feature.bit)
    return out


FEATURE_REGISTERS: dict[RegisterKey, int] = _registers()   # every feature register, with its named bits


def canonical(name: str) -> str:
    """The catalog's spelling of a feature name (case-insensitive; other tools' spellings accepted)."""
    lowered = name.strip().lower()
    lowered = ALIASES.get(lowered, lowered)
    if lowered not in FEATURES and lowered not in MSR_FEATURES and "_" in lowered:
        lowered = lowered.replace("_", "-")
    return lowered


def unknown_names(names: Iterable[str]) -> list[str]:
    return [name for name in names if canonical(name) not in FEATURES and canonical(name) not in MSR_FEATURES]


def feature_order(name: str) -> tuple[int, int, str, int]:
    """A sort key: the order of the features in CPUID (leaf, sub-leaf, register, bit), MSR features last."""
    feature = FEATURES.get(name)
    if feature is not None:
        return (feature.leaf if feature.leaf < 0x80000000 else feature.leaf - 0x7F000000, feature.subleaf,
                feature.register, feature.bit)
    msr = MSR_FEATURES[name]
    return (1 << 32, msr.msr, "", msr.bit)


def sorted_features(names: Iterable[str]) -> list[str]:
    return sorted(set(names), key=feature_order)


def _entry_map(entries: Iterable[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
    out: dict[tuple[int, int], CpuidEntry] = {}
    for entry in entries:
        out.setdefault((entry.function, entry.index), entry)
    return out


def xsave_components(entries: Iterable[CpuidEntry]) -> int:
    """The XCR0 bits CPUID 0xD.0 lists (EDX:EAX), or 0 without that leaf."""
    leaf = _entry_map(entries).get((0xD, 0))
    return 0 if leaf is None else leaf.eax | (leaf.edx << 32)


def cpuid_features(entries: Sequence[CpuidEntry] | Iterable[CpuidEntry]) -> frozenset[str]:
    """The named features a CPUID table offers. A feature whose XSAVE components CPUID 0xD does not list
    is not offered: its registers could not be saved (this is how a host without AMX permission, or a
    table without leaf 0xD, shows)."""
    table = _entry_map(entries)
    basic = table.get((0, 0))
    extended = table.get((0x80000000, 0))
    max_basic = basic.eax if basic is not None else 0
    max_extended = extended.eax if extended is not None else 0
    components = xsave_components(table.values())
    out: set[str] = set()
    for feature in FEATURES.values():
        limit = max_extended if feature.leaf >= 0x80000000 else max_basic
        entry = table.get((feature.leaf, feature.subleaf))
        if entry is None or feature.leaf > limit:
            continue
        if not getattr(entry, feature.register) >> feature.bit & 1:
            continue
        if any(not components >> component & 1 for component in feature.xsave):
            continue
        out.add(feature.name)
    return frozenset(out)


def msr_features(msrs: Mapping[int, int]) -> frozenset[str]:
    """The named feature-MSR bits set in ``msrs`` (index -> value)."""
    return frozenset(f.name for f in MSR_FEATURES.values() if msrs.get(f.msr, 0) >> f.bit & 1)


def register_bits(names: Iterable[str]) -> dict[RegisterKey, int]:
    """The CPUID register values that say exactly ``names`` (only feature registers; unknown names ignored)."""
    out: dict[RegisterKey, int] = dict.fromkeys(FEATURE_REGISTERS, 0)
    for name in names:
        feature = FEATURES.get(name)
        if feature is not None:
            out[feature.key] |= 1 << feature.bit
    return out


def msr_values(names: Iterable[str]) -> dict[int, int]:
    """Feature-MSR values holding exactly the MSR features among ``names``."""
    out: dict[int, int] = {}
    for name in names:
        feature = MSR_FEATURES.get(name)
        if feature is not None:
            out[feature.msr] = out.get(feature.msr, 0) | (1 << feature.bit)
    return out


def xsave_needed(names: Iterable[str]) -> int:
    """The XCR0 bits the features ``names`` need (x87 and SSE whenever XSAVE is among them)."""
    mask = 0
    names = set(names)
    for name in names:
        for component in FEATURES[name].xsave if name in FEATURES else ():
            mask |= 1 << component
    return mask | XSAVE_LEGACY if "xsave" in names else mask


def missing_requirements(names: Iterable[str]) -> list[str]:
    """'a needs b' for each feature whose requirements are not in ``names`` (a consistent set has none)."""
    names = set(names)
    out = []
    for name in sorted_features(names):
        requires = FEATURES[name].requires if name in FEATURES else MSR_FEATURES[name].requires
        out += [f"{name} needs {need}" for need in requires if need not in names]
    return out
