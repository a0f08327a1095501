"""Custom CPU templates in Firecracker's JSON format (``PUT /cpu-config``, ``--cpu-model FILE``).

A template holds ``cpuid_modifiers`` (leaf, subleaf, KVM flags, and per register a bitmap) and
``msr_modifiers`` (address and bitmap). A bitmap is ``0b`` and one character per bit, most significant
first: ``0`` clears the bit, ``1`` sets it, ``x`` leaves it as it was; ``_`` may separate groups. As in
Firecracker's schema, a bitmap gives every bit (32 for CPUID, 64 for MSRs). ``kvm_capabilities`` lists
KVM capabilities the host must have ("N"), or that Firecracker should stop checking ("!N": kvmlet keeps
its own checks and ignores these). The aarch64 parts (``vcpu_features``, ``reg_modifiers``) are refused.

The template applies to the CPUID table after the CPU model (or the host's, without one) and before the
topology leaves are filled in, as Firecracker applies it before its CPUID normalization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kvmlet.cpu.errors import TemplateError
from kvmlet.kvm.cpuid import CpuidEntry

if TYPE_CHECKING:
    from kvmlet.config.models import CpuConfig

REGISTERS = ("eax", "ebx", "ecx", "edx")


@dataclass(frozen=True)
class Bitmap:
    """Which bits a bitmap fixes (``mask``) and to what (``value``, within the mask)."""

    mask: int
    value: int

    def apply(self, current: int) -> int:
        return (current & ~self.mask) | self.value


@dataclass(frozen=True)
class CpuidModifier:
    leaf: int
    subleaf: int
    flags: int
    register: str
    bitmap: Bitmap


@dataclass(frozen=True)
class MsrModifier:
    address: int
    bitmap: Bitmap


@dataclass(frozen=True)
class CpuTemplate:
    """A parsed custom template."""

    cpuid: tuple[CpuidModifier, ...] = ()
    msrs: tuple[MsrModifier, ...] = ()
    required_caps: tuple[int, ...] = ()

    def apply_cpuid(self, entries: Sequence[CpuidEntry]) -> list[CpuidEntry]:
        """``entries`` with every CPUID modifier applied; a leaf the table lacks is added (zeros, then the
        bitmap), as Firecracker does."""
        out = list(entries)
        for modifier in self.cpuid:
            index = next((i for i, e in enumerate(out)
                          if e.function == modifier.leaf and e.index == modifier.subleaf), None)
            if index is None:
                out.append(CpuidEntry(modifier.leaf, modifier.subleaf, modifier.flags, 0, 0, 0, 0))
                index = len(out) - 1
            entry = out[index]
            value = modifier.bitmap.apply(getattr(entry, modifier.register))
            out[index] = replace(entry, **{modifier.register: value})
        return out

    def apply_msrs(self, current: Mapping[int, int]) -> dict[int, int]:
        """The MSR values to write: each modified MSR's ``current`` value (0 if unknown) with its bitmap."""
        out: dict[int, int] = {}
        for modifier in self.msrs:
            out[modifier.address] = modifier.bitmap.apply(out.get(modifier.address, current.get(modifier.address, 0)))
        return out


def parse_bitmap(text: str, bits: int, label: str) -> Bitmap:
    """``0b`` + ``bits`` characters of 0/1/x (``_`` ignored), most significant first."""
    if not isinstance(text, str) or not text.startswith("0b"):
        raise TemplateError(f"{label}: bitmap {text!r} must start with 0b")
    body = text[2:].replace("_", "")
    bad = sorted(set(body) - set("01xX"))
    if bad:
        raise TemplateError(f"{label}: bitmap {text!r} has {''.join(bad)!r}; only 0, 1, x (and _) are allowed")
    if len(body) != bits:
        raise TemplateError(f"{label}: bitmap {text!r} has {len(body)} bits; it must give all {bits}")
    mask = value = 0
    for char in body:
        mask, value = mask << 1, value << 1
        if char in "01":
            mask |= 1
            value |= char == "1"
    return Bitmap(mask, value)


def _number(value: object, label: str, limit: int) -> int:
    if isinstance(value, bool):
        raise TemplateError(f"{label}: {value!r} is not a number")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip(), 0)
        except ValueError:
            raise TemplateError(f"{label}: {value!r} is not a number (give 0x... or decimal)") from None
    else:
        raise TemplateError(f"{label}: {value!r} is not a number")
    if not 0 <= number < limit:
        raise TemplateError(f"{label}: {value!r} is out of range")
    return number


def parse_template(config: CpuConfig) -> CpuTemplate:
    """The template ``config`` describes, or TemplateError naming the first bad field."""
    if config.vcpu_features or config.reg_modifiers:
        raise TemplateError("cpu-config: vcpu_features and reg_modifiers are for aarch64 hosts; this is x86_64")
    cpuid: list[CpuidModifier] = []
    for leaf in config.cpuid_modifiers:
        label = f"cpu-config: leaf {leaf.leaf} subleaf {leaf.subleaf}"
        function = _number(leaf.leaf, f"{label} leaf", 1 << 32)
        index = _number(leaf.subleaf, f"{label} subleaf", 1 << 32)
        flags = _number(leaf.flags, f"{label} flags", 1 << 32)
        seen: set[str] = set()
        for modifier in leaf.modifiers:
            if modifier.register in seen:
                raise TemplateError(f"{label}: register {modifier.register} is modified twice")
            seen.add(modifier.register)
            bitmap = parse_bitmap(modifier.bitmap, 32, f"{label} {modifier.register}")
            cpuid.append(CpuidModifier(function, index, flags, modifier.register, bitmap))
    msrs = [MsrModifier(_number(msr.addr, f"cpu-config: MSR {msr.addr}", 1 << 32),
                        parse_bitmap(msr.bitmap, 64, f"cpu-config: MSR {msr.addr}"))
            for msr in config.msr_modifiers]
    caps: list[int] = []
    for cap in config.kvm_capabilities:
        text = cap.strip()
        if text.startswith("!"):
            _number(text[1:], f"cpu-config: kvm_capabilities {cap!r}", 1 << 32)
            continue
        caps.append(_number(text.lstrip("+"), f"cpu-config: kvm_capabilities {cap!r}", 1 << 32))
    return CpuTemplate(tuple(cpuid), tuple(msrs), tuple(caps))


def is_template(data: object) -> bool:
    """Whether decoded JSON looks like a Firecracker custom template."""
    keys = {"cpuid_modifiers", "msr_modifiers", "kvm_capabilities", "vcpu_features", "reg_modifiers"}
    return isinstance(data, dict) and bool(keys & set(data)) and "kvmlet_cpu_model" not in data


def load_template(path: str | Path) -> CpuConfig:
    """A template file as the configuration model (checked: bad bitmaps are refused here)."""
    from kvmlet.config import decode
    from kvmlet.config.models import CpuConfig

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TemplateError(f"CPU template {path}: {exc.strerror}") from None
    config = decode(raw, CpuConfig, f"CPU template {path}")
    parse_template(config)
    return config
