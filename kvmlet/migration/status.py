"""What ``GET /migration`` answers on either side, and the final report (also in the metrics)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

State = Literal["none", "listening", "active", "completed", "failed", "cancelled"]


class MigrationReport(msgspec.Struct, kw_only=True):
    """How a migration went, once it has ended (source: completed or not; destination: completed)."""

    outcome: str                     # completed, failed, cancelled
    total_ms: float                  # from the request (source) or the connection (destination) to the end
    downtime_ms: float               # source: pause to the destination's "running"; destination: Complete to running
    setup_ms: float = 0.0            # connection, preambles, CPU gate, the destination's machine built
    precopy_ms: float = 0.0          # from the first page to the pause
    rounds: int = 0                  # passes over memory, the first (all of it) and the last (paused) included
    bytes: int = 0                   # on the wire, in the direction of the VM
    memory_bytes: int = 0            # of page data in that
    pages_data: int = 0
    pages_zero: int = 0
    pages_unchanged: int = 0
    throttle_pct: int = 0            # the highest auto-converge throttle used
    pause_ms: float = 0.0            # downtime parts (source): pausing the vCPUs and devices, flushing drives
    last_round_ms: float = 0.0       # the last dirty pages
    state_ms: float = 0.0            # reading and sending every vCPU's, the VM's and the devices' state
    restore_ms: float = 0.0          # the destination restoring the state
    handover_ms: float = 0.0         # from the destination's "ready" to its "running"
    memory_sha256: str | None = None


class MigrationStatus(msgspec.Struct, kw_only=True):
    state: State = "none"
    role: Literal["source", "destination"] | None = None
    phase: str | None = None         # connecting, handshake, precopy, switchover, handover, done
    peer: str | None = None          # the destination (source), the source (destination)
    listen_address: str | None = None
    round: int = 0
    bytes: int = 0
    memory_bytes: int = 0
    pages_data: int = 0
    pages_zero: int = 0
    pages_unchanged: int = 0
    dirty_pages: int = 0             # found dirty at the start of the current round
    dirty_rate_pages_s: float = 0.0
    bandwidth_mib_s: float = 0.0
    remaining_bytes: int = 0
    expected_downtime_ms: float | None = None
    throttle_pct: int = 0
    elapsed_ms: float = 0.0
    error: str | None = None
    missing_features: list[str] = msgspec.field(default_factory=list)
    memory_sha256: str | None = None
    report: MigrationReport | None = None

    def to_json(self) -> dict[str, Any]:
        out = msgspec.to_builtins(self)
        assert isinstance(out, dict)
        return out


def metrics(status: MigrationStatus) -> dict[str, Any]:
    """The metrics' ``migration`` group: the state and, once there is one, the final report's figures."""
    out: dict[str, Any] = {"state": status.state, "role": status.role or "", "round": status.round,
                           "bytes": status.bytes, "throttle_pct": status.throttle_pct}
    if status.report is not None:
        for key, value in msgspec.to_builtins(status.report).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"report_{key}"] = value
    return out
