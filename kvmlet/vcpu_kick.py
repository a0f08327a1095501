"""The signal that stops a vCPU blocked in KVM_RUN (with ``immediate_exit``), and installing its handler.

A module of its own so that a process (the API server) can install the handler on its main thread at start,
before any VM exists, without importing the KVM bindings.
"""

from __future__ import annotations

import signal
import threading

KICK_SIGNAL = signal.SIGUSR2


def install_kick_handler() -> None:
    """Make the kick signal interrupt KVM_RUN without killing the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise RuntimeError(f"the first kvmlet VM in a process must be built on the main thread: it installs "
                               f"the {KICK_SIGNAL.name} handler that stops vCPUs")
        return
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    signal.siginterrupt(KICK_SIGNAL, True)
