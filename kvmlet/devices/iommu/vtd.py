"""An emulated Intel VT-d DMA-remapping unit: the register file, the translation caches and fault recording.

The guest programs it as it programs hardware (Intel VT-d specification, chapters 3, 6, 7, 9-11): a root table
(latched by GCMD.SRTP from RTADDR), context tables per bus, second-level page tables per domain, then GCMD.TE.
Every DMA of a device behind the unit goes through :meth:`VtdUnit.translate` with the device's source ID (bus <<
8 | devfn) by way of the device's :class:`~kvmlet.devices.iommu.dma.DmaAddressSpace`:

* translation off (GSTS.TES clear) or a pass-through context: the address is used as it is;
* otherwise the context (cached per source ID) and the page walk (cached per domain and page: the IOTLB) give the
  guest-physical address, or a fault: recorded in the fault recording registers (section 7.2.1: primary fault
  logging, faults from a source ID with one pending collapsed into it, overflow in FSTS.PFO), with the fault
  event interrupt (FECTL/FEDATA/FEADDR) sent by MSI unless masked, and the request refused.

The caches behave as the specification lets hardware behave: nothing not present is cached (CAP.CM = 0), and an
entry the guest changed is used until it invalidates it: by CCMD (context cache: global, domain, device), by the
IOTLB registers (global, domain, page-selective with an address mask), or by queued-invalidation descriptors
(:mod:`kvmlet.devices.iommu.invalidation`). After every invalidation (and when translation is switched on or
off) the unit tells the address spaces, which drop the views of guest memory their devices' queues hold, under
the devices' own locks: once the guest sees the invalidation complete, no device uses an old translation.

Locks: register writes come from vCPU threads (``_reg_lock``, held while the address spaces are told); DMA comes
from the event-loop thread, which never takes ``_reg_lock``: the caches have their own lock (``_cache_lock``),
and so do the fault registers (``_fault_lock``); neither is held while anything else is called.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvmlet.devices.iommu import regs as r
from kvmlet.devices.iommu.regs import FaultReason, Granularity, TranslationType
from kvmlet.devices.iommu.walk import Context, Fault, Translation, read_context, walk
from kvmlet.devices.state import VtdFaultRecordState, VtdState, expect_state
from kvmlet.memory import GuestMemory, GuestMemoryError

log = logging.getLogger("kvmlet.vtd")

_MASK32 = 0xFFFF_FFFF
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
MAX_IOTLB_ENTRIES = 4096      # a full IOTLB is emptied (hardware evicts as it likes)
MAX_LOGGED_FAULTS = 8

MsiSender = Callable[[int, int], None]           # (address, data)


class DmaFault(GuestMemoryError):
    """A DMA request the remapping unit refused (the fault is recorded unless the context disables it)."""

    def __init__(self, source_id: int, iova: int, write: bool, fault: Fault) -> None:
        kind = "write" if write else "read"
        super().__init__(f"DMA {kind} of {iova:#x} by {source_name(source_id)}: {fault}")
        self.source_id = source_id
        self.iova = iova
        self.write = write
        self.reason = fault.reason


def source_name(source_id: int) -> str:
    return f"{source_id >> 8:02x}:{source_id >> 3 & 0x1F:02x}.{source_id & 7}"


@dataclass
class VtdStats:
    """What the unit counted (reported through the API's metrics and the benchmark)."""

    translations: int = 0
    window_hits: int = 0               # accesses the devices' address spaces served from windows they kept
    iotlb_hits: int = 0
    iotlb_misses: int = 0
    context_misses: int = 0
    faults: int = 0                    # refused requests (recorded or not)
    faults_recorded: int = 0
    faults_collapsed: int = 0          # a fault of a source ID with one already pending
    faults_overflowed: int = 0         # no free fault record (FSTS.PFO)
    faults_suppressed: int = 0         # the context entry's FPD was set
    context_invalidations: int = 0
    iotlb_invalidations: int = 0
    queued_descriptors: int = 0
    queue_errors: int = 0              # FSTS.IQE
    fault_events: int = 0              # fault-event MSIs sent
    completion_events: int = 0         # invalidation-completion MSIs sent
    ignored_writes: int = 0
    bad_accesses: int = 0
    last_fault: str = ""


@dataclass
class FaultRecord:
    iova: int = 0
    source_id: int = 0
    reason: int = 0
    write: bool = False
    pending: bool = False    # the F bit


class VtdUnit:
    """One DMA-remapping hardware unit (a BusDevice for its 4 KiB register page)."""

    def __init__(self, memory: GuestMemory, send_msi: MsiSender | None = None) -> None:
        self.memory = memory
        self.send_msi = send_msi
        self.stats = VtdStats()
        self._reg_lock = threading.RLock()
        self._cache_lock = threading.Lock()
        self._fault_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._contexts: dict[int, Context] = {}
        self._iotlb: dict[tuple[int, int], Translation] = {}
        self._generation = 0
        self._power_on()

    def _power_on(self) -> None:
        self.translating = False       # GSTS.TES (set before the address spaces are told, cleared after)
        self.gsts = 0
        self.rtaddr = 0
        self.root = 0                  # the root table pointer latched by SRTP
        self.ccmd = 0
        self.pfo = False
        self.iqe = False
        self.fri = 0
        self._next_record = 0
        self.records = [FaultRecord() for _ in range(r.FAULT_RECORDS)]
        self.fectl_im, self.fectl_ip = True, False
        self.fedata = self.feaddr = self.feuaddr = 0
        self.iqh = self.iqt = self.iqa = 0
        self.iwc = False
        self.iectl_im, self.iectl_ip = True, False
        self.iedata = self.ieaddr = self.ieuaddr = 0
        self.iva = 0
        self.iotlb_reg = 0

    # -- listeners: the address spaces -------------------------------------------------------------
    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs after every invalidation (vCPU thread; it may take a device's lock)."""
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _tell_listeners(self) -> None:
        for callback in list(self._listeners):
            callback()

    # -- translation (any thread) --------------------------------------------------------------------
    def translate(self, source_id: int, iova: int, write: bool, record: bool = True) -> Translation | None:
        """The translation of one access, None if the address is used untranslated; DmaFault if refused (and
        recorded, unless ``record`` is False: a probe, not an access)."""
        if not self.translating:
            return None
        self.stats.translations += 1
        context = self._contexts.get(source_id)
        if context is None:
            self.stats.context_misses += 1
            generation = self._generation
            try:
                context = read_context(self.memory, self.root, source_id)
            except Fault as fault:
                raise self._refuse(source_id, iova, write, fault, record) from None
            with self._cache_lock:
                if generation == self._generation:
                    self._contexts[source_id] = context
        if context.translation is TranslationType.PASS_THROUGH:
            return None
        key = (context.domain, iova >> r.PAGE_SHIFT)
        entry = self._iotlb.get(key)
        if entry is not None and (entry.writable if write else entry.readable):
            self.stats.iotlb_hits += 1
            return entry
        self.stats.iotlb_misses += 1
        generation = self._generation
        try:
            entry = walk(self.memory, context, iova, write)
        except Fault as fault:
            raise self._refuse(source_id, iova, write, fault, record) from None
        with self._cache_lock:
            if generation == self._generation:
                if len(self._iotlb) >= MAX_IOTLB_ENTRIES:
                    self._iotlb.clear()
                self._iotlb[key] = entry
        return entry

    @property
    def generation(self) -> int:
        """Bumped by every invalidation and every switch of translation: a view taken under an older generation
        is not to be used (the address spaces' window caches check it)."""
        return self._generation

    def context_of(self, source_id: int) -> Context | None:
        """The cached context of a source ID (for reports and tests)."""
        return self._contexts.get(source_id)

    def _refuse(self, source_id: int, iova: int, write: bool, fault: Fault, record: bool) -> DmaFault:
        error = DmaFault(source_id, iova, write, fault)
        if not record:
            return error
        self.stats.faults += 1
        self.stats.last_fault = str(error)
        if self.stats.faults <= MAX_LOGGED_FAULTS:
            log.info("%s", error)
        if fault.recordable:
            self.record_fault(source_id, iova, fault.reason, write)
        else:
            self.stats.faults_suppressed += 1
        return error

    # -- fault recording (section 7.2.1) -----------------------------------------------------------
    def _status_pending(self) -> bool:
        return self.pfo or self.iqe or any(record.pending for record in self.records)

    def record_fault(self, source_id: int, iova: int, reason: FaultReason, write: bool) -> None:
        with self._fault_lock:
            if self.pfo:
                self.stats.faults_overflowed += 1
                return
            if any(record.pending and record.source_id == source_id for record in self.records):
                self.stats.faults_collapsed += 1
                return
            before = self._status_pending()
            index = self._next_record
            record = self.records[index]
            if record.pending:
                self.pfo = True
                self.stats.faults_overflowed += 1
            else:
                had_pending = any(rec.pending for rec in self.records)
                self.records[index] = FaultRecord(iova & ~(r.PAGE_SIZE - 1), source_id, int(reason), write, True)
                self._next_record = (index + 1) % r.FAULT_RECORDS
                if not had_pending:
                    self.fri = index
                self.stats.faults_recorded += 1
            if not before:
                self._fault_condition()

    def _fault_condition(self) -> None:
        """A new fault-event interrupt condition (``_fault_lock`` held)."""
        self.fectl_ip = True
        if not self.fectl_im:
            self._send_fault_event()

    def _send_fault_event(self) -> None:
        self.fectl_ip = False
        self.stats.fault_events += 1
        self._send(self.feuaddr << 32 | self.feaddr, self.fedata)

    def _send(self, address: int, data: int) -> None:
        if self.send_msi is not None:
            try:
                self.send_msi(address, data)
            except OSError as exc:   # a message KVM refuses (garbage address): the guest asked for it
                self.stats.last_fault = f"interrupt message to {address:#x} not delivered: {exc}"

    def _clear_fault_status(self, value: int) -> None:
        with self._fault_lock:
            if value & r.FSTS_PFO:
                self.pfo = False
            if value & r.FSTS_IQE and self.iqe:
                self.iqe = False
            if not self._status_pending():
                self.fectl_ip = False

    def _write_fault_control(self, value: int) -> None:
        with self._fault_lock:
            self.fectl_im = bool(value & r.CTL_IM)
            if not self.fectl_im and self.fectl_ip:
                self._send_fault_event()

    def _write_record_high(self, index: int, value: int) -> None:
        """The high dword of a record's high half: F is RW1C, the rest read-only."""
        with self._fault_lock:
            if value & (r.FRCD_F >> 32) and self.records[index].pending:
                self.records[index].pending = False
                if not self._status_pending():
                    self.fectl_ip = False

    def queue_error(self, reason: str) -> None:
        """FSTS.IQE: the invalidation queue stops at IQH until the guest clears it (vCPU thread)."""
        self.stats.queue_errors += 1
        self.stats.last_fault = f"invalidation queue error at IQH {self.iqh >> r.QUEUE_INDEX_SHIFT}: {reason}"
        if self.stats.queue_errors <= MAX_LOGGED_FAULTS:
            log.info("%s", self.stats.last_fault)
        with self._fault_lock:
            before = self._status_pending()
            self.iqe = True
            if not before:
                self._fault_condition()

    def completion_event(self) -> None:
        """An invalidation wait descriptor with IF: ICS.IWC, and its interrupt condition if IWC was clear."""
        with self._fault_lock:
            if self.iwc:
                return
            self.iwc = True
            self.iectl_ip = True
            if not self.iectl_im:
                self._send_completion_event()

    def _send_completion_event(self) -> None:
        self.iectl_ip = False
        self.stats.completion_events += 1
        self._send(self.ieuaddr << 32 | self.ieaddr, self.iedata)

    # -- invalidation --------------------------------------------------------------------------------
    def invalidate_contexts(self, granularity: Granularity, domain: int = 0, source_id: int = 0,
                            function_mask: int = 0) -> Granularity:
        """Context-cache invalidation; returns the granularity performed (RESERVED: refused)."""
        if granularity is Granularity.RESERVED:
            return granularity
        self.stats.context_invalidations += 1
        with self._cache_lock:
            self._generation += 1
            if granularity is Granularity.GLOBAL:
                self._contexts.clear()
            elif granularity is Granularity.DOMAIN:
                for sid in [sid for sid, ctx in self._contexts.items() if ctx.domain == domain]:
                    del self._contexts[sid]
            else:
                mask = 0xFFFF & ~(0, 0b100, 0b110, 0b111)[function_mask & 3]   # FM: function bits not compared
                for sid in [sid for sid in self._contexts if sid & mask == source_id & mask]:
                    del self._contexts[sid]
        return granularity

    def invalidate_iotlb(self, granularity: Granularity, domain: int = 0, address: int = 0,
                         address_mask: int = 0) -> Granularity:
        """IOTLB invalidation; returns the granularity performed (a page range larger than MAMV allows is done
        as a domain-selective invalidation)."""
        if granularity is Granularity.RESERVED:
            return granularity
        if granularity is Granularity.DEVICE_OR_PAGE and address_mask > r.MAX_ADDRESS_MASK:
            granularity = Granularity.DOMAIN
        self.stats.iotlb_invalidations += 1
        with self._cache_lock:
            self._generation += 1
            if granularity is Granularity.GLOBAL:
                self._iotlb.clear()
            elif granularity is Granularity.DOMAIN:
                for key in [key for key in self._iotlb if key[0] == domain]:
                    del self._iotlb[key]
            else:
                size = r.PAGE_SIZE << address_mask
                start = address & ~(size - 1)
                end = start + size
                for key in [key for key, entry in self._iotlb.items()
                            if key[0] == domain and entry.iova < end and start < entry.iova + entry.size]:
                    del self._iotlb[key]
        return granularity

    # -- registers (vCPU threads) ----------------------------------------------------------------------
    def bus_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size:
            self.stats.bad_accesses += 1
            return 0
        value = self._read32(offset)
        if size == 8:
            value |= self._read32(offset + 4) << 32
        return value

    def _read32(self, offset: int) -> int:
        high = offset & 4
        base = offset & ~7
        if r.FAULT_REGS <= offset < r.FAULT_REGS_END:
            record = self.records[(offset - r.FAULT_REGS) // 16]
            part = (offset - r.FAULT_REGS) % 16
            if not record.pending and part >= 8:
                return 0
            lo = record.iova if record.pending else 0
            hi = (record.source_id | record.reason << r.FRCD_FR_SHIFT | (0 if record.write else r.FRCD_T)
                  | r.FRCD_F) if record.pending else 0
            value = lo if part < 8 else hi
            return (value >> 32 if high else value) & _MASK32
        value64 = self._read64(base)
        if value64 is None:
            return self._read_dword(offset)
        return (value64 >> 32 if high else value64) & _MASK32

    def _read64(self, base: int) -> int | None:
        if base == r.CAP:
            return r.CAPABILITIES
        if base == r.ECAP:
            return r.EXTENDED_CAPABILITIES
        if base == r.RTADDR:
            return self.rtaddr
        if base == r.CCMD:
            return self.ccmd
        if base == r.IQH:
            return self.iqh
        if base == r.IQT:
            return self.iqt
        if base == r.IQA:
            return self.iqa
        if base == r.IVA:
            return self.iva
        if base == r.IOTLB:
            return self.iotlb_reg
        return None

    def _read_dword(self, offset: int) -> int:
        if offset == r.VER:
            return r.VERSION
        if offset == r.GSTS:
            return self.gsts
        if offset == r.FSTS:
            with self._fault_lock:
                ppf = any(record.pending for record in self.records)
                return (int(self.pfo) * r.FSTS_PFO | int(ppf) * r.FSTS_PPF | int(self.iqe) * r.FSTS_IQE
                        | (self.fri << r.FSTS_FRI_SHIFT if ppf else 0))
        if offset == r.FECTL:
            return int(self.fectl_im) * r.CTL_IM | int(self.fectl_ip) * r.CTL_IP
        if offset == r.FEDATA:
            return self.fedata
        if offset == r.FEADDR:
            return self.feaddr
        if offset == r.FEUADDR:
            return self.feuaddr
        if offset == r.ICS:
            return int(self.iwc)
        if offset == r.IECTL:
            return int(self.iectl_im) * r.CTL_IM | int(self.iectl_ip) * r.CTL_IP
        if offset == r.IEDATA:
            return self.iedata
        if offset == r.IEADDR:
            return self.ieaddr
        if offset == r.IEUADDR:
            return self.ieuaddr
        return 0   # GCMD reads 0; AFLOG, PMEN, IRTA and the rest: not supported, or reserved

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size:
            self.stats.bad_accesses += 1
            return
        with self._reg_lock:
            self._write32(offset, value & _MASK32)
            if size == 8:
                self._write32(offset + 4, value >> 32 & _MASK32)

    def _write32(self, offset: int, value: int) -> None:
        if r.FAULT_REGS <= offset < r.FAULT_REGS_END:
            if (offset - r.FAULT_REGS) % 16 == 12:
                self._write_record_high((offset - r.FAULT_REGS) // 16, value)
            return
        if offset == r.GCMD:
            self._write_gcmd(value)
        elif offset in (r.RTADDR, r.RTADDR + 4):
            self.rtaddr = _merge(self.rtaddr, offset - r.RTADDR, value) & r.RTADDR_MASK
        elif offset == r.CCMD:
            self.ccmd = _merge(self.ccmd, 0, value)
        elif offset == r.CCMD + 4:
            self.ccmd = _merge(self.ccmd, 4, value)
            if self.ccmd & r.CCMD_ICC:
                self._register_context_invalidation()
        elif offset == r.FSTS:
            self._clear_fault_status(value)
        elif offset == r.FECTL:
            self._write_fault_control(value)
        elif offset == r.FEDATA:
            self.fedata = value & r.FEDATA_MASK
        elif offset == r.FEADDR:
            self.feaddr = value & r.FEADDR_MASK
        elif offset == r.FEUADDR:
            self.feuaddr = value
        elif offset == r.IQT:
            self.iqt = value & r.QUEUE_INDEX_MASK
            if self.gsts & r.GSTS_QIES:
                self._process_queue()
        elif offset in (r.IQA, r.IQA + 4):
            self.iqa = _merge(self.iqa, offset - r.IQA, value) & (r.IQA_ADDRESS_MASK | r.IQA_QS_MASK)
        elif offset == r.ICS:
            if value & r.ICS_IWC:
                with self._fault_lock:
                    self.iwc = False
                    self.iectl_ip = False
        elif offset == r.IECTL:
            with self._fault_lock:
                self.iectl_im = bool(value & r.CTL_IM)
                if not self.iectl_im and self.iectl_ip:
                    self._send_completion_event()
        elif offset == r.IEDATA:
            self.iedata = value & r.FEDATA_MASK
        elif offset == r.IEADDR:
            self.ieaddr = value & r.FEADDR_MASK
        elif offset == r.IEUADDR:
            self.ieuaddr = value
        elif offset in (r.IVA, r.IVA + 4):
            self.iva = _merge(self.iva, offset - r.IVA, value) & ~0xF80 & _MASK64
        elif offset == r.IOTLB:
            self.iotlb_reg = _merge(self.iotlb_reg, 0, value)
        elif offset == r.IOTLB + 4:
            self.iotlb_reg = _merge(self.iotlb_reg, 4, value)
            if self.iotlb_reg & r.IOTLB_IVT:
                self._register_iotlb_invalidation()
        elif offset in (r.IQT + 4, r.IQH, r.IQH + 4):
            pass   # reserved upper half; IQH is read-only
        else:
            self.stats.ignored_writes += 1   # read-only, reserved or not supported

    def _write_gcmd(self, value: int) -> None:
        if value & r.Gcmd.SRTP:
            self.root = self.rtaddr & r.RTADDR_MASK
            self.gsts |= r.GSTS_RTPS
        enable = bool(value & r.Gcmd.TE)
        if enable != bool(self.gsts & r.GSTS_TES):
            with self._cache_lock:
                self._generation += 1
            if enable:
                self.translating = True
                self._tell_listeners()      # views taken while translation was off are dropped first
                self.gsts |= r.GSTS_TES
            else:
                self.gsts &= ~r.GSTS_TES
                self.translating = False
                self._tell_listeners()
        queued = bool(value & r.Gcmd.QIE)
        if queued != bool(self.gsts & r.GSTS_QIES):
            if queued:
                self.gsts |= r.GSTS_QIES
                if self.iqt != self.iqh:
                    self._process_queue()
            else:
                self.gsts &= ~r.GSTS_QIES
                self.iqh = 0         # IQH is 0 whenever queued invalidation is disabled (section 11.4.13)
        unsupported = value & (r.Gcmd.IRE | r.Gcmd.SIRTP | r.Gcmd.CFI | r.Gcmd.EAFL | r.Gcmd.SFL | r.Gcmd.WBF)
        if unsupported:
            self.stats.ignored_writes += 1

    def _register_context_invalidation(self) -> None:
        if self.gsts & r.GSTS_QIES:
            self.stats.ignored_writes += 1   # register-based invalidation with queued invalidation on
            self.ccmd &= ~r.CCMD_ICC
            return
        value = self.ccmd
        done = self.invalidate_contexts(Granularity(value >> r.CCMD_CIRG_SHIFT & 3), domain=value & 0xFFFF,
                                        source_id=value >> r.CCMD_SID_SHIFT & 0xFFFF,
                                        function_mask=value >> r.CCMD_FM_SHIFT & 3)
        self._tell_listeners()
        self.ccmd = (value & ~(r.CCMD_ICC | 3 << r.CCMD_CAIG_SHIFT)) | int(done) << r.CCMD_CAIG_SHIFT

    def _register_iotlb_invalidation(self) -> None:
        if self.gsts & r.GSTS_QIES:
            self.stats.ignored_writes += 1
            self.iotlb_reg &= ~r.IOTLB_IVT
            return
        value = self.iotlb_reg
        done = self.invalidate_iotlb(Granularity(value >> r.IOTLB_IIRG_SHIFT & 3),
                                     domain=value >> r.IOTLB_DID_SHIFT & 0xFFFF,
                                     address=self.iva & ~(r.PAGE_SIZE - 1), address_mask=self.iva & r.IVA_AM_MASK)
        self._tell_listeners()
        self.iotlb_reg = (value & ~(r.IOTLB_IVT | 3 << r.IOTLB_IAIG_SHIFT)) | int(done) << r.IOTLB_IAIG_SHIFT

    def _process_queue(self) -> None:
        from kvmlet.devices.iommu.invalidation import process_queue

        if not self.iqe:
            process_queue(self)

    def tell_listeners(self) -> None:
        """Tell the address spaces to drop what they hold (``_reg_lock`` held: queued invalidation)."""
        self._tell_listeners()

    # -- snapshots ----------------------------------------------------------------------------------
    def save_state(self) -> VtdState:
        with self._reg_lock, self._fault_lock:
            return VtdState(
                gsts=self.gsts, rtaddr=self.rtaddr, root=self.root, ccmd=self.ccmd, pfo=self.pfo, iqe=self.iqe,
                fri=self.fri, next_record=self._next_record,
                records=[VtdFaultRecordState(iova=rec.iova, source_id=rec.source_id, reason=rec.reason,
                                             write=rec.write, pending=rec.pending) for rec in self.records],
                fectl_im=self.fectl_im, fectl_ip=self.fectl_ip, fedata=self.fedata, feaddr=self.feaddr,
                feuaddr=self.feuaddr, iqh=self.iqh, iqt=self.iqt, iqa=self.iqa, iwc=self.iwc,
                iectl_im=self.iectl_im, iectl_ip=self.iectl_ip, iedata=self.iedata, ieaddr=self.ieaddr,
                ieuaddr=self.ieuaddr, iva=self.iva, iotlb=self.iotlb_reg)

    def check_state(self, state: object) -> VtdState:
        saved = expect_state(state, VtdState, "vtd")
        if len(saved.records) != r.FAULT_RECORDS:
            from kvmlet.devices.state import DeviceStateError

            raise DeviceStateError(f"vtd: the saved unit has {len(saved.records)} fault records; this one has "
                                   f"{r.FAULT_RECORDS}")
        return saved

    def restore_state(self, state: object) -> None:
        """Load the registers (the caches start empty: the unit reads the guest's tables again)."""
        saved = self.check_state(state)
        with self._reg_lock, self._fault_lock:
            self.gsts = saved.gsts & (r.GSTS_TES | r.GSTS_RTPS | r.GSTS_QIES)
            self.rtaddr, self.root, self.ccmd = saved.rtaddr & r.RTADDR_MASK, saved.root & r.RTADDR_MASK, saved.ccmd
            self.pfo, self.iqe, self.fri = saved.pfo, saved.iqe, saved.fri % r.FAULT_RECORDS
            self._next_record = saved.next_record % r.FAULT_RECORDS
            self.records = [FaultRecord(rec.iova, rec.source_id, rec.reason, rec.write, rec.pending)
                            for rec in saved.records]
            self.fectl_im, self.fectl_ip = saved.fectl_im, saved.fectl_ip
            self.fedata, self.feaddr, self.feuaddr = saved.fedata, saved.feaddr, saved.feuaddr
            self.iqh, self.iqt = saved.iqh & r.QUEUE_INDEX_MASK, saved.iqt & r.QUEUE_INDEX_MASK
            self.iqa, self.iwc = saved.iqa & (r.IQA_ADDRESS_MASK | r.IQA_QS_MASK), saved.iwc
            self.iectl_im, self.iectl_ip = saved.iectl_im, saved.iectl_ip
            self.iedata, self.ieaddr, self.ieuaddr = saved.iedata, saved.ieaddr, saved.ieuaddr
            self.iva, self.iotlb_reg = saved.iva, saved.iotlb
            with self._cache_lock:
                self._generation += 1
                self._contexts.clear()
                self._iotlb.clear()
            self.translating = bool(self.gsts & r.GSTS_TES)
        self._tell_listeners()

    def close(self) -> None:
        self._listeners.clear()


def _merge(register: int, half: int, value: int) -> int:
    """``register`` with its low (``half`` 0) or high (4) dword replaced by ``value``."""
    if half:
        return (register & _MASK32) | value << 32
    return (register & ~_MASK32 & _MASK64) | value
