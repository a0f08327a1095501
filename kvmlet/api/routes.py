"""The API's endpoints: Firecracker's paths, bodies, status codes and error body, on :class:`Vmm`.

A handler gets the request body (bytes) and the path's id, and returns ``(status, body)``: 204 with no
body for a change, 200 with a JSON body for a query. A :class:`kvmlet.errors.KvmletError` becomes 400
with ``{"fault_message": "<one line>"}``, as Firecracker answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from kvmlet.config import decode, to_builtins
from kvmlet.config.models import (
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
    SnapshotCreateParams,
    SnapshotLoadParams,
    Tpm,
    Vsock,
)
from kvmlet.errors import ConfigError

if TYPE_CHECKING:
    from kvmlet.api.controller import Vmm

Response = tuple[int, Any]
Handler = Callable[["Vmm", bytes, str], Response]
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
VMM_VERSION = "1.10.0"   # the Firecracker API version whose behaviour kvmlet follows
APP_NAME = "kvmlet"


class Action(msgspec.Struct, forbid_unknown_fields=True):
    action_type: Literal["InstanceStart", "SendCtrlAltDel", "FlushMetrics"]


class VmStateChange(msgspec.Struct, forbid_unknown_fields=True):
    state: Literal["Paused", "Resumed"]


class TpmQuoteParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``PUT /tpm/quote`` (kvmlet extension): the verifier's nonce (hex) and the PCRs to quote."""

    nonce: str
    pcrs: list[int] | None = None


@dataclass(frozen=True)
class Route:
    method: str
    prefix: str          # a path, or a prefix ending in "/" for "/drives/{id}"
    handler: Handler
    mutating: bool       # runs on a worker thread under the VMM's lock (GETs answer on the loop)


def _no_content(action: Callable[[], None]) -> Response:
    action()
    return 204, None


def _same_id(path_id: str, body_id: str, ) -> None:
    if path_id != body_id:
        raise ConfigError("The id from the path does not match the id from the body!")


def get_instance_info(vmm: Vmm, body: bytes, ident: str) -> Response:
    return 200, {"id": vmm.instance_id, "state": vmm.state.value, "vmm_version": VMM_VERSION,
                 "app_name": APP_NAME}


def get_version(vmm: Vmm, body: bytes, ident: str) -> Response:
    return 200, {"firecracker_version": VMM_VERSION}


def get_machine_config(vmm: Vmm, body: bytes, ident: str) -> Response:
    return 200, to_builtins(vmm.config.machine_config)


def get_vm_config(vmm: Vmm, body: bytes, ident: str) -> Response:
    return 200, to_builtins(vmm.config)


def get_openapi(vmm: Vmm, body: bytes, ident: str) -> Response:
    return 200, json.loads(OPENAPI_PATH.read_text())


def get_prometheus(vmm: Vmm, body: bytes, ident: str) -> Response:
    from kvmlet.api.metrics import prometheus_text

    return 200, prometheus_text(vmm)


def put_boot_source(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.put_boot_source(decode(body, BootSource)))


def put_machine_config(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.put_machine_config(decode(body, MachineConfig)))


def patch_machine_config(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.patch_machine_config(decode(body, MachineConfigUpdate)))


def put_drive(vmm: Vmm, body: bytes, ident: str) -> Response:
    drive = decode(body, Drive)
    _same_id(ident, drive.drive_id)
    return _no_content(lambda: vmm.put_drive(drive))


def patch_drive(vmm: Vmm, body: bytes, ident: str) -> Response:
    update = decode(body, DriveUpdate)
    _same_id(ident, update.drive_id)
    return _no_content(lambda: vmm.patch_drive(update))


def put_network_interface(vmm: Vmm, body: bytes, ident: str) -> Response:
    net = decode(body, NetworkInterface)
    _same_id(ident, net.iface_id)
    return _no_content(lambda: vmm.put_network_interface(net))


def patch_network_interface(vmm: Vmm, body: bytes, ident: str) -> Response:
    update = decode(body, NetworkInterfaceUpdate)
    _same_id(ident, update.iface_id)
    return _no_content(lambda: vmm.patch_network_interface(update))


def put_vsock(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.put_vsock(decode(body, Vsock)))


def put_entropy(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.put_entropy(decode(body, Entropy)))


def put_logger(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.put_logger(decode(body, Logger)))


def put_metrics(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.put_metrics(decode(body, Metrics)))


def put_cpu_config(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.put_cpu_config(decode(body, CpuConfig)))


def put_actions(vmm: Vmm, body: bytes, ident: str) -> Response:
    action = decode(body, Action).action_type
    if action == "InstanceStart":
        return _no_content(vmm.instance_start)
    if action == "SendCtrlAltDel":
        return _no_content(vmm.send_ctrl_alt_del)
    return _no_content(vmm.flush_metrics)


def patch_vm(vmm: Vmm, body: bytes, ident: str) -> Response:
    state = decode(body, VmStateChange).state
    return _no_content(vmm.pause if state == "Paused" else vmm.resume)


def put_snapshot_create(vmm: Vmm, body: bytes, ident: str) -> Response:
    params = decode(body, SnapshotCreateParams)

    def create() -> None:
        vmm.snapshot_create(params)
    return _no_content(create)


def put_snapshot_load(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.snapshot_load(decode(body, SnapshotLoadParams)))


def put_tpm(vmm: Vmm, body: bytes, ident: str) -> Response:
    return _no_content(lambda: vmm.put_tpm(decode(body, Tpm)))


def put_tpm_quote(vmm: Vmm, body: bytes, ident: str) -> Response:
    params = decode(body, TpmQuoteParams)
    return _no_content(lambda: vmm.tpm_quote(params.nonce, params.pcrs))


def get_tpm_quote(vmm: Vmm, body: bytes, ident: str) -> Response:
    return 200, vmm.last_tpm_quote()


def get_migration(vmm: Vmm, body: bytes, ident: str) -> Response:
    return 200, vmm.migration_status()


def put_migration_send(vmm: Vmm, body: bytes, ident: str) -> Response:
    from kvmlet.migration.params import MigrationSendParams

    return _no_content(lambda: vmm.migration_send(decode(body, MigrationSendParams)))


def patch_migration(vmm: Vmm, body: bytes, ident: str) -> Response:
    from kvmlet.migration.params import MigrationStateChange

    decode(body, MigrationStateChange)
    return _no_content(vmm.migration_cancel)


def _unsupported(what: str) -> Handler:
    def handler(vmm: Vmm, body: bytes, ident: str) -> Response:
        vmm.unsupported(what)
        return 400, None
    return handler


BALLOON = "The balloon device is not supported by kvmlet."
MMDS = "MMDS (the microVM metadata service) is not supported by kvmlet."

ROUTES: tuple[Route, ...] = (
    Route("GET", "/", get_instance_info, False),
    Route("GET", "/version", get_version, False),
    Route("GET", "/machine-config", get_machine_config, False),
    Route("GET", "/vm/config", get_vm_config, False),
    Route("GET", "/openapi.json", get_openapi, False),
    Route("GET", "/metrics", get_prometheus, False),
    Route("PUT", "/boot-source", put_boot_source, True),
    Route("PUT", "/machine-config", put_machine_config, True),
    Route("PATCH", "/machine-config", patch_machine_config, True),
    Route("PUT", "/drives/", put_drive, True),
    Route("PATCH", "/drives/", patch_drive, True),
    Route("PUT", "/network-interfaces/", put_network_interface, True),
    Route("PATCH", "/network-interfaces/", patch_network_interface, True),
    Route("PUT", "/vsock", put_vsock, True),
    Route("PUT", "/entropy", put_entropy, True),
    Route("PUT", "/logger", put_logger, True),
    Route("PUT", "/metrics", put_metrics, True),
    Route("PUT", "/cpu-config", put_cpu_config, True),
    Route("PUT", "/actions", put_actions, True),
    Route("PATCH", "/vm", patch_vm, True),
    Route("PUT", "/snapshot/create", put_snapshot_create, True),
    Route("PUT", "/snapshot/load", put_snapshot_load, True),
    Route("PUT", "/tpm", put_tpm, True),
    Route("PUT", "/tpm/quote", put_tpm_quote, True),
    Route("GET", "/tpm/quote", get_tpm_quote, False),
    Route("GET", "/migration", get_migration, False),
    Route("PATCH", "/migration", patch_migration, True),
    Route("PUT", "/migration/send", put_migration_send, True),
    Route("PUT", "/balloon", _unsupported(BALLOON), True),
    Route("PATCH", "/balloon", _unsupported(BALLOON), True),
    Route("GET", "/balloon", _unsupported(BALLOON), False),
    Route("PUT", "/mmds", _unsupported(MMDS), True),
    Route("PATCH", "/mmds", _unsupported(MMDS), True),
    Route("GET", "/mmds", _unsupported(MMDS), False),
    Route("PUT", "/mmds/config", _unsupported(MMDS), True),
)


def find_route(method: str, path: str) -> tuple[Route, str] | None:
    """The route for ``method`` and ``path`` and the path's id ("" when it has none)."""
    path = path.split("?", 1)[0]
    if len(path) > 1:
        path = path.rstrip("/")
    for route in ROUTES:
        if route.method != method:
            continue
        if route.prefix.endswith("/") and route.prefix != "/":
            ident = path[len(route.prefix):] if path.startswith(route.prefix) else ""
            if ident and "/" not in ident:
                return route, ident
        elif path == route.prefix:
            return route, ""
    return None


def invalid_path(method: str, path: str) -> str:
    return f"Invalid request method and/or path: {method} {path.split('?', 1)[0]}."
