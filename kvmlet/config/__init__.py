"""kvmlet's configuration layer: one model per resource, the same for the CLI, the config file and the API.

This package imports nothing from devices/, machine/ or kvm/: devices are built from these models, never
the other way round.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import msgspec

from kvmlet.config.models import (
    DEFAULT_CMDLINE,
    MAX_VCPUS_SUPPORTED,
    BootSource,
    CpuConfig,
    Drive,
    DriveUpdate,
    Entropy,
    Logger,
    MachineConfig,
    MachineConfigUpdate,
    Metrics,
    NetworkInterface,
    NetworkInterfaceUpdate,
    RateLimiterConfig,
    TokenBucketConfig,
    VmConfig,
    Vsock,
)
from kvmlet.config.size import parse_size
from kvmlet.errors import ConfigError

__all__ = [
    "DEFAULT_CMDLINE", "MAX_VCPUS_SUPPORTED", "BootSource", "ConfigError", "CpuConfig", "Drive", "DriveUpdate",
    "Entropy", "Logger", "MachineConfig", "MachineConfigUpdate", "Metrics", "NetworkInterface",
    "NetworkInterfaceUpdate", "RateLimiterConfig", "TokenBucketConfig", "VmConfig", "Vsock", "decode",
    "encode", "load_config_file", "parse_size", "simple_config", "to_builtins",
]

T = TypeVar("T")


def decode(data: bytes | str, model: type[T], what: str = "body") -> T:
    """JSON -> ``model``; a ConfigError that names the field for a wrong type, an unknown field, or a
    string holding a NUL character (no path, name or command line can hold one)."""
    try:
        value = msgspec.json.decode(data, type=model)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{what}: {_describe(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from None
    where = _nul_in(msgspec.to_builtins(value))
    if where is not None:
        raise ConfigError(f"{what}: {where}: a NUL character is not allowed")
    return value


def _nul_in(value: object, where: str = "") -> str | None:
    """Where in ``value`` (decoded JSON) a string or a key holds a NUL character, or None."""
    if isinstance(value, str):
        return where if "\0" in value else None
    if isinstance(value, dict):
        children = [(f"{where}.{key}".lstrip("."), str(key), item) for key, item in value.items()]
    elif isinstance(value, list):
        children = [(f"{where}[{index}]", "", item) for index, item in enumerate(value)]
    else:
        return None
    for place, key, item in children:
        found = place if "\0" in key else _nul_in(item, place)
        if found is not None:
            return found
    return None


def _describe(message: str) -> str:
    """msgspec's "Object contains unknown field `x` - at `$.a`" in kvmlet's words."""
    text, _, where = message.partition(" - at `")
    where = where.rstrip("`")
    if where and where != "$":
        return f"{where.removeprefix('$.')}: {text}"
    return text


def encode(value: object) -> bytes:
    return msgspec.json.encode(value)


def to_builtins(value: object) -> object:
    return msgspec.to_builtins(value)


def simple_config(kernel: str | Path, *, cmdline: str | None = None, vcpus: int = 1, mem_size_mib: int = 128,
                  boot: str = "auto", console: str = "stdio", drives: list[Drive] | None = None,
                  network_interfaces: list[NetworkInterface] | None = None, vsock: Vsock | None = None,
                  entropy: Entropy | None = None) -> VmConfig:
    """A VmConfig from the few values most callers set (checked as a decoded config would be)."""
    fields = {"boot-source": {"kernel_image_path": str(kernel), "boot_args": cmdline, "boot_protocol": boot},
              "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_size_mib}, "console": console}
    config = decode(encode(fields), VmConfig, "configuration")
    return msgspec.structs.replace(config, drives=drives or [], network_interfaces=network_interfaces or [],
                                   vsock=vsock, entropy=entropy)


def load_config_file(path: Path) -> VmConfig:
    """A Firecracker-style JSON config file (``--config-file``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    return decode(data, VmConfig, f"config file {path}")
