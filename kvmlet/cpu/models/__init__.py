"""The catalog of named CPU models, and kvmlet's model files.

A model is a vendor (or none: the x86-64 ABI levels run on either), a feature set (CPUID flags and
feature-MSR bits, names as in :mod:`kvmlet.cpu.features`), and the identity a guest reads (family, model,
stepping, brand string, highest leaves). Applying it (:mod:`kvmlet.cpu.plan`) masks this host's CPUID down
to exactly those features. Where each feature list comes from is in docs/cpu-models.md.

A *model file* is kvmlet's JSON for a model that is not in the catalog, e.g. what ``kvmlet cpu baseline
--json`` prints: ``{"kvmlet_cpu_model": 1, "name": ..., "vendor": ..., "base": ..., "features": [...]}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlet.cpu.errors import CpuModelError
from kvmlet.cpu.features import canonical, unknown_names
from kvmlet.jsonfile import read_json_file

INTEL = "GenuineIntel"
AMD = "AuthenticAMD"
MODEL_FILE_VERSION = 1
# Provided by KVM's in-kernel local APIC whatever the CPU model: kvmlet passes them through when KVM
# offers them (they are still features of the vCPU: the migration gate checks them).
PLATFORM_FEATURES = frozenset({"x2apic", "tsc-deadline"})


@dataclass(frozen=True)
class CpuModel:
    """A named CPU model: what a guest sees, independent of the host it runs on."""

    name: str
    vendor: str | None
    features: frozenset[str]
    family: int | None = None
    model: int | None = None
    stepping: int | None = None
    level: int = 0xD                   # highest basic CPUID leaf (raised to what the features need)
    xlevel: int = 0x80000008           # highest extended leaf
    model_id: str = ""                 # the brand string (CPUID 0x80000002-4)
    description: str = ""
    source: str = ""                   # where the feature list comes from (a key of docs/cpu-models.md)

    def to_file(self, base: str | None = None) -> dict[str, Any]:
        """This model as a model file (JSON-ready)."""
        from kvmlet.cpu.features import sorted_features

        out: dict[str, Any] = {"kvmlet_cpu_model": MODEL_FILE_VERSION, "name": self.name, "vendor": self.vendor}
        if base is not None:
            out["base"] = base
        out["features"] = sorted_features(self.features)
        for key in ("family", "model", "stepping"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["level"], out["xlevel"] = hex(self.level), hex(self.xlevel)
        if self.model_id:
            out["model_id"] = self.model_id
        return out


@dataclass(frozen=True)
class Catalog:
    """Every built-in model by name (lookups ignore case)."""

    models: tuple[CpuModel, ...]
    _by_name: dict[str, CpuModel] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for model in self.models:
            self._by_name[model.name.lower()] = model

    def get(self, name: str) -> CpuModel | None:
        return self._by_name.get(name.lower())

    def names(self) -> list[str]:
        return [model.name for model in self.models]

    def __iter__(self) -> Iterator[CpuModel]:
        return iter(self.models)


_CATALOG: Catalog | None = None


def catalog() -> Catalog:
    """The built-in models (built on first use)."""
    global _CATALOG
    if _CATALOG is None:
        from kvmlet.cpu.models import abi, amd, intel

        _CATALOG = Catalog((*intel.MODELS, *amd.MODELS, *abi.MODELS))
    return _CATALOG


def get_model(name: str) -> CpuModel:
    """A catalog model by name, or CpuModelError listing the names there are."""
    model = catalog().get(name)
    if model is None:
        raise CpuModelError(f"unknown CPU model {name!r}: choose host, one of {', '.join(catalog().names())}, "
                            "or give a model file or a custom template")
    return model


def is_model_file(spec: str) -> bool:
    """Whether a ``cpu_template`` / ``--cpu-model`` value names a file rather than a model."""
    return spec.endswith(".json") or "/" in spec


def model_from_dict(data: object, where: str) -> CpuModel:
    """A model from a model file's JSON (``where`` names the file in errors)."""
    if not isinstance(data, dict) or data.get("kvmlet_cpu_model") != MODEL_FILE_VERSION:
        raise CpuModelError(f"{where}: not a kvmlet CPU model file (it needs \"kvmlet_cpu_model\": "
                            f"{MODEL_FILE_VERSION})")
    features = data.get("features")
    name = data.get("name", Path(where).stem)
    vendor = data.get("vendor")
    if not isinstance(features, list) or not all(isinstance(item, str) for item in features):
        raise CpuModelError(f"{where}: \"features\" must be a list of feature names")
    if not isinstance(name, str) or not (vendor is None or isinstance(vendor, str)):
        raise CpuModelError(f"{where}: \"name\" and \"vendor\" must be strings")
    unknown = unknown_names(features)
    if unknown:
        raise CpuModelError(f"{where}: unknown features: {', '.join(unknown)}")
    numbers: dict[str, int] = {}
    for key in ("family", "model", "stepping", "level", "xlevel"):
        value = data.get(key)
        if value is None:
            continue
        try:
            numbers[key] = value if isinstance(value, int) else int(str(value), 0)
        except ValueError:
            raise CpuModelError(f"{where}: {key} {value!r} is not a number") from None
    base = catalog().get(str(data.get("base", ""))) if data.get("base") else None
    model_id = data.get("model_id", base.model_id if base is not None else f"kvmlet {name} CPU")
    return CpuModel(name=name, vendor=vendor, features=frozenset(canonical(f) for f in features),
                    family=numbers.get("family", base.family if base else None),
                    model=numbers.get("model", base.model if base else None),
                    stepping=numbers.get("stepping", base.stepping if base else None),
                    level=numbers.get("level", base.level if base else 0xD),
                    xlevel=numbers.get("xlevel", base.xlevel if base else 0x80000008),
                    model_id=str(model_id), description=f"model file {where}", source="model file")


def load_model_file(path: str | Path) -> CpuModel:
    data = read_json_file(path, f"CPU model file {path}", CpuModelError)
    return model_from_dict(data, str(path))


FIRECRACKER_STATIC_TEMPLATES = ("C3", "T2", "T2S", "T2CL", "T2A", "V1N1")


def check_cpu_template(spec: str) -> None:
    """``machine-config.cpu_template``: host/None, a catalog model, or a model file; ConfigError otherwise."""
    from kvmlet.errors import ConfigError

    if spec in FIRECRACKER_STATIC_TEMPLATES:
        raise ConfigError(f"machine-config: cpu_template {spec!r}: Firecracker's static templates are not supported "
                          "(Firecracker deprecated them); use a CPU model ('kvmlet cpu list') or PUT /cpu-config")
    try:
        resolve_model(spec)
    except CpuModelError as exc:
        raise ConfigError(f"machine-config: cpu_template: {exc}") from None


def resolve_model(spec: str) -> CpuModel | None:
    """``None`` for host pass-through ("host", "None"), else the catalog model or model file ``spec`` names."""
    if spec in ("host", "None", "none", ""):
        return None
    if is_model_file(spec):
        return load_model_file(spec)
    return get_model(spec)
