"""What a migration is asked to do: the API's request bodies, the receiving side's options, addresses.

Addresses: ``tcp:HOST:PORT`` (or just ``HOST:PORT``; an IPv6 host in brackets, ``[::1]:4444``) and
``unix:PATH``. A listening address may leave the host empty (every address) and use port 0 (the kernel
picks one; ``GET /migration`` says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from kvmlet.config.models import UNIX_PATH_MAX, Model
from kvmlet.errors import ConfigError

DEFAULT_DOWNTIME_LIMIT_MS = 50
DEFAULT_MAX_ROUNDS = 30
DEFAULT_TIMEOUT_S = 10


@dataclass(frozen=True)
class Address:
    """Where a migration stream goes (or is awaited): TCP host and port, or a Unix socket's path."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str, *, listening: bool = False, what: str = "destination") -> Address:
    """``tcp:HOST:PORT``, ``HOST:PORT`` or ``unix:PATH``; ConfigError naming ``what`` otherwise."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"{what} {text!r}: give the socket's path after unix:")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ConfigError(f"{what} {text!r}: a Unix socket path has at most {UNIX_PATH_MAX} bytes")
        return Address("unix", path=path)
    rest = text[4:] if text.startswith("tcp:") else text
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        raise ConfigError(f"{what} {text!r}: expected tcp:HOST:PORT, HOST:PORT or unix:PATH")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{what} {text!r}: put an IPv6 address in brackets ([::1]:4444)")
    if not host and not listening:
        raise ConfigError(f"{what} {text!r}: no host")
    if any(c.isspace() or c in "/[]" for c in host):
        raise ConfigError(f"{what} {text!r}: {host!r} is not a host name or address")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: the port {port_text!r} is not a number") from None
    if not (0 if listening else 1) <= port <= 65535:
        raise ConfigError(f"{what} {text!r}: the port must be {'0' if listening else '1'} to 65535")
    return Address("tcp", host=host, port=port)


def _existing_file(path: str | None, what: str) -> None:
    if path is None:
        return
    if not path:
        raise ConfigError(f"{what} is empty")
    try:
        if not Path(path).is_file():
            raise ConfigError(f"{what} {path}: no such file")
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None


class MigrationTls(Model):
    """kvmlet extension: TLS for the migration stream (Python's ``ssl``, the system's OpenSSL)."""

    ca_file: str | None = None        # the CAs the destination's certificate must chain to (default: system's)
    cert_file: str | None = None      # a client certificate, for a destination that requires one
    key_file: str | None = None       # its key (default: in cert_file)
    server_name: str | None = None    # the name the destination's certificate must carry (default: its host)

    def validate(self) -> None:
        _existing_file(self.ca_file, "tls.ca_file")
        _existing_file(self.cert_file, "tls.cert_file")
        _existing_file(self.key_file, "tls.key_file")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("tls.key_file needs tls.cert_file")
        if self.server_name is not None and not self.server_name:
            raise ConfigError("tls.server_name is empty")


class MigrationSendParams(Model):
    """``PUT /migration/send`` (kvmlet extension): migrate the running (or paused) VM to another kvmlet."""

    destination: str                                            # tcp:HOST:PORT, HOST:PORT or unix:PATH
    downtime_limit_ms: Annotated[int, msgspec.Meta(ge=1, le=60000)] = DEFAULT_DOWNTIME_LIMIT_MS
    max_rounds: Annotated[int, msgspec.Meta(ge=1, le=10000)] = DEFAULT_MAX_ROUNDS
    auto_converge: bool = True                                   # throttle the vCPUs when the guest outruns the link
    max_bandwidth_mib_s: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: as fast as the link goes
    timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = DEFAULT_TIMEOUT_S   # a stalled link has failed
    verify_memory: bool = False                                  # hash all memory on both sides at the switchover
    tls: MigrationTls | None = None

    def validate(self) -> Address:
        address = parse_address(self.destination)
        if self.tls is not None:
            self.tls.validate()
        return address


class MigrationStateChange(Model):
    """``PATCH /migration`` (kvmlet extension): cancel the outgoing migration."""

    state: Literal["Cancelled"]


@dataclass
class ListenOptions:
    """The receiving side (``kvmlet serve --migrate-listen``, ``kvmlet migrate listen``)."""

    address: Address
    cpu_capture: Path | None = None     # compare incoming CPUs with this capture instead of this host's KVM
    tls_cert: Path | None = None        # serve TLS with this certificate (and key)
    tls_key: Path | None = None
    tls_ca: Path | None = None          # and require client certificates from these CAs
    timeout_s: float = DEFAULT_TIMEOUT_S

    def validate(self) -> None:
        for value, what in ((self.cpu_capture, "the CPU capture"), (self.tls_cert, "the TLS certificate"),
                            (self.tls_key, "the TLS key"), (self.tls_ca, "the TLS CA file")):
            _existing_file(str(value) if value is not None else None, what)
        if (self.tls_key is not None or self.tls_ca is not None) and self.tls_cert is None:
            raise ConfigError("migration TLS: a key or CA file needs a certificate (--migrate-tls-cert)")
        if self.timeout_s <= 0:
            raise ConfigError("the migration timeout must be positive")
