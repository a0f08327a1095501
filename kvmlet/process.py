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
