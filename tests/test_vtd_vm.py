"""The VT-d unit in real VMs: the test guest finds it in ACPI DMAR, builds root, context and page tables,
enables translation, and checks DMA isolation end to end: virtio-blk and virtio-rng work through I/O virtual
addresses; an unmapped page faults with the right source ID, address and reason, the request fails and memory
is unchanged, and the fault event MSI arrives; a page-selective invalidation is honoured; one domain's page
is out of another device's reach; a guest that never enables translation gets pass-through. Also: queued and
register-based invalidation, 3- and 4-level tables, 2 MiB and 1 GiB pages, pass-through contexts, a snapshot
taken while translation is on, and device assignment (VFIO) where the host has it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.support.apiclient import ApiServer, guest_boot_source
from tests.support.pcivm import disk, pci_config, run_pci
from tests.support.vsockecho import pong_server

ISOLATION = "vtd-probe,vtd-on,virtio-blk,virtio-rng,vtd-fault,vtd-stale,vtd-isolation,vtd-off,virtio-blk"


def _all_passed(output: str, names: str) -> None:
    for name in names.split(","):
        assert f"TEST {name} PASS" in output, output[-3000:]
    assert "TESTS DONE" in output and re.search(r"TESTS DONE \d+ 0", output), output[-3000:]


@pytest.mark.parametrize("extra", ["", "kvmlet.vtd_qi=0", "kvmlet.vtd_levels=3"],
                         ids=["queued-4-level", "registers", "3-level"])
def test_dma_isolation_in_the_guest(guest_elf: Path, tmp_path: Path, extra: str) -> None:
    run = run_pci(pci_config(guest_elf, tmp_path, ISOLATION, extra=f"kvmlet.virtio=pci {extra}", iommu="vtd"))
    assert run.status.code == 0, run.output[-3000:]
    _all_passed(run.output, ISOLATION)
    assert "VTD base=0xfed90000 ver=1.0" in run.output and "VTD scope=all" in run.output     # DMAR, INCLUDE_PCI_ALL
    levels = 3 if "levels=3" in extra else 4
    assert f"VTD on devices=2 levels={levels} page=0x1000" in run.output
    assert re.search(r"VTD fault sid=00:01\.0 addr=0x[0-9a-f]+ reason=5 type=write", run.output), run.output
    assert "VTD fault event vector=0x5f" in run.output
    vtd = run.stats["vtd"]
    assert vtd.faults_recorded >= 2 and vtd.fault_events >= 1                # type: ignore[attr-defined]
    assert vtd.iotlb_hits + vtd.window_hits > vtd.iotlb_misses > 0           # type: ignore[attr-defined]
    if "vtd_qi=0" in extra:
        assert vtd.queued_descriptors == 0                                   # type: ignore[attr-defined]
    else:
        assert vtd.queued_descriptors > 0                                    # type: ignore[attr-defined]


@pytest.mark.parametrize("page", ["2m", "1g"])
def test_large_pages(guest_elf: Path, tmp_path: Path, page: str) -> None:
    tests = "vtd-on,virtio-blk,virtio-rng,virtio-blk-bench"
    run = run_pci(pci_config(guest_elf, tmp_path, tests,
                             extra=f"kvmlet.virtio=pci kvmlet.vtd_page={page} kvmlet.loops=200", iommu="vtd"))
    _all_passed(run.output, tests)
    assert f"page=0x{(2 << 20 if page == '2m' else 1 << 30):x}" in run.output


def test_pass_through(guest_elf: Path, tmp_path: Path) -> None:
    """Translation never enabled, and pass-through context entries: the devices use guest-physical addresses."""
    tests = "virtio-blk,virtio-rng,vtd-on,virtio-blk"
    run = run_pci(pci_config(guest_elf, tmp_path, tests, extra="kvmlet.virtio=pci kvmlet.vtd_pt=1", iommu="vtd"))
    _all_passed(run.output, tests)
    assert "offset=0x0 qi=1 pt=1" in run.output
    assert run.stats["vtd"].faults == 0                                      # type: ignore[attr-defined]


def test_a_snapshot_taken_while_translation_is_on(guest_elf: Path, tmp_path: Path) -> None:
    """The unit's registers, the PCI configuration and the MSI-X tables travel with the snapshot: after the
    restore the guest's DMA still translates, faults are still recorded and the fault event still arrives."""
    drive = disk(tmp_path / "d0.img")
    tests = "vtd-on,virtio-blk,vmgenid,virtio-blk,vtd-fault,vtd-isolation"
    for name in ("origin", "clone"):
        (tmp_path / name).mkdir()
    origin = ApiServer(tmp_path / "origin")
    clone = ApiServer(tmp_path / "clone")
    try:
        ok = (204,)
        assert origin.call("PUT", "/boot-source", guest_boot_source(guest_elf, tests, "kvmlet.virtio=pci"))[0] in ok
        assert origin.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "iommu": "vtd"})[0] in ok
        assert origin.call("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": str(drive),
                                                 "is_root_device": False, "transport": "pci"})[0] in ok
        assert origin.call("PUT", "/entropy", {"transport": "pci"})[0] in ok
        assert origin.call("PUT", "/actions", {"action_type": "InstanceStart"})[0] in ok
        origin.wait_console("vmgenid addr=", timeout=60)
        time.sleep(0.1)
        assert origin.call("PATCH", "/vm", {"state": "Paused"})[0] in ok
        state, memory = tmp_path / "vm.snap", tmp_path / "vm.mem"
        assert origin.call("PUT", "/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(memory)})[0] \
            in ok
        origin.stop()
        assert clone.call("PUT", "/snapshot/load", {"snapshot_path": str(state), "resume_vm": True, "mem_backend": {
            "backend_type": "File", "backend_path": str(memory)}})[0] in ok
        output = clone.wait_console("TESTS DONE", timeout=60)
        _all_passed(output, "virtio-blk,vmgenid,vtd-fault,vtd-isolation")
        assert "VTD fault event vector=0x5f" in output
    finally:
        origin.stop()
        clone.stop()


def test_live_migration_while_translation_is_on(guest_elf: Path, tmp_path: Path) -> None:
    """Migrated (over a Unix socket) while virtio-blk reads through I/O virtual addresses: at the destination the
    benchmark finishes and DMA still translates, faults and isolates."""
    drive = disk(tmp_path / "d0.img")
    tests = "vtd-on,virtio-blk-bench,virtio-blk,vtd-fault,vtd-stale,vtd-isolation"
    stream = tmp_path / "mig.sock"
    for name in ("source", "destination"):
        (tmp_path / name).mkdir()
    destination = ApiServer(tmp_path / "destination", "--migrate-listen", f"unix:{stream}")
    source = ApiServer(tmp_path / "source")
    try:
        ok = (204,)
        assert source.call("PUT", "/boot-source", guest_boot_source(
            guest_elf, tests, "kvmlet.virtio=pci kvmlet.loops=30000"))[0] in ok
        assert source.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "iommu": "vtd"})[0] in ok
        assert source.call("PUT", "/drives/d0", {"drive_id": "d0", "path_on_host": str(drive),
                                                 "is_root_device": False, "transport": "pci"})[0] in ok
        assert source.call("PUT", "/entropy", {"transport": "pci"})[0] in ok
        assert source.call("PUT", "/actions", {"action_type": "InstanceStart"})[0] in ok
        source.wait_console("BENCH blk-randread start", timeout=60)
        assert source.call("PUT", "/migration/send", {"destination": f"unix:{stream}"})[0] in ok
        deadline = time.monotonic() + 60
        while True:
            status = source.call("GET", "/migration")[1]
            if status["state"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert status["state"] == "completed", status
        output = destination.wait_console("TESTS DONE", timeout=60)
        before = source.console_text()
        assert "TEST vtd-on PASS" in before
        assert "TEST virtio-blk-bench" not in before, before[-500:]     # it was still running when it moved
        _all_passed(before + output, "virtio-blk-bench,virtio-blk,vtd-fault,vtd-stale,vtd-isolation")
        assert "TEST vtd-fault PASS" in output and "TEST vtd-isolation PASS" in output
    finally:
        source.stop()
        destination.stop()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="TAP devices and network namespaces need root")
@pytest.mark.parametrize("queues", [1, 2])
def test_virtio_net_through_io_virtual_addresses(guest_elf: Path, tmp_path: Path, queues: int) -> None:
    """ARP and a UDP echo over virtio-net on PCI, behind the unit with translation on (and multiqueue)."""
    import msgspec

    from kvmlet.config import NetworkInterface
    from tests.support.netlab import peer_network

    with peer_network(udp_port=7779) as peer:
        extra = (f"kvmlet.virtio=pci kvmlet.net_ip={peer.guest_ip} kvmlet.net_peer={peer.peer_ip} "
                 f"kvmlet.net_port={peer.udp_port} kvmlet.net_queues={queues} kvmlet.timeout=20")
        config = pci_config(guest_elf, tmp_path, "vtd-on,virtio-net,vtd-off,virtio-net", extra=extra, iommu="vtd",
                            rng=False)
        net = NetworkInterface(iface_id="net0", host_dev_name="auto", queues=queues, bridge=peer.bridge,
                               transport="pci")
        run = run_pci(msgspec.structs.replace(config, drives=[], network_interfaces=[net]))
    _all_passed(run.output, "vtd-on,virtio-net,vtd-off")
    assert run.output.count("TEST virtio-net PASS") == 2, run.output[-3000:]
    assert "VTD on devices=1" in run.output and f"NET queues={queues}" in run.output
    vtd = run.stats["vtd"]
    assert vtd.translations > 0 and vtd.faults == 0                           # type: ignore[attr-defined]


def test_virtio_vsock_through_io_virtual_addresses(guest_elf: Path, tmp_path: Path) -> None:
    """virtio-vsock on PCI behind the unit, translation on: the guest's PING reaches a host Unix socket."""

    import msgspec

    from kvmlet.config import Vsock

    uds, port = tmp_path / "vm.vsock", 1234
    with pong_server(f"{uds}_{port}") as got:
        config = pci_config(guest_elf, tmp_path, "vtd-on,virtio-vsock",
                            extra=f"kvmlet.virtio=pci kvmlet.vsock_port={port}", iommu="vtd", rng=False)
        run = run_pci(msgspec.structs.replace(config, drives=[], vsock=Vsock(guest_cid=7, uds_path=str(uds),
                                                                              transport="pci")))
    _all_passed(run.output, "vtd-on,virtio-vsock")
    assert got == [b"PING\n"] and run.stats["vtd"].faults == 0                # type: ignore[attr-defined]
