"""The CPU virtualization side: which back end serves KVM, TDP or shadow paging, VPID, APICv and friends."""

from __future__ import annotations

from dataclasses import dataclass

from kvmlet.host.cpu import CpuInfo, VirtFamily, read_cpuinfo
from kvmlet.host.model import Backend, Feature, Status
from kvmlet.host.tree import Root, module_params, param_enabled, read_line

A, V, X = Status.ACTIVE, Status.AVAILABLE, Status.ABSENT

SHADOW_PAGING = "shadow paging: guest page faults and page-table writes trap to KVM"
SHADOW_PAGING_NOTE = ("Shadow paging: KVM keeps its own page tables in step with the guest's, so the first "
                      "touch of each guest page, every guest page-table write and every CR3 load (context "
                      "switch) costs an exit; memory-heavy and fork-heavy guests pay most.")


@dataclass(frozen=True)
class VirtState:
    """The module parameters and CPU flags the virtualization rows are computed from."""

    backend: Backend
    cpu: CpuInfo
    kvm: dict[str, str] | None
    intel: dict[str, str] | None
    amd: dict[str, str] | None
    pvm: dict[str, str] | None


def _module_live(root: Root, module: str) -> bool:
    """Loaded as a module (initstate "live") or built in (no initstate)."""
    state = read_line(root, f"/sys/module/{module}/initstate")
    return state is None or state == "live"


def detect_backend(root: Root = "/", cpu: CpuInfo | None = None) -> Backend:
    """Which KVM back end this host runs, from /sys/module and the CPU's vmx/svm flags.

    A built-in kvm_intel/kvm_amd shows up in /sys/module even where it could not start, so the hardware
    back ends also need the CPU flag. When a hardware module and kvm_pvm are both there, /dev/kvm is taken
    to be the hardware module's.
    """
    cpu = cpu if cpu is not None else read_cpuinfo(root)
    if module_params(root, "kvm_intel") is not None and _module_live(root, "kvm_intel") and cpu.has("vmx"):
        return Backend.VMX
    if module_params(root, "kvm_amd") is not None and _module_live(root, "kvm_amd") and cpu.has("svm"):
        return Backend.SVM
    if module_params(root, "kvm_pvm") is not None:
        return Backend.PVM
    return Backend.NONE


def read_virt_state(cpu: CpuInfo, root: Root = "/") -> VirtState:
    return VirtState(
        backend=detect_backend(root, cpu),
        cpu=cpu,
        kvm=module_params(root, "kvm"),
        intel=module_params(root, "kvm_intel"),
        amd=module_params(root, "kvm_amd"),
        pvm=module_params(root, "kvm_pvm"),
    )


# -- back end rows -------------------------------------------------------------------------------------
def hardware_feature(state: VirtState) -> Feature:
    name = "VT-x/AMD-V"
    if state.backend is Backend.VMX:
        return Feature(name, A, "VT-x (kvm_intel): guest code runs natively in VMX non-root mode")
    if state.backend is Backend.SVM:
        return Feature(name, A, "AMD-V (kvm_amd): guest code runs natively in SVM guest mode")
    for flag, module in (("vmx", "kvm_intel"), ("svm", "kvm_amd")):
        if state.cpu.has(flag):
            return Feature(name, V, f"CPU has {flag} but {module} is not loaded: modprobe {module}")
    return Feature(name, X, "no vmx/svm flag in /proc/cpuinfo: no hardware virtualization exposed")


def pvm_feature(state: VirtState) -> Feature:
    name = "PVM"
    if state.backend is Backend.PVM:
        return Feature(name, A, "kvm_pvm: guest kernel code emulated (needs a PVM-aware kernel), "
                       "user code native")
    if state.pvm is not None:
        return Feature(name, V, f"kvm_pvm is loaded, but /dev/kvm is taken to be {state.backend.module}'s")
    return Feature(name, X, "kvm_pvm not loaded (only needed where there is no VT-x/AMD-V)")


# -- paging -------------------------------------------------------------------------------------------
def tdp_enabled(state: VirtState) -> bool:
    if state.backend is Backend.VMX:
        return param_enabled((state.intel or {}).get("ept")) is True
    if state.backend is Backend.SVM:
        return param_enabled((state.amd or {}).get("npt")) is True
    return False


def tdp_feature(state: VirtState) -> Feature:
    name = "TDP (EPT/NPT)"
    if state.backend is Backend.PVM:
        return Feature(name, X, f"{SHADOW_PAGING} (always on PVM)")
    hw = {Backend.VMX: ("EPT", "ept", "kvm_intel"), Backend.SVM: ("NPT", "npt", "kvm_amd")}.get(state.backend)
    if hw is None:
        for label, flag, module in (("EPT", "ept", "kvm_intel"), ("NPT", "npt", "kvm_amd")):
            if state.cpu.has(flag):
                return Feature(name, V, f"CPU has {label}; load {module} to use it")
        return Feature(name, X, "no KVM back end loaded")
    label, param, module = hw
    if tdp_enabled(state):
        return Feature(name, A, f"{label}: the CPU walks guest page tables; guest page faults cost no exit")
    if state.cpu.has(param):
        params = (state.intel if module == "kvm_intel" else state.amd) or {}
        setting = params.get(param, "unset")
        return Feature(name, V, f"CPU has {label} but {module} {param}={setting}: {SHADOW_PAGING}")
    return Feature(name, X, f"CPU lacks {label}: {SHADOW_PAGING}")


def tdp_mmu_feature(state: VirtState) -> Feature:
    name = "TDP MMU"
    value = param_enabled((state.kvm or {}).get("tdp_mmu"))
    if not tdp_enabled(state):
        return Feature(name, X, "only with EPT/NPT; shadow paging uses KVM's legacy MMU")
    if value is True:
        return Feature(name, A, "EPT/NPT faults handled in parallel: scales with vCPUs")
    if value is False:
        return Feature(name, V, "kvm tdp_mmu=N: the legacy MMU serializes EPT/NPT faults")
    return Feature(name, X, "kvm reports no tdp_mmu parameter (older kernel): legacy MMU")


# -- kvm_intel / kvm_amd switches ---------------------------------------------------------------------
@dataclass(frozen=True)
class Switch:
    """A hardware feature that a vendor module turns on with a parameter, and its CPU flags."""

    module: str
    param: str
    flags: tuple[str, ...]
    on: str
    off: str


def switch_feature(name: str, switch: Switch, state: VirtState) -> Feature:
    params = state.intel if switch.module == "kvm_intel" else state.amd
    cpu_has = any(state.cpu.has(flag) for flag in switch.flags)
    if params is None or state.backend.module != switch.module:
        if cpu_has:
            return Feature(name, V, f"CPU has it; {switch.module} not loaded")
        if state.backend is Backend.NONE:
            return Feature(name, X, f"{switch.module} not loaded (no KVM back end)")
        kind = "a VT-x" if switch.module == "kvm_intel" else "an AMD-V"
        return Feature(name, X, f"{switch.module} not loaded: {kind} feature, unused by "
                       f"{state.backend.value}")
    enabled = param_enabled(params.get(switch.param))
    if enabled:
        return Feature(name, A, switch.on)
    if enabled is None:
        if cpu_has:
            return Feature(name, V, f"CPU has it; {switch.module} reports no {switch.param} parameter")
        return Feature(name, X, f"{switch.module} reports no {switch.param} parameter: {switch.off}")
    if cpu_has:
        setting = f"{switch.param}={params[switch.param]}"
        return Feature(name, V, f"CPU has it but {switch.module} {setting}: {switch.off}")
    return Feature(name, X, f"CPU lacks it: {switch.off}")


VPID = Switch("kvm_intel", "vpid", ("vpid",),
              "TLB tagged per vCPU: no TLB flush on VM entry/exit",
              "TLB flushed on every VM entry/exit")
FLEXPRIORITY = Switch("kvm_intel", "flexpriority", ("flexpriority",),
                      "guest TPR (task priority) accesses without exits",
                      "guest TPR accesses exit")
APICV = Switch("kvm_intel", "enable_apicv", ("apicv", "vid", "posted_intr"),
               "APICv: APIC accesses and interrupt delivery (posted) without exits",
               "APIC accesses, EOIs and interrupt injection exit")
AVIC = Switch("kvm_amd", "avic", ("avic",),
              "AVIC: APIC accesses and IPIs between running vCPUs without exits",
              "APIC accesses, EOIs and interrupt injection exit")
UNRESTRICTED = Switch("kvm_intel", "unrestricted_guest", ("unrestricted_guest",),
                      "real mode and unpaged protected mode run in hardware",
                      "guest real-mode code is emulated (slow firmware and boot)")
PML = Switch("kvm_intel", "enable_pml", ("pml",),
             "the CPU logs dirty pages: cheap dirty tracking for live migration",
             "dirty logging write-protects pages (a fault per first write)")


def vpid_feature(state: VirtState) -> Feature:
    if state.backend is Backend.SVM:
        return Feature("VPID", A, "AMD's ASIDs tag the TLB (always on): no flush on VM entry/exit")
    return switch_feature("VPID", VPID, state)


def flexpriority_feature(state: VirtState) -> Feature:
    if state.backend is Backend.SVM:
        return Feature("FlexPriority", A, "AMD's V_TPR: guest CR8 (TPR) accesses without exits")
    return switch_feature("FlexPriority", FLEXPRIORITY, state)


def apic_virt_feature(state: VirtState) -> Feature:
    switch = AVIC if state.backend is Backend.SVM or state.cpu.family is VirtFamily.SVM else APICV
    return switch_feature("APICv/AVIC", switch, state)


def unrestricted_guest_feature(state: VirtState) -> Feature:
    if state.backend is Backend.SVM:
        return Feature("Unrestricted guest", A, "SVM runs real mode in hardware (no such restriction)")
    return switch_feature("Unrestricted guest", UNRESTRICTED, state)


def pml_feature(state: VirtState) -> Feature:
    if state.backend is Backend.SVM:
        return Feature("PML", X, f"Intel only: {PML.off}")
    return switch_feature("PML", PML, state)


def snapshot_tsc_feature(state: VirtState) -> Feature:
    """Whether a snapshot's restore gives the guest back its TSC (PLATFORM.md: not under PVM)."""
    if state.backend is Backend.PVM:
        return Feature("Snapshot TSC", X, "PVM ignores IA32_TSC writes: a restored guest's TSC is the host's "
                                          "(it jumps by the downtime); kvmclock is restored")
    if state.backend is Backend.NONE:
        return Feature("Snapshot TSC", X, "no KVM back end")
    return Feature("Snapshot TSC", A, "restored from the snapshot (IA32_TSC, the guest's offset) with kvmclock")


def virt_features(state: VirtState) -> list[Feature]:
    return [
        hardware_feature(state),
        pvm_feature(state),
        tdp_feature(state),
        tdp_mmu_feature(state),
        vpid_feature(state),
        flexpriority_feature(state),
        apic_virt_feature(state),
        unrestricted_guest_feature(state),
        pml_feature(state),
        snapshot_tsc_feature(state),
    ]


def virt_notes(state: VirtState) -> list[str]:
    """Longer explanations of what the back end means, shown under the table."""
    notes: list[str] = []
    if state.backend is Backend.PVM:
        notes += [
            "PVM: guest kernel-mode (CPL0) code runs in KVM's instruction emulator, about a thousand times "
            "slower than on hardware; user-mode (CPL3) code runs natively.",
            "PVM: a stock Linux kernel stops early (emulation failure); boot a PVM-aware guest kernel or "
            "kvmlet's test guest.",
            "PVM: CPUID set with KVM_SET_CPUID2 is not what guests see (kernel mode reads a PVM-chosen "
            "value, user mode the host's); CPU models are checked through the KVM_SET_CPUID2/"
            "KVM_GET_CPUID2 round trip only.",
        ]
    elif state.backend is Backend.NONE:
        notes.append("No KVM back end is loaded: enable VT-x/AMD-V in the firmware and load kvm_intel or "
                     "kvm_amd (or kvm_pvm on a host without them).")
    if state.backend is not Backend.NONE and not tdp_enabled(state):
        notes.append(SHADOW_PAGING_NOTE)
    if state.cpu.has("hypervisor"):
        notes.append("This host is itself a virtual machine (cpuinfo flag 'hypervisor'): KVM runs nested "
                     "here, and every exit costs more than on bare metal.")
    return notes
