"""Metrics: Firecracker's JSON lines (to the metrics path) and, as an option, Prometheus text (GET /metrics).

One snapshot of counters is collected from the VMM: API requests by method and resource, vCPU exits by
reason (KVM's binary stats and kvmlet's own counters), and per device its requests, bytes, errors and
rate-limiter throttling. The JSON lines carry what changed since the previous line, as Firecracker's
counters do (``utc_timestamp_ms`` and the process start figures are absolute); Prometheus gets the
running totals, as its counters expect. Lines are written on ``FlushMetrics`` and every 60 s. Once a VM has
migrated (either way), the ``migration`` group carries its state and final report (absolute figures).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmlet.api.controller import Vmm
    from kvmlet.eventloop import EventLoopThread

log = logging.getLogger("kvmlet.metrics")
PERIOD = 60.0
ABSOLUTE = ("utc_timestamp_ms", "api_server", "migration")   # migration: the state and the final report


def _plain(stats: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return {k: v for k, v in dataclasses.asdict(stats).items() if isinstance(v, int | float)}
    return {}


def _stats_of(device: object) -> dict[str, Any]:
    stats = getattr(device, "stats", None)
    return _plain(stats() if callable(stats) else stats)


def collect(vmm: Vmm) -> dict[str, Any]:
    """Every counter, as running totals, in Firecracker's groups (kvmlet's own names inside them)."""
    snapshot: dict[str, Any] = {"utc_timestamp_ms": int(time.time() * 1000),
                                "api_server": {"process_startup_time_us": vmm.startup_us}}
    for group, method in (("get_api_requests", "GET"), ("put_api_requests", "PUT"),
                          ("patch_api_requests", "PATCH")):
        snapshot[group] = {}
        for key, count in vmm.counters.requests.items():
            verb, _, resource = key.partition(" ")
            if verb == method:
                name = resource.strip("/").replace("/", "_").replace("-", "_") or "instance_info"
                snapshot[group][f"{name}_count"] = count
                snapshot[group][f"{name}_fails"] = vmm.counters.failures.get(key, 0)
    machine = vmm.machine
    vcpu: dict[str, int] = {}
    if machine is not None:
        from kvmlet.devices.virtio.blk import VirtioBlock
        from kvmlet.devices.virtio.net import VirtioNet

        for entry in _exit_statistics(machine):
            for source in ("kvm", "kvmlet"):
                for key, value in entry.get(source, {}).items():
                    name = f"{source}_{key}".lower()
                    vcpu[name] = vcpu.get(name, 0) + value
        if machine.legacy is not None:
            snapshot["uart"] = _stats_of(machine.legacy.serial)
            snapshot["i8042"] = _stats_of(machine.legacy.i8042)
        devices = machine.devices
        for managed in devices.devices if devices is not None else []:
            device = managed.device
            group = ""
            if isinstance(device, VirtioBlock):
                group = f"block_{device.drive_id.decode(errors='replace').rstrip(chr(0))}"
            elif isinstance(device, VirtioNet):
                group = f"net_{managed.name.removeprefix('net:')}"
            elif managed.transport is not None or managed.name == "tpm":   # tpm: the vTPM (kvmlet.tpm)
                group = managed.name
            if not group:
                continue
            values = _stats_of(device)
            if managed.transport is not None:
                values.update({f"transport_{k}": v for k, v in _plain(managed.transport.stats).items()})
            for attribute in ("rate_limiter", "rx_rate_limiter", "tx_rate_limiter"):
                limiter = getattr(device, attribute, None)
                if limiter is not None:
                    values[f"{attribute}_throttled_count"] = limiter.throttled
            snapshot[group] = values
            if group.startswith(("block_", "net_")):
                total = snapshot.setdefault(group.split("_", 1)[0], {})
                for key, value in values.items():
                    total[key] = total.get(key, 0) + value
    snapshot["vcpu"] = vcpu
    snapshot["vmm"] = {"state": vmm.state.value}
    if vmm.migration is not None:
        from kvmlet.migration.control import metrics_group

        migration = metrics_group(vmm)
        if migration is not None:
            snapshot["migration"] = migration
    return snapshot


def _exit_statistics(machine: Any) -> list[dict[str, Any]]:
    try:
        return list(machine.exit_statistics())
    except OSError:   # the VM is being torn down
        return []


def _delta(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in now.items():
        if isinstance(value, dict):
            out[key] = value if key in ABSOLUTE else _delta(value, before.get(key, {}))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key not in ABSOLUTE:
            out[key] = value - before.get(key, 0)
        else:
            out[key] = value
    return out


class MetricsWriter:
    """Writes a JSON line per flush to the metrics path (a file, appended to, or a FIFO)."""

    def __init__(self, vmm: Vmm, path: str, events: EventLoopThread) -> None:
        self.vmm = vmm
        self.path = path
        self.events = events
        self._previous: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.lines = 0
        self._closed = False

    def start(self) -> None:
        self.events.call_later(PERIOD, self._periodic)

    def _periodic(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        except OSError as exc:
            log.warning("metrics: cannot write %s: %s", self.path, exc.strerror)
        self.events.call_later(PERIOD, self._periodic)

    def flush(self) -> None:
        with self._lock:
            now = collect(self.vmm)
            line = json.dumps(_delta(now, self._previous), separators=(",", ":")) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            self._previous = now
            self.lines += 1

    def close(self) -> None:
        self._closed = True


def prometheus_text(vmm: Vmm) -> str:
    """The running totals in Prometheus' text format (prometheus_client renders them)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    snapshot = collect(vmm)

    class Snapshot(Collector):
        def collect(self) -> Any:
            for group, values in snapshot.items():
                if not isinstance(values, dict):
                    continue
                for key, value in values.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        name = f"kvmlet_{group}_{key}".replace("-", "_").replace(":", "_").replace(".", "_")
                        family = GaugeMetricFamily(name, f"{group} {key}", labels=["instance"])
                        family.add_metric([vmm.instance_id], value)
                        yield family

    registry = CollectorRegistry()
    registry.register(Snapshot())
    return generate_latest(registry).decode()
