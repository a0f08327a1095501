"""Process-wide settings a VMM makes once at start."""

from __future__ import annotations


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (as QEMU does): a guest's connections, TAP queues
    and the API's clients all need descriptors, and the common soft limit of 1024 runs out before the
    devices' own limits (vsock: MAX_CONNECTIONS) do. Returns the limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft


def _load_prctl() -> object:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PRCTL = _load_prctl()   # looked up before any fork: a forked child only calls it
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for a helper daemon (a switch, a back end): SIGTERM it when the thread that started it ends,
    so a VMM killed by SIGKILL or SIGHUP leaves no polling process behind. Start such daemons from a thread that
    lives as long as they should (the main thread)."""
    import signal

    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)  # type: ignore[operator]
