"""Numbers from the Intel VT-d specification (Intel Virtualization Technology for Directed I/O, Architecture
Specification): the register file of a DMA-remapping unit (chapter 11), the legacy-mode root, context and
second-level paging entries (chapter 9), the queued-invalidation descriptors (section 6.5.2) and the fault
reasons (chapter 7).

What this unit reports it can do (CAP and ECAP below) is what :mod:`kvmlet.devices.iommu.vtd` implements: legacy
translation mode only, 39- and 48-bit second-level tables (3 and 4 levels) with 2 MiB and 1 GiB pages,
page-selective invalidation, queued invalidation, pass-through; no interrupt remapping, no device-TLBs (ATS), no
scalable mode, no advanced fault logging, no protected memory regions, no caching mode.
"""

from __future__ import annotations

import enum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
REGISTER_WINDOW = 0x1000          # one 4 KiB page of registers

HAW = 48                          # host address width: table pointers and page frames above it are reserved
MGAW = 48                         # maximum guest address width (input addresses)
DOMAIN_BITS = 16                  # CAP.ND = 6: 64 K domain IDs (all 16 bits of the context entry's DID)
FAULT_RECORDS = 8                 # CAP.NFR + 1
MAX_ADDRESS_MASK = 18             # CAP.MAMV: page-selective invalidation of up to 2**18 pages (1 GiB)

# -- register offsets (section 11.4) ------------------------------------------------------------------
VER = 0x000
CAP = 0x008
ECAP = 0x010
GCMD = 0x018
GSTS = 0x01C
RTADDR = 0x020
CCMD = 0x028
FSTS = 0x034
FECTL = 0x038
FEDATA = 0x03C
FEADDR = 0x040
FEUADDR = 0x044
AFLOG = 0x058
PMEN = 0x064
IQH = 0x080
IQT = 0x088
IQA = 0x090
ICS = 0x09C
IECTL = 0x0A0
IEDATA = 0x0A4
IEADDR = 0x0A8
IEUADDR = 0x0AC
IRTA = 0x0B8
IOTLB_REGS = 0x100                # ECAP.IRO: IVA here, the IOTLB invalidate register 8 bytes on
IVA = IOTLB_REGS
IOTLB = IOTLB_REGS + 8
FAULT_REGS = 0x200                # CAP.FRO: the fault recording registers, 16 bytes each
FAULT_REGS_END = FAULT_REGS + 16 * FAULT_RECORDS

VERSION = 0x10                    # major 1, minor 0: the register layout above (QEMU reports the same)

# CAP fields (section 11.4.2)
CAP_ND = 6                        # bits 2:0: 2**(4 + 2*ND) domains
CAP_SAGAW_39 = 1 << 9             # bit 1 of SAGAW (bits 12:8): 39-bit, 3-level tables
CAP_SAGAW_48 = 1 << 10            # bit 2: 48-bit, 4-level tables
CAP_MGAW_SHIFT = 16               # bits 21:16: MGAW - 1
CAP_FRO_SHIFT = 24                # bits 33:24: fault recording offset / 16
CAP_SLLPS_2M = 1 << 34            # bits 37:34: second-level large pages
CAP_SLLPS_1G = 1 << 35
CAP_PSI = 1 << 39
CAP_NFR_SHIFT = 40                # bits 47:40: records - 1
CAP_MAMV_SHIFT = 48               # bits 53:48

CAPABILITIES = (CAP_ND | CAP_SAGAW_39 | CAP_SAGAW_48 | (MGAW - 1) << CAP_MGAW_SHIFT
                | (FAULT_REGS // 16) << CAP_FRO_SHIFT | CAP_SLLPS_2M | CAP_SLLPS_1G | CAP_PSI
                | (FAULT_RECORDS - 1) << CAP_NFR_SHIFT | MAX_ADDRESS_MASK << CAP_MAMV_SHIFT)

# ECAP fields (section 11.4.3)
ECAP_C = 1 << 0                   # page-walk coherency: the unit reads tables from memory, no flush needed
ECAP_QI = 1 << 1                  # queued invalidation
ECAP_DT = 1 << 2                  # device-TLBs: not supported
ECAP_IR = 1 << 3                  # interrupt remapping: not supported
ECAP_PT = 1 << 6                  # pass-through translation type
ECAP_IRO_SHIFT = 8                # bits 17:8: IOTLB register offset / 16

EXTENDED_CAPABILITIES = ECAP_C | ECAP_QI | ECAP_PT | (IOTLB_REGS // 16) << ECAP_IRO_SHIFT


class Gcmd(enum.IntFlag):
    """Global command bits (section 11.4.4); GSTS reports their status in the same positions."""

    CFI = 1 << 23      # compatibility format interrupts (interrupt remapping: not supported)
    SIRTP = 1 << 24    # set interrupt remap table pointer (not supported)
    IRE = 1 << 25      # interrupt remapping enable (not supported)
    QIE = 1 << 26      # queued invalidation enable
    WBF = 1 << 27      # write buffer flush (CAP.RWBF = 0: not needed)
    EAFL = 1 << 28     # advanced fault logging (not supported)
    SFL = 1 << 29      # set fault log (not supported)
    SRTP = 1 << 30     # set root table pointer (one-shot)
    TE = 1 << 31       # translation enable


# GSTS bits kvmlet's unit can set (the others stay 0: what they report is not supported)
GSTS_TES = int(Gcmd.TE)
GSTS_RTPS = int(Gcmd.SRTP)
GSTS_QIES = int(Gcmd.QIE)

RTADDR_MASK = ((1 << HAW) - 1) & ~(PAGE_SIZE - 1)   # TTM (bits 11:10) stays 0: legacy mode only

# CCMD (section 11.4.6)
CCMD_ICC = 1 << 63
CCMD_CIRG_SHIFT = 61
CCMD_CAIG_SHIFT = 59
CCMD_FM_SHIFT = 32
CCMD_SID_SHIFT = 16

# IOTLB invalidate register and IVA (section 11.4.8)
IOTLB_IVT = 1 << 63
IOTLB_IIRG_SHIFT = 60
IOTLB_IAIG_SHIFT = 57
IOTLB_DID_SHIFT = 32
IVA_IH = 1 << 6
IVA_AM_MASK = 0x3F


class Granularity(enum.IntEnum):
    """Invalidation granularities of CCMD.CIRG, IOTLB.IIRG and the descriptors' G fields."""

    RESERVED = 0
    GLOBAL = 1
    DOMAIN = 2
    DEVICE_OR_PAGE = 3   # device-selective (context cache) or page-selective (IOTLB)


# FSTS (section 11.4.9)
FSTS_PFO = 1 << 0
FSTS_PPF = 1 << 1
FSTS_IQE = 1 << 4
FSTS_FRI_SHIFT = 8
FSTS_RW1C = FSTS_PFO | FSTS_IQE    # ICE and ITE are reserved without device-TLBs

# FECTL / IECTL (sections 11.4.10, 11.4.17)
CTL_IM = 1 << 31
CTL_IP = 1 << 30

FEDATA_MASK = 0xFFFF
FEADDR_MASK = 0xFFFFFFFC

# IQH / IQT / IQA (sections 11.4.13-11.4.15): 128-bit descriptors (IQA.DW needs scalable mode)
QUEUE_INDEX_SHIFT = 4
QUEUE_INDEX_MASK = 0x7FFF << QUEUE_INDEX_SHIFT    # bits 18:4
IQA_QS_MASK = 0x7
IQA_ADDRESS_MASK = RTADDR_MASK
DESCRIPTOR_SIZE = 16
ICS_IWC = 1 << 0

# Fault recording register, high 64 bits (section 11.4.14)
FRCD_F = 1 << 63
FRCD_T = 1 << 62           # 1: read request, 0: write request
FRCD_FR_SHIFT = 32


class FaultReason(enum.IntEnum):
    """Fault reasons for untranslated requests in legacy mode (chapter 7, table "Non-recoverable faults")."""

    ROOT_NOT_PRESENT = 0x1          # the root entry's Present field is 0
    CONTEXT_NOT_PRESENT = 0x2       # the context entry's Present field is 0
    CONTEXT_INVALID = 0x3           # invalid programming of a context entry (AW, TT not supported)
    ADDRESS_BEYOND_WIDTH = 0x4      # input address above 2**AGAW - 1
    NO_WRITE = 0x5                  # a write to a page without write permission (not present included)
    NO_READ = 0x6                   # a read from a page without read permission (not present included)
    PAGING_ENTRY_ACCESS = 0x7       # a second-level paging entry beyond the host address width or not in memory
    ROOT_TABLE_ACCESS = 0x8         # the root entry beyond the host address width or not in memory
    CONTEXT_TABLE_ACCESS = 0x9      # the context entry beyond the host address width or not in memory
    ROOT_RESERVED = 0xA             # non-zero reserved field in a present root entry
    CONTEXT_RESERVED = 0xB          # non-zero reserved field in a present context entry
    PAGING_ENTRY_RESERVED = 0xC     # non-zero reserved field in a second-level entry with R or W set


# Root entry, legacy mode (section 9.1)
ROOT_P = 1 << 0
ROOT_CTP_MASK = RTADDR_MASK
ROOT_LO_RESERVED = ~(ROOT_CTP_MASK | ROOT_P) & 0xFFFF_FFFF_FFFF_FFFF   # bits 11:1 and above HAW
ROOT_HI_RESERVED = 0xFFFF_FFFF_FFFF_FFFF                              # the upper 64 bits (UCTP: extended mode)

# Context entry, legacy mode (section 9.3)
CONTEXT_P = 1 << 0
CONTEXT_FPD = 1 << 1
CONTEXT_TT_SHIFT = 2
CONTEXT_TT_MASK = 0x3 << CONTEXT_TT_SHIFT
CONTEXT_SLPTPTR_MASK = RTADDR_MASK
CONTEXT_LO_RESERVED = (0xFF0 | ~((1 << HAW) - 1)) & 0xFFFF_FFFF_FFFF_FFFF   # bits 11:4 and above HAW
CONTEXT_AW_MASK = 0x7
CONTEXT_DID_SHIFT = 8
CONTEXT_HI_RESERVED = 0xFFFF_FFFF_FF00_0080     # bit 7, bits 127:88 (AVAIL, bits 6:3, is the software's)


class TranslationType(enum.IntEnum):
    """The context entry's TT field (legacy mode)."""

    UNTRANSLATED = 0     # second-level translation, no device-TLB
    DEVICE_TLB = 1       # also translated requests (ATS): reserved without ECAP.DT
    PASS_THROUGH = 2     # addresses used as they are (ECAP.PT)
    RESERVED = 3


# Address widths: context AW field -> (levels, width)
ADDRESS_WIDTHS = {1: (3, 39), 2: (4, 48)}

# Second-level paging entries (section 9.8)
SL_R = 1 << 0
SL_W = 1 << 1
SL_PS = 1 << 7
SL_ADDRESS_MASK = RTADDR_MASK
SL_IGNORED = 0xBFF0_0000_0000_0000                 # bits 63 and 61:52 are the software's
SL_TM = 1 << 62                                     # transient mapping: reserved without ECAP.DT
_ABOVE_HAW = ~((1 << HAW) - 1) & 0xFFFF_FFFF_FFFF_FFFF & ~SL_IGNORED
SL_SNP = 1 << 11                                    # snoop: reserved without ECAP.SC
# reserved bits by level (4 = PML4E .. 1 = PTE) and for large-page leaves (PDE 2 MiB, PDPE 1 GiB)
SL_RESERVED = {4: SL_PS | SL_SNP | _ABOVE_HAW, 3: SL_SNP | _ABOVE_HAW, 2: SL_SNP | _ABOVE_HAW,
               1: SL_SNP | _ABOVE_HAW}
SL_RESERVED_LARGE = {2: SL_SNP | 0x1F_F000 | _ABOVE_HAW, 3: SL_SNP | 0x3FFF_F000 | _ABOVE_HAW}

# Queued-invalidation descriptors, 128-bit (section 6.5.2)
DESC_TYPE_MASK = 0xF
DESC_TYPE_HIGH_MASK = 0x7 << 9            # type bits 6:4 (scalable-mode descriptors): must be 0 here


class DescriptorType(enum.IntEnum):
    CONTEXT_CACHE = 1
    IOTLB = 2
    DEVICE_TLB = 3
    INTERRUPT_ENTRY_CACHE = 4
    WAIT = 5
    PASID_IOTLB = 6
    PASID_CACHE = 7


DESC_G_SHIFT = 4
# context-cache invalidate: bits 5:4 G, 31:16 DID, 47:32 SID, 49:48 FM
CC_DESC_LO_RESERVED = 0xFFFC_0000_0000_FFC0       # bits 15:6 (type bits 6:4 included) and 63:50
CC_DESC_HI_RESERVED = 0xFFFF_FFFF_FFFF_FFFF
# IOTLB invalidate: bits 5:4 G, 6 DW, 7 DR, 31:16 DID; high: 63:12 ADDR, 6 IH, 5:0 AM
IOTLB_DESC_LO_RESERVED = 0xFFFF_FFFF_0000_FF00
IOTLB_DESC_HI_RESERVED = 0xF80
IOTLB_DESC_DR = 1 << 7
IOTLB_DESC_DW = 1 << 6
# invalidation wait: 4 IF, 5 SW, 6 FN, 7 PD, 63:32 status data; high: 63:2 status address
WAIT_IF = 1 << 4
WAIT_SW = 1 << 5
WAIT_FN = 1 << 6
WAIT_LO_RESERVED = 0xFFFF_FF80                    # bits 31:7 (PD: CAP.PDS is 0; type bits 6:4 included)
WAIT_HI_RESERVED = 0x3

MSI_ADDRESS_BASE = 0xFEE0_0000      # the interrupt address range (section 3.13): not remapped without IR
MSI_ADDRESS_END = 0xFEF0_0000
