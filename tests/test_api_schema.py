"""kvmlet's OpenAPI document (kvmlet/api/openapi.json) against the real server and the real models.

Each server is a `python -m kvmlet serve` process, reached over its Unix socket through a small requests
transport adapter. Schemathesis generates requests for every documented operation, valid and invalid,
against a server before boot and against one running the test guest, and checks every answer: no 5xx, a
documented status code and content type, a body matching its schema, and invalid requests refused. Plain
tests check that the document describes exactly the routes and the msgspec models, that GET /openapi.json
serves the file, and that a fully configured, booted, paused and ended VM is reported as documented.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from kvmlet.api.routes import APP_NAME, OPENAPI_PATH, ROUTES, VMM_VERSION, Action, TpmQuoteParams, VmStateChange
from kvmlet.config import models
from kvmlet.migration.params import MigrationSendParams, MigrationStateChange, MigrationTls

REPO = Path(__file__).resolve().parent.parent
BASE_URL = "http://kvmlet.sock"
MAX_EXAMPLES = int(os.environ.get("KVMLET_SCHEMA_EXAMPLES", "50"))   # per operation and server state

CONFIG = schemathesis.Config.from_dict({
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "content_type_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
        "response_headers_conformance": {"enabled": True},
        # schema-invalid requests must be refused: the document is no looser than the models
        "negative_data_rejection": {"enabled": True},
    },
    "generation": {"max-examples": MAX_EXAMPLES},
    "phases": {"coverage": {"enabled": True}},   # boundary values and each property's violations
})
SCHEMA = schemathesis.openapi.from_path(OPENAPI_PATH, config=CONFIG)
DOCUMENT: dict[str, Any] = json.loads(OPENAPI_PATH.read_text())

# the document's request schemas and the models the server decodes them with
MODELS: dict[str, type[msgspec.Struct]] = {
    "TokenBucket": models.TokenBucketConfig, "RateLimiter": models.RateLimiterConfig,
    "BootSource": models.BootSource, "MachineConfig": models.MachineConfig,
    "MachineConfigUpdate": models.MachineConfigUpdate, "Drive": models.Drive, "DriveUpdate": models.DriveUpdate,
    "NetworkInterface": models.NetworkInterface, "NetworkInterfaceUpdate": models.NetworkInterfaceUpdate,
    "Vsock": models.Vsock, "Entropy": models.Entropy, "Logger": models.Logger, "Metrics": models.Metrics,
    "CpuConfig": models.CpuConfig, "CpuidLeafModifier": models.CpuidLeafModifier,
    "CpuidRegisterModifier": models.CpuidRegisterModifier, "MsrModifier": models.MsrModifier,
    "InstanceActionInfo": Action, "Vm": VmStateChange,
    "SnapshotCreateParams": models.SnapshotCreateParams, "SnapshotLoadParams": models.SnapshotLoadParams,
    "MemBackend": models.MemBackend, "NetworkOverride": models.NetworkOverride,
    "DriveOverride": models.DriveOverride, "VsockOverride": models.VsockOverride,
    "MigrationSendParams": MigrationSendParams, "MigrationTls": MigrationTls,
    "MigrationStateChange": MigrationStateChange,
    "Tpm": models.Tpm, "TpmQuoteParams": TpmQuoteParams,
}
BODIES = {
    ("PUT", "/boot-source"): "BootSource", ("PUT", "/machine-config"): "MachineConfig",
    ("PATCH", "/machine-config"): "MachineConfigUpdate", ("PUT", "/drives/{drive_id}"): "Drive",
    ("PATCH", "/drives/{drive_id}"): "DriveUpdate", ("PUT", "/network-interfaces/{iface_id}"): "NetworkInterface",
    ("PATCH", "/network-interfaces/{iface_id}"): "NetworkInterfaceUpdate", ("PUT", "/vsock"): "Vsock",
    ("PUT", "/entropy"): "Entropy", ("PUT", "/logger"): "Logger", ("PUT", "/metrics"): "Metrics",
    ("PUT", "/cpu-config"): "CpuConfig", ("PUT", "/actions"): "InstanceActionInfo", ("PATCH", "/vm"): "Vm",
    ("PUT", "/snapshot/create"): "SnapshotCreateParams", ("PUT", "/snapshot/load"): "SnapshotLoadParams",
    ("PUT", "/migration/send"): "MigrationSendParams", ("PATCH", "/migration"): "MigrationStateChange",
    ("PUT", "/tpm"): "Tpm", ("PUT", "/tpm/quote"): "TpmQuoteParams",
}
GUEST_ARGS = "console=ttyS0 kvmlet.test=ctrlaltdel kvmlet.timeout=0"   # the guest waits for Ctrl+Alt+Del


# -- requests over a Unix socket ---------------------------------------------------------------------
class _UnixConnection(HTTPConnection):
    def __init__(self, socket_path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if isinstance(self.timeout, int | float):
            sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        return sock


class _UnixConnectionPool(HTTPConnectionPool):
    def __init__(self, socket_path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.socket_path, timeout=self.timeout.connect_timeout)


class UnixAdapter(HTTPAdapter):
    """Sends every request of a session to one Unix socket (the URL's host is ignored)."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__()
        self.pool = _UnixConnectionPool(str(socket_path), maxsize=4)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> _UnixConnectionPool:
        return self.pool

    def get_connection(self, url: Any, proxies: Any = None) -> _UnixConnectionPool:
        return self.pool

    def close(self) -> None:
        self.pool.close()
        super().close()


def unix_session(socket_path: Path) -> requests.Session:
    session = requests.Session()
    session.trust_env = False          # no proxies from the environment
    session.mount(BASE_URL + "/", UnixAdapter(socket_path))
    return session


# -- the server --------------------------------------------------------------------------------------
class Server:
    """`python -m kvmlet serve` in a child process; relative paths in bodies land in its directory."""

    def __init__(self, directory: Path, console: str = "none") -> None:
        self.directory = directory
        self.socket = directory / "api.sock"
        self.log = directory / "server.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "wb") as log:   # a file, not a pipe: a full pipe would stall the server
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kvmlet", "serve", "--api-sock", str(self.socket), "--console", console],
                cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.session = unix_session(self.socket)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kvmlet serve exited with {self.process.returncode}: {self.log.read_text()}")
            if self.socket.exists():
                try:
                    self.session.get(BASE_URL + "/", timeout=2)
                    return
                except requests.ConnectionError:
                    pass
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"{self.socket} did not answer within {timeout} s")

    def stop(self) -> None:
        self.session.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def checked(server: Server, method: str, path: str, body: Any = None, **path_parameters: str) -> Any:
    """One request, its answer checked against the document (status, content type, body)."""
    payload = {"body": body} if body is not None else {}
    case = SCHEMA[path][method].Case(path_parameters=path_parameters or None, **payload)
    return case.call_and_validate(base_url=BASE_URL, session=server.session)


def guest_kernel() -> Path:
    if not os.path.exists("/dev/kvm"):
        pytest.fail("/dev/kvm is missing: the VM tests need KVM")
    from kvmlet.guest_image import builtin_guest

    return builtin_guest()


def boot_guest(server: Server, kernel: Path, drive: Path) -> None:
    """The test guest with a drive, vsock, entropy and metrics, started and waiting for Ctrl+Alt+Del."""
    for method, path, body, params in (
            ("PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": GUEST_ARGS}, {}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}, {}),
            ("PUT", "/drives/{drive_id}", {"drive_id": "rootfs", "path_on_host": str(drive),
                                           "is_root_device": False}, {"drive_id": "rootfs"}),
            ("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(server.directory / "v.sock")}, {}),
            ("PUT", "/entropy", {}, {}),
            ("PUT", "/metrics", {"metrics_path": str(server.directory / "metrics.json")}, {}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}, {})):
        response = checked(server, method, path, body, **params)
        assert response.status_code == 204, response.text


# -- the document ------------------------------------------------------------------------------------
def test_document_is_valid_openapi() -> None:
    assert DOCUMENT["openapi"] == "3.0.3"
    SCHEMA.validate()   # against the OpenAPI 3.0 meta-schema
    assert DOCUMENT["info"]["version"] == VMM_VERSION
    assert DOCUMENT["components"]["schemas"]["InstanceInfo"]["properties"]["app_name"]["enum"] == [APP_NAME]


def _route_path(prefix: str) -> str:
    if prefix == "/drives/":
        return "/drives/{drive_id}"
    if prefix == "/network-interfaces/":
        return "/network-interfaces/{iface_id}"
    return prefix


def test_document_describes_every_route_and_no_other() -> None:
    documented = {(method.upper(), path) for path, item in DOCUMENT["paths"].items()
                  for method in item if method != "parameters"}
    assert documented == {(route.method, _route_path(route.prefix)) for route in ROUTES}


def test_every_operation_documents_its_errors() -> None:
    responses = DOCUMENT["components"]["responses"]
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for status in ("400", "500"):
                answer = responses[operation["responses"][status]["$ref"].rsplit("/", 1)[1]]
                assert answer["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}, \
                    (method, path, status)
            successes = set(operation["responses"]) - {"400", "500"}
            assert successes == ({"200"} if method == "get" else {"204"}) or "Not supported" in operation["tags"], \
                (method, path, successes)


def _canonical(prop: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A property schema, msgspec's JSON Schema or the document's OpenAPI 3.0, in one comparable form."""
    prop = dict(prop)
    out: dict[str, Any] = {"nullable": bool(prop.pop("nullable", False))}
    alternatives = prop.pop("anyOf", None)
    if alternatives is not None:
        others = [alt for alt in alternatives if alt != {"type": "null"}]
        out["nullable"] = out["nullable"] or len(others) < len(alternatives)
        if len(others) == 1:
            prop.update(others[0])
        else:
            out["anyOf"] = sorted((_canonical(alt, names) for alt in others), key=repr)
    if "allOf" in prop:
        (inner,) = prop.pop("allOf")
        prop.update(inner)
    if "$ref" in prop:
        target = prop["$ref"].rsplit("/", 1)[1]
        out["ref"] = names.get(target, target)
    if "enum" in prop:
        values = [value for value in prop["enum"] if value is not None]
        out["nullable"] = out["nullable"] or len(values) < len(prop["enum"])
        out["enum"] = sorted(values)
    elif "type" in prop:
        out["type"] = prop["type"]
    for key in ("minimum", "maximum", "default"):
        if key in prop:
            out[key] = prop[key]
    if "items" in prop:
        out["items"] = _canonical(prop["items"], names)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_request_schema_matches_its_model(name: str) -> None:
    """Field names, required fields, types, enums, bounds, defaults and unknown-field refusal, per model."""
    model = MODELS[name]
    generated = msgspec.json.schema(model)
    expected = generated["$defs"][model.__name__]
    names = {m.__name__: n for n, m in MODELS.items()}
    documented = DOCUMENT["components"]["schemas"][name]
    assert documented["additionalProperties"] is False and expected["additionalProperties"] is False
    assert sorted(documented.get("required", [])) == sorted(expected["required"])
    assert list(documented["properties"]) == list(expected["properties"])
    for field, prop in expected["properties"].items():
        ours = _canonical(documented["properties"][field], {})
        theirs = _canonical(prop, names)
        if field not in expected["required"] and "default" in theirs:
            ours.setdefault("default", theirs["default"])   # the document may leave a default unstated
        assert ours == theirs, f"{name}.{field}"


def test_request_bodies_are_the_models_the_routes_decode() -> None:
    for (method, path), name in BODIES.items():
        body = DOCUMENT["paths"][path][method.lower()]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    mutating = {(route.method, _route_path(route.prefix)) for route in ROUTES if route.method != "GET"}
    unsupported = {(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method, op in item.items()
                   if method != "parameters" and "Not supported" in op["tags"]}
    assert mutating - unsupported == set(BODIES)


def test_vm_config_lists_every_configuration_key() -> None:
    documented = DOCUMENT["components"]["schemas"]["FullVmConfiguration"]
    keys = [field.encode_name for field in msgspec.structs.fields(models.VmConfig)]
    assert list(documented["properties"]) == keys and documented["required"] == keys


# -- the served document -----------------------------------------------------------------------------
def test_openapi_json_is_served_as_is(tmp_path: Path) -> None:
    server = Server(tmp_path)
    try:
        response = checked(server, "GET", "/openapi.json")
        assert response.status_code == 200
        assert response.headers["content-type"] == ["application/json"]
        assert response.json() == DOCUMENT
    finally:
        server.stop()


# -- real answers for a populated configuration and a VM's whole life --------------------------------
def test_a_full_configuration_is_reported_as_documented(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    bucket = {"size": 1 << 20, "refill_time": 100, "one_time_burst": 4096}
    server = Server(tmp_path)
    try:
        for method, path, body, params in (
                ("PUT", "/boot-source", {"kernel_image_path": str(tmp_path / "disk.img"), "boot_protocol": "pvh"},
                 {}),
                ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64, "track_dirty_pages": True}, {}),
                ("PATCH", "/machine-config", {"huge_pages": "None", "cpu_template": "None"}, {}),
                ("PUT", "/drives/{drive_id}", {"drive_id": "root_1", "path_on_host": str(tmp_path / "disk.img"),
                                               "is_root_device": True, "partuuid": "0eaa91a0-01",
                                               "cache_type": "Writeback", "io_engine": "Async", "direct": True,
                                               "rate_limiter": {"bandwidth": bucket}}, {"drive_id": "root_1"}),
                ("PUT", "/drives/{drive_id}", {"drive_id": "data", "path_on_host": str(tmp_path / "disk.img"),
                                               "is_read_only": True}, {"drive_id": "data"}),
                ("PUT", "/network-interfaces/{iface_id}", {
                    "iface_id": "eth0", "host_dev_name": "tap9", "guest_mac": "06:00:ac:10:00:02",
                    "rx_rate_limiter": {"ops": bucket}, "tx_rate_limiter": {"bandwidth": bucket, "ops": bucket},
                    "queues": 2, "offload": False, "mtu": 9000, "address": "172.16.0.1/24", "bridge": "br0"},
                 {"iface_id": "eth0"}),
                ("PUT", "/network-interfaces/{iface_id}", {"iface_id": "eth1"}, {"iface_id": "eth1"}),
                ("PUT", "/vsock", {"guest_cid": 52, "uds_path": str(tmp_path / "v.sock"), "vsock_id": "vsock0"}, {}),
                ("PUT", "/entropy", {"rate_limiter": {"ops": bucket}}, {}),
                ("PUT", "/logger", {"log_path": str(tmp_path / "api.log"), "level": "debug", "show_level": True,
                                    "show_log_origin": True, "module": "api"}, {}),
                ("PUT", "/metrics", {"metrics_path": str(tmp_path / "metrics.json")}, {}),
                ("PUT", "/cpu-config", {"kvm_capabilities": ["!56"], "cpuid_modifiers": [
                    {"leaf": "0x1", "subleaf": 0, "flags": 0, "modifiers": [
                        {"register": "ecx", "bitmap": "0b" + "x" * 31 + "0"}]}],
                    "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "x" * 64}]}, {})):
            response = checked(server, method, path, body, **params)
            assert response.status_code == 204, (method, path, response.text)
        config = checked(server, "GET", "/vm/config").json()
        assert config["boot-source"]["boot_protocol"] == "pvh" and config["machine-config"]["vcpu_count"] == 2
        assert [d["drive_id"] for d in config["drives"]] == ["root_1", "data"]
        assert config["network-interfaces"][0]["tx_rate_limiter"]["ops"] == bucket
        assert config["logger"]["level"] == "debug" and config["cpu-config"]["msr_modifiers"][0]["addr"] == "0x10a"
        assert checked(server, "GET", "/machine-config").json()["track_dirty_pages"] is True
        # refused calls answer 400 with the documented error body
        refused: tuple[tuple[str, str, Any, dict[str, str]], ...] = (
                ("PUT", "/metrics", {"metrics_path": str(tmp_path / "again.json")}, {}),
                ("PATCH", "/drives/{drive_id}", {"drive_id": "data"}, {"drive_id": "data"}),
                ("PUT", "/drives/{drive_id}", {"drive_id": "other", "path_on_host": str(tmp_path / "disk.img"),
                                               "is_root_device": True}, {"drive_id": "other"}),
                ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, {}),
                ("PUT", "/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"}, {}),
                ("GET", "/mmds", None, {}))
        for method, path, body, params in refused:
            response = checked(server, method, path, body, **params)
            assert response.status_code == 400 and response.json()["fault_message"], (method, path)
    finally:
        server.stop()


def test_nul_characters_and_unopenable_log_files_are_refused(tmp_path: Path) -> None:
    """Strings reach OS calls (paths, interface names) that fail with ValueError on a NUL: a 400, not a 500."""
    server = Server(tmp_path)
    try:
        for (method, path), name in BODIES.items():
            schema = DOCUMENT["components"]["schemas"][name]
            example = DOCUMENT["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["example"]
            ids = {key: example[key] for key in ("drive_id", "iface_id") if key in example}
            for field, prop in schema["properties"].items():
                if prop.get("type") != "string" or "enum" in prop:
                    continue
                body = {**example, field: "a\0b"}
                params = {field: "a"} if field in ids else ids   # a NUL is refused before the ids are compared
                response = checked(server, method, path, body, **params)
                assert response.status_code == 400, (method, path, field)
                assert "NUL" in response.json()["fault_message"], (method, path, field)
        response = checked(server, "PUT", "/logger", {"log_path": "/proc/kvmlet-cannot-create-this"})
        assert response.status_code == 400 and "log_path" in response.json()["fault_message"]
    finally:
        server.stop()


def test_a_vm_life_is_reported_as_documented(tmp_path: Path) -> None:
    kernel = guest_kernel()
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
    server = Server(tmp_path, console=f"file:{tmp_path / 'console.log'}")
    try:
        assert checked(server, "GET", "/").json()["state"] == "Not started"
        boot_guest(server, kernel, tmp_path / "disk.img")
        assert checked(server, "GET", "/").json()["state"] == "Running"
        assert checked(server, "PATCH", "/vm", {"state": "Paused"}).status_code == 204
        assert checked(server, "GET", "/").json()["state"] == "Paused"
        assert checked(server, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}).status_code == 400
        assert checked(server, "PATCH", "/vm", {"state": "Resumed"}).status_code == 204
        update = {"drive_id": "rootfs", "rate_limiter": {"ops": {"size": 100, "refill_time": 10}}}
        assert checked(server, "PATCH", "/drives/{drive_id}", update, drive_id="rootfs").status_code == 204
        assert checked(server, "PUT", "/actions", {"action_type": "FlushMetrics"}).status_code == 204
        assert json.loads((tmp_path / "metrics.json").read_text().splitlines()[0])["vmm"]["state"] == "Running"
        assert "kvmlet_vcpu_" in checked(server, "GET", "/metrics").text
        assert checked(server, "GET", "/vm/config").json()["drives"][0]["rate_limiter"]["ops"]["size"] == 100
        deadline = time.monotonic() + 30
        console = tmp_path / "console.log"
        while not console.exists() or "ctrlaltdel: waiting" not in console.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the guest did not get ready for Ctrl+Alt+Del"
            time.sleep(0.02)
        assert checked(server, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}).status_code == 204
        while checked(server, "GET", "/").json()["state"] != "Halted":
            assert time.monotonic() < deadline, "the guest did not end on Ctrl+Alt+Del"
            time.sleep(0.02)
        for method, path, body in (("PATCH", "/vm", {"state": "Paused"}), ("PATCH", "/vm", {"state": "Resumed"}),
                                   ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
                                   ("PUT", "/actions", {"action_type": "InstanceStart"}),
                                   ("PUT", "/machine-config", {"vcpu_count": 1})):
            assert checked(server, method, path, body).status_code == 400, (method, path)
        checked(server, "GET", "/vm/config")
        checked(server, "GET", "/metrics")
        assert server.process.poll() is None   # kvmlet serve outlives its guest
    finally:
        server.stop()


# -- schema-driven: generated requests for every operation -------------------------------------------
@pytest.fixture(scope="module", params=["before boot", "after boot"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server before boot (the document's example files exist in its directory), or one running the
    test guest with the drive the examples name."""
    directory = tmp_path_factory.mktemp("api-schema")
    (directory / "rootfs.ext4").write_bytes(bytes(1 << 20))
    booted = request.param == "after boot"
    kernel = guest_kernel() if booted else None
    server = Server(directory)
    try:
        if kernel is not None:
            boot_guest(server, kernel, directory / "rootfs.ext4")
        yield server
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log.read_text()[-2000:]


@SCHEMA.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
    """In a valid request the body's id is the path's (else every drive and interface call is a mismatch)."""
    if case.meta is not None and case.meta.generation.mode is not schemathesis.GenerationMode.POSITIVE:
        return case
    for name in ("drive_id", "iface_id"):
        if case.path_parameters and name in case.path_parameters and isinstance(case.body, dict) \
                and isinstance(case.body.get(name), str):
            case.body[name] = case.path_parameters[name]
    return case


@SCHEMA.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_documented_answers(case: schemathesis.Case[Any], api: Server) -> None:
    case.call_and_validate(base_url=BASE_URL, session=api.session)
