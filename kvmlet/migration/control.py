"""Migration as the API server's VMM (:class:`kvmlet.api.controller.Vmm`) offers it: send, cancel, status,
and a ``kvmlet serve`` started to receive one."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvmlet.errors import StateError
from kvmlet.migration.destination import Incoming
from kvmlet.migration.params import ListenOptions, MigrationSendParams
from kvmlet.migration.source import MigrationSource
from kvmlet.migration.status import MigrationStatus, metrics

if TYPE_CHECKING:
    from kvmlet.api.controller import Vmm
    from kvmlet.machine import Machine

log = logging.getLogger("kvmlet.migration")
IN_PROGRESS = "a migration is in progress (PATCH /migration {\"state\": \"Cancelled\"} cancels it)"
RECEIVING = "this kvmlet waits for an incoming migration (kvmlet serve --migrate-listen)"


def in_progress(vmm: Vmm) -> bool:
    migration = vmm.migration
    return isinstance(migration, MigrationSource) and migration.active


def receiving(vmm: Vmm) -> bool:
    migration = vmm.migration
    return isinstance(migration, Incoming) and migration.waiting


def send(vmm: Vmm, machine: Machine, params: MigrationSendParams) -> None:
    """Start migrating ``machine`` (called under the VMM's lock); its progress is in :func:`status`."""
    from kvmlet.machine import VmState

    address = params.validate()
    if in_progress(vmm):
        raise StateError("a migration is already in progress")
    if machine.exited or machine.state not in (VmState.RUNNING, VmState.PAUSED):
        raise StateError(f"cannot migrate a VM that is {vmm.state.value}")
    if machine.devices is not None:
        machine.devices.check_savable()   # a device that cannot move refuses now, before any page is sent
    source = MigrationSource(machine, params, address, vm_id=vmm.instance_id)
    vmm.migration = source
    source.start()


def cancel(vmm: Vmm) -> None:
    migration = vmm.migration
    if not isinstance(migration, MigrationSource):
        raise StateError("no outgoing migration to cancel")
    migration.cancel()


def status(vmm: Vmm) -> MigrationStatus:
    migration = vmm.migration
    if migration is None:
        return MigrationStatus()
    return migration.status()


def status_json(vmm: Vmm) -> dict[str, Any]:
    return status(vmm).to_json()


def metrics_group(vmm: Vmm) -> dict[str, Any] | None:
    return metrics(status(vmm)) if vmm.migration is not None else None


def listen(vmm: Vmm, options: ListenOptions) -> None:
    """Make a VMM with nothing configured wait for an incoming migration (``kvmlet serve --migrate-listen``)."""
    def arrived(machine: Machine) -> None:
        vmm.adopt(machine)

    incoming = Incoming(options, vmm.events, on_machine=arrived, console_spec=vmm.config.console)
    incoming.start()
    vmm.migration = incoming


def preload() -> None:
    """What a migration's start uses (a server imports it while it waits, as it does for InstanceStart)."""
    import msgspec

    import kvmlet.cpu.features
    import kvmlet.migration.pages
    import kvmlet.snapshot.create
    import kvmlet.snapshot.memory_file
    import kvmlet.snapshot.sections  # noqa: F401
    from kvmlet.migration.stream import Message

    msgspec.msgpack.Decoder(Message)


def close(vmm: Vmm) -> None:
    """At the server's end: cancel an outgoing migration, stop listening."""
    migration = vmm.migration
    if isinstance(migration, MigrationSource) and migration.active:
        try:
            migration.cancel()
        except StateError:
            pass
        if not migration.wait(5):   # e.g. stuck resolving a host name: it has not touched the VM yet
            log.warning("the outgoing migration did not end within 5 s of its cancel")
    elif isinstance(migration, Incoming):
        migration.close()
