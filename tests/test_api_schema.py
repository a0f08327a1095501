"""kvmlet's OpenAPI document (kvmlet/api/openapi.json) against the real server.

A `kvmlet serve` process per module, reached over its Unix socket through a small requests adapter.
Schemathesis generates requests for every operation from the document, valid and invalid ones, and
checks each answer: no 5xx, a documented status code and content type, and a body that matches the
documented schema. Plain tests check that the document describes exactly the server's routes, that
GET /openapi.json serves this file, and that populated configurations (and a booted, paused, ended
VM) are reported as documented.
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

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter

from kvmlet.api.routes import OPENAPI_PATH, ROUTES

REPO = Path(__file__).resolve().parent.parent
BASE_URL = "http://kvmlet.sock"
MAX_EXAMPLES = int(os.environ.get("KVMLET_SCHEMA_EXAMPLES", "30"))

CONFIG = schemathesis.Config.from_dict({
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "content_type_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
        "response_headers_conformance": {"enabled": True},
        # invalid data must be refused: the document is no looser than the server's models
        "negative_data_rejection": {"enabled": True},
    },
    "generation": {"max-examples": MAX_EXAMPLES},
    "phases": {"coverage": {"enabled": True}},
})
SCHEMA = schemathesis.openapi.from_path(OPENAPI_PATH, config=CONFIG)


# -- requests over a Unix socket ---------------------------------------------------------------------
class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, socket_path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if isinstance(self.timeout, int | float):
            sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        return sock


class _UnixConnectionPool(urllib3.HTTPConnectionPool):
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

    def call(self, method: str, target: str, body: Any = None) -> requests.Response:
        return self.session.request(method, BASE_URL + target, json=body, timeout=30)

    def stop(self) -> None:
        self.session.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    api = Server(tmp_path_factory.mktemp("api-schema"))
    try:
        yield api
    finally:
        api.stop()


# -- the document ------------------------------------------------------------------------------------
def _document() -> dict[str, Any]:
    return dict(json.loads(OPENAPI_PATH.read_text()))


def test_document_is_valid_openapi() -> None:
    document = _document()
    assert document["openapi"] == "3.0.3"
    SCHEMA.validate()   # against the OpenAPI 3.0 meta-schema


def _documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in ("get", "put", "patch", "post", "delete")}


def test_document_describes_every_route_and_no_other() -> None:
    routes = set()
    for route in ROUTES:
        path = route.prefix
        if path.startswith("/drives/"):
            path += "{drive_id}"
        elif path.startswith("/network-interfaces/"):
            path += "{iface_id}"
        routes.add((route.method, path))
    assert _documented_operations(_document()) == routes


def test_every_operation_documents_400_and_500_as_error() -> None:
    document = _document()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            for status in ("400", "500"):
                error = document["components"]["responses"][responses[status]["$ref"].rsplit("/", 1)[1]]
                assert error["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, \
                    (method, path, status)


def test_openapi_json_is_served_as_is(server: Server) -> None:
    response = server.call("GET", "/openapi.json")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == _document()


# -- schema-driven: every operation, generated requests ----------------------------------------------
@SCHEMA.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """For valid requests, the body's id is the path's (else every drive and interface call is a mismatch)."""
    if case.meta is not None and case.meta.generation.mode is not schemathesis.GenerationMode.POSITIVE:
        return case
    for name in ("drive_id", "iface_id"):
        if case.path_parameters and name in case.path_parameters and isinstance(case.body, dict) \
                and isinstance(case.body.get(name), str):
            case.body[name] = case.path_parameters[name]
    return case


@SCHEMA.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_get_documented_answers(case: schemathesis.Case, server: Server) -> None:
    case.call_and_validate(base_url=BASE_URL, session=server.session)
