"""The vTPM's errors: each one line a user can act on."""

from __future__ import annotations

from kvmlet.errors import KvmletError


class TpmError(KvmletError):
    """The vTPM could not be provisioned, started or used (swtpm missing, died, refused a command)."""


class SwtpmDied(TpmError):
    """The swtpm process is gone: every later command fails until the VM is rebuilt."""


class PolicyError(KvmletError):
    """A launch policy that cannot be used (unsigned, badly signed, malformed) or that refuses the launch."""


class AttestationError(KvmletError):
    """A quote that does not verify; the message names the first check that failed."""
