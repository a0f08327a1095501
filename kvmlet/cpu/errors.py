"""Errors of CPU models and templates: one line each, naming what is missing or wrong."""

from __future__ import annotations

from kvmlet.errors import ConfigError, KvmletError


class CpuModelError(KvmletError):
    """A CPU model or template that cannot be used (unknown name, bad file, host cannot provide it)."""


class TemplateError(CpuModelError, ConfigError):
    """A custom CPU template (Firecracker's format) that does not parse."""


class VendorMismatchError(CpuModelError):
    """A model (or VM) of one CPU vendor on a host of another."""


class HostCannotProvideError(CpuModelError):
    """This host (or a destination host) lacks features a model needs; ``missing`` lists them."""

    def __init__(self, message: str, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing
