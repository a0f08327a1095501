"""Interrupt lines from devices to the guest's interrupt controllers."""

from __future__ import annotations

import os
from typing import Protocol


class InterruptLine(Protocol):
    """An edge-triggered interrupt line: ``trigger`` sends one interrupt to the guest."""

    def trigger(self) -> None: ...


class EventFdInterrupt:
    """An interrupt delivered by writing to an eventfd that KVM's irqfd routes to a GSI."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:  # counter saturated: an interrupt is pending anyway
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NullInterrupt:
    """A line connected to nothing (for devices used without a VM, e.g. in unit tests)."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
