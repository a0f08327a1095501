"""The initial vCPU state a boot protocol requires, as plain data (the KVM layer converts it).

- Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long mode
  with paging on, the loaded kernel, zero page and command line identity-mapped, a GDT with flat
  ``__BOOT_CS`` (0x10) and ``__BOOT_DS`` (0x18), CS = ``__BOOT_CS``, DS/ES/SS = ``__BOOT_DS``,
  interrupts disabled, RSI = the zero page.
- PVH (Xen's arch-x86/hvm/start_info.h): 32-bit protected mode, paging off, CR0 = PE (ET is
  read-only 1), CR4 = 0, flat 32-bit CS and DS/ES/SS, TR a 32-bit busy TSS with base 0 and limit
  0x67, EFLAGS.IF/TF/VM clear, EBX = the hvm_start_info.

Segment limits are byte-granular, as ``struct kvm_segment`` has them (a descriptor limit of 0xfffff
with G=1 is 0xffffffff here). The LDT is not described: it is unusable at entry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvmlet.boot.gdt import GDT_LIMIT, IDT_LIMIT, Selector, descriptor_at
from kvmlet.boot.layout import BOOT_STACK_TOP, GDT_ADDR, IDT_ADDR, PML4_ADDR


class Cr0(enum.IntFlag):
    PE = 1 << 0
    MP = 1 << 1
    ET = 1 << 4
    NE = 1 << 5
    WP = 1 << 16
    PG = 1 << 31


class Cr4(enum.IntFlag):
    PAE = 1 << 5


class Efer(enum.IntFlag):
    SCE = 1 << 0
    LME = 1 << 8
    LMA = 1 << 10


RFLAGS_RESERVED = 1 << 1  # bit 1 always reads 1; IF, TF and VM are clear
PVH_TSS_LIMIT = 0x67
TSS_BUSY_32 = 0xB


@dataclass(frozen=True)
class Segment:
    """A segment register's hidden state, field for field as ``struct kvm_segment``."""

    base: int
    limit: int
    selector: int
    type: int
    present: bool
    dpl: int
    db: bool
    s: bool
    l: bool  # noqa: E741 - the architectural name
    g: bool
    avl: bool = False

    @classmethod
    def from_descriptor(cls, selector: int, descriptor: int) -> Segment:
        """The segment loaded from ``descriptor`` (a GDT entry) through ``selector``."""
        base = ((descriptor >> 16) & 0xFFFFFF) | ((descriptor >> 56) & 0xFF) << 24
        raw_limit = (descriptor & 0xFFFF) | ((descriptor >> 48) & 0xF) << 16
        access = (descriptor >> 40) & 0xFF
        flags = (descriptor >> 52) & 0xF
        granular = bool(flags & 0x8)
        return cls(
            base=base,
            limit=(raw_limit << 12) | 0xFFF if granular else raw_limit,
            selector=selector,
            type=access & 0xF,
            present=bool(access & 0x80),
            dpl=(access >> 5) & 3,
            db=bool(flags & 0x4),
            s=bool(access & 0x10),
            l=bool(flags & 0x2),
            g=granular,
            avl=bool(flags & 0x1),
        )

    @classmethod
    def from_gdt(cls, selector: Selector) -> Segment:
        """The segment for ``selector`` of the boot GDT."""
        return cls.from_descriptor(int(selector), descriptor_at(int(selector)))


@dataclass(frozen=True)
class BootCpuState:
    """Registers of the boot vCPU at the kernel's entry point."""

    rip: int
    rsp: int
    rsi: int
    rbx: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int


def long_mode_state(entry: int, zero_page: int) -> BootCpuState:
    """The state for the Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page."""
    data = Segment.from_gdt(Selector.BOOT_DS)
    return BootCpuState(
        rip=entry,
        rsp=BOOT_STACK_TOP,
        rsi=zero_page,
        rbx=0,
        rflags=RFLAGS_RESERVED,
        cr0=int(Cr0.PE | Cr0.MP | Cr0.ET | Cr0.NE | Cr0.WP | Cr0.PG),
        cr3=PML4_ADDR,
        cr4=int(Cr4.PAE),
        efer=int(Efer.LME | Efer.LMA),
        cs=Segment.from_gdt(Selector.BOOT_CS),
        ds=data,
        es=data,
        fs=data,
        gs=data,
        ss=data,
        tr=Segment.from_gdt(Selector.TSS),
        gdt_base=GDT_ADDR,
        gdt_limit=GDT_LIMIT,
        idt_base=IDT_ADDR,
        idt_limit=IDT_LIMIT,
    )


def pvh_state(entry: int, start_info: int) -> BootCpuState:
    """The state for the PVH entry: 32-bit protected mode, paging off, RBX = hvm_start_info."""
    data = Segment.from_gdt(Selector.DATA32)
    tss = Segment(
        base=0,
        limit=PVH_TSS_LIMIT,
        selector=int(Selector.TSS),
        type=TSS_BUSY_32,
        present=True,
        dpl=0,
        db=False,
        s=False,
        l=False,
        g=False,
    )
    return BootCpuState(
        rip=entry,
        rsp=BOOT_STACK_TOP,
        rsi=0,
        rbx=start_info,
        rflags=RFLAGS_RESERVED,
        cr0=int(Cr0.PE | Cr0.ET),
        cr3=0,
        cr4=0,
        efer=0,
        cs=Segment.from_gdt(Selector.CODE32),
        ds=data,
        es=data,
        fs=data,
        gs=data,
        ss=data,
        tr=tss,
        gdt_base=GDT_ADDR,
        gdt_limit=GDT_LIMIT,
        idt_base=IDT_ADDR,
        idt_limit=IDT_LIMIT,
    )
