"""A machine's lifecycle states, how it ended, and the timeline of its start."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvmlet.errors import KvmletError


class VmState(enum.Enum):
    """configured -> running <-> paused -> stopped (Firecracker: Not started, Running, Paused, Halted)."""

    CONFIGURED = "configured"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class StopKind(enum.Enum):
    GUEST_EXIT = "guest-exit"          # the guest wrote its status to the debug-exit port
    RESET = "reset"                    # i8042 reset or a reset system event
    SHUTDOWN = "shutdown"              # power off
    TRIPLE_FAULT = "triple-fault"      # the guest crashed beyond its own exception handling
    INTERNAL_ERROR = "internal-error"  # KVM could not run or emulate the guest
    ERROR = "error"                    # a VMM failure
    STOPPED = "stopped"                # stopped by the user or the VMM


@dataclass
class ExitStatus:
    """How a VM ended; ``code`` is what `kvmlet run` exits with."""

    kind: StopKind
    message: str
    code: int
    warning: str | None = None   # something the user should hear even when the guest ended normally


@dataclass
class BootTimeline:
    """Points on the way from process start to the first console byte (perf_counter seconds)."""

    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())


class MachineError(KvmletError):
    """The VM could not be built or controlled."""
