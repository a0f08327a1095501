"""The baseline of a pool of hosts, libvirt's ``cpu-baseline`` semantics: the largest feature set every host
offers, named as the closest catalog model plus the features beyond it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvmlet.cpu.capture import HostCapture
from kvmlet.cpu.errors import CpuModelError, VendorMismatchError
from kvmlet.cpu.features import MSR_FEATURES, sorted_features
from kvmlet.cpu.models import CpuModel, catalog
from kvmlet.cpu.plan import needed_levels


@dataclass(frozen=True)
class Baseline:
    vendor: str
    features: frozenset[str]
    model: CpuModel | None      # the catalog model with the most features, all in the baseline
    extra: list[str]            # baseline features beyond that model
    hosts: int
    msrs_compared: bool         # False when a capture had no MSRs: the baseline then has no MSR features

    def summary(self) -> str:
        base = self.model.name if self.model is not None else "no catalog model"
        extra = f" + {' '.join(self.extra)}" if self.extra else ""
        return f"{self.vendor}, {self.hosts} hosts, {len(self.features)} common features: {base}{extra}"

    def as_model(self, name: str = "baseline") -> CpuModel:
        """The baseline as a model a VM can run with (``--cpu-model FILE`` of :meth:`CpuModel.to_file`)."""
        base = self.model
        level, xlevel = needed_levels(self.features)
        return CpuModel(
            name=name, vendor=self.vendor, features=self.features,
            family=base.family if base and base.vendor else None, model=base.model if base and base.vendor else None,
            stepping=base.stepping if base and base.vendor else None,
            level=max(level, base.level if base else 0xD), xlevel=max(xlevel, base.xlevel if base else 0x80000008),
            model_id=f"kvmlet {name} ({base.name if base else self.vendor} baseline) CPU",
            description=self.summary(), source="baseline")


def closest_model(vendor: str, features: frozenset[str], *, msrs_known: bool = True) -> CpuModel | None:
    """The catalog model whose features are all in ``features``, with the most of them (the vendor's own
    models win a tie over the vendor-neutral ABI levels). Without ``msrs_known`` (captures of CPUID dumps)
    the models' MSR features are not asked for."""
    def needs(model: CpuModel) -> frozenset[str]:
        return model.features if msrs_known else model.features - MSR_FEATURES.keys()

    fitting = [m for m in catalog() if m.vendor in (None, vendor) and needs(m) <= features]
    if not fitting:
        return None
    return max(fitting, key=lambda m: (len(m.features), m.vendor is not None))


def baseline(captures: Sequence[HostCapture]) -> Baseline:
    """The common CPU of ``captures``; VendorMismatchError when they are not all of one vendor."""
    if not captures:
        raise CpuModelError("baseline: give at least one capture")
    vendors = sorted({c.vendor for c in captures})
    if len(vendors) > 1:
        by_vendor = "; ".join(f"{v}: {', '.join(c.description or '?' for c in captures if c.vendor == v)}"
                              for v in vendors)
        raise VendorMismatchError(f"baseline: the hosts are of different CPU vendors ({by_vendor}); a VM cannot "
                                  "move between vendors, so there is no common CPU model")
    common = frozenset.intersection(*(c.features for c in captures))
    msrs_compared = all(c.msrs is not None for c in captures)
    if not msrs_compared:
        common -= MSR_FEATURES.keys()
    model = closest_model(vendors[0], common, msrs_known=msrs_compared)
    extra = sorted_features(common - model.features) if model is not None else sorted_features(common)
    return Baseline(vendors[0], common, model, extra, len(captures), msrs_compared)
