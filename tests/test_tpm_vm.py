"""The vTPM end to end, with swtpm and real VMs: the supervisor, the guest's TIS driver replaying the event log,
quotes checked by kvmlet and by tpm2_checkquote, tampering, the launch policy, snapshots, swtpm dying, cleanup."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from kvmlet.config.models import Tpm, VmConfig
from kvmlet.devices.legacy.console import BufferConsole
from kvmlet.eventloop import EventLoopThread
from kvmlet.machine import Machine, build_machine
from kvmlet.machine.state import StopKind
from kvmlet.memory import MiB
from tests.support.vmrun import built_machine, vm_config

if shutil.which("swtpm") is None or shutil.which("swtpm_setup") is None:
    pytest.skip("swtpm is not installed on this host (Debian packages swtpm and swtpm-tools)",
                allow_module_level=True)
pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed (pip install tpm2-pytss, needs libtss2-dev)")

from kvmlet.tpm.attest import checkquote_files, verify_bundle
from kvmlet.tpm.errors import PolicyError
from kvmlet.tpm.eventlog import TPM_ALG_SHA256, parse_log, replay
from kvmlet.tpm.launch import find_vtpm
from kvmlet.tpm.measure import LAUNCH_PCRS
from kvmlet.tpm.policy import generate_key, load_policy, sign_policy
from kvmlet.tpm.swtpm import Blob, Swtpm, provision
from kvmlet.tpm.vtpm import Vtpm

REPO = Path(__file__).resolve().parent.parent
TPM_TEST = "console=ttyS0 kvmlet.test=tpm"
PCRS_WITH_GUEST = (*LAUNCH_PCRS, 23)


@pytest.fixture(scope="session")
def provisioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One provisioned vTPM (EK and certificate) that tests copy: provisioning takes about a second."""
    state = tmp_path_factory.mktemp("vtpm-template") / "state"
    provision(state)
    return state


@pytest.fixture
def stable_guest(guest_elf: Path, tmp_path: Path) -> Path:
    """A copy of the test guest: launches compared by their measurements must boot the same bytes, even if the
    guest is rebuilt meanwhile."""
    copy = tmp_path / "guest.elf"
    shutil.copyfile(guest_elf, copy)
    return copy


@pytest.fixture
def tpm(provisioned: Path, tmp_path: Path) -> Tpm:
    state = tmp_path / "vtpm"
    shutil.copytree(provisioned, state)
    return Tpm(state_dir=str(state))


def _config(guest_elf: Path, tpm: Tpm, cmdline: str = TPM_TEST) -> VmConfig:
    return msgspec.structs.replace(vm_config(guest_elf, cmdline=cmdline, memory=64 * MiB), tpm=tpm)


def _swtpm_children() -> set[int]:
    """Our swtpm child processes (by /proc: parent pid and program name)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        if name == "swtpm" and parent == os.getpid():
            found.add(int(entry.name))
    return found


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                return True   # exited, waiting for its parent to reap it
        except OSError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    before = _swtpm_children()
    yield
    deadline = time.monotonic() + 5
    while _swtpm_children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _swtpm_children() - before, "swtpm processes left behind"


# -- the supervisor ------------------------------------------------------------------------------------------


def test_swtpm_is_started_driven_and_reaped(tpm: Tpm, tmp_path: Path, no_leftovers: None) -> None:
    assert tpm.state_dir is not None
    swtpm = Swtpm.start(Path(tpm.state_dir), tmp_path / "swtpm.log")
    try:
        assert swtpm.alive and swtpm.pid in _swtpm_children()
        swtpm.init()
        swtpm.dynamic_launch(b"measured launch environment")
        assert swtpm.established()
        assert len(swtpm.get_state_blob(Blob.PERMANENT)) > 1000
        assert not list(tmp_path.glob("**/*.sock")), "no socket files: both channels are socketpairs"
    finally:
        swtpm.close()
    assert _gone(swtpm.pid) and not swtpm.alive


def test_a_vtpm_without_state_dir_is_provisioned_and_removed(no_leftovers: None) -> None:
    vtpm = Vtpm(Tpm())
    try:
        from kvmlet.tpm.measure import kvmlet_measurement
        from kvmlet.tpm.policy import no_policy_measurement

        log = vtpm.launch([kvmlet_measurement(), no_policy_measurement()])
        assert (vtpm.state_dir / "tpm2-00.permall").is_file()
        assert vtpm.ek_certificate() is not None
        values = vtpm.pcr_values((17, 18))
        assert values == replay(parse_log(log), TPM_ALG_SHA256)
    finally:
        vtpm.close()
    assert not vtpm.run_dir.exists()


# -- the guest and quotes ------------------------------------------------------------------------------------


@pytest.fixture
def guest_run(guest_elf: Path, tpm: Tpm, no_leftovers: None) -> Iterator[tuple[Machine, str]]:
    """The test guest's tpm check, run to its end; the machine (and its vTPM) still open."""
    console = BufferConsole()
    with built_machine(_config(guest_elf, tpm), console=console) as machine:
        machine.start()
        status = machine.wait(60)
        output = console.output().decode(errors="replace")
        assert status.kind is StopKind.GUEST_EXIT and status.code == 0, output
        yield machine, output


def test_the_guest_replays_the_event_log_against_the_pcrs_and_extends_one(guest_run: tuple[Machine, str]) -> None:
    machine, output = guest_run
    assert "TEST tpm PASS" in output, output
    assert "tpm locality4 refused" in output
    lines = {line.split()[2]: line.split()[3] for line in output.splitlines() if line.startswith("tpm pcr ")}
    assert sorted(map(int, lines)) == [1, 4, 8, 17, 18]        # no initrd: no PCR 9 event
    assert machine.devices is not None
    vtpm = find_vtpm(machine.devices)
    values = vtpm.pcr_values(PCRS_WITH_GUEST)
    for pcr, value in lines.items():
        assert values[int(pcr)].hex() == value
    extended = next(line.split()[4] for line in output.splitlines() if line.startswith("tpm extend pcr 23 "))
    assert values[23].hex() == extended
    # what the guest was given is what kvmlet measured
    cmdline = next(m for m in vtpm.measurements if m.name == "cmdline")
    assert cmdline.payload == machine.boot_info.cmdline if machine.boot_info else False


def test_a_quote_verifies_with_kvmlet_and_tpm2_checkquote(guest_run: tuple[Machine, str], tmp_path: Path) -> None:
    machine, _ = guest_run
    assert machine.devices is not None
    bundle = find_vtpm(machine.devices).quote(b"fresh nonce", PCRS_WITH_GUEST)
    result = verify_bundle(bundle, b"fresh nonce")
    assert result.ok, result.problems
    assert set(result.components) == {"kvmlet", "policy", "config", "kernel", "cmdline"}
    assert result.extra_pcrs == [9, 23]   # no initrd, and the guest's own extension: quoted, not in the log
    if shutil.which("tpm2_checkquote") is None:
        pytest.fail("tpm2_checkquote is missing (Debian: tpm2-tools, installed by scripts/setup.sh)")
    done = subprocess.run(["tpm2_checkquote", *checkquote_files(bundle, tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "23: 0x" + bundle["pcrs"]["23"].upper() in done.stdout
    wrong = checkquote_files(bundle, tmp_path)
    wrong[-1] = b"another nonce".hex()
    assert subprocess.run(["tpm2_checkquote", *wrong], capture_output=True).returncode != 0
    log_file = tmp_path / "eventlog.bin"
    log_file.write_bytes(base64.b64decode(bundle["event_log"]))
    if shutil.which("tpm2_eventlog") is not None:
        parsed = subprocess.run(["tpm2_eventlog", str(log_file)], capture_output=True, text=True)
        assert parsed.returncode == 0, parsed.stderr
        sha256 = parsed.stdout.split("pcrs:", 1)[1].split("sha384:", 1)[0]
        replayed = {int(line.split(":")[0]): line.split("0x")[1].strip() for line in sha256.splitlines()
                    if "0x" in line}
        assert replayed == {int(k): v for k, v in bundle["pcrs"].items() if int(k) in replayed}
        assert sorted(replayed) == [1, 4, 8, 17, 18]


def test_tampered_quotes_are_rejected_with_the_reason(guest_run: tuple[Machine, str]) -> None:
    machine, _ = guest_run
    assert machine.devices is not None
    vtpm = find_vtpm(machine.devices)
    bundle = vtpm.quote(b"nonce one")

    replayed = verify_bundle(bundle, b"nonce two")
    assert any("nonce mismatch" in p and "replayed" in p for p in replayed.problems), replayed.problems

    log = bytearray(base64.b64decode(bundle["event_log"]))
    cmdline = next(m for m in vtpm.measurements if m.name == "cmdline")
    at = bytes(log).index(cmdline.digests[TPM_ALG_SHA256])
    log[at] ^= 1
    forged = dict(bundle, event_log=base64.b64encode(bytes(log)).decode())
    problems = verify_bundle(forged, b"nonce one").problems
    assert any(p.startswith("PCR 8 (cmdline): the event log replays to") for p in problems), problems

    pcrs = dict(bundle["pcrs"], **{"4": "00" * 32})
    problems = verify_bundle(dict(bundle, pcrs=pcrs), b"nonce one").problems
    assert any("PCR digest mismatch" in p for p in problems), problems

    quoted = bytearray(base64.b64decode(bundle["quoted"]))
    quoted[-1] ^= 1
    problems = verify_bundle(dict(bundle, quoted=base64.b64encode(bytes(quoted)).decode()), b"nonce one").problems
    assert any("bad signature" in p for p in problems), problems

    other = Vtpm(Tpm())
    try:
        from kvmlet.tpm.measure import kvmlet_measurement
        from kvmlet.tpm.policy import no_policy_measurement

        other.launch([kvmlet_measurement(), no_policy_measurement()])
        foreign_ak = other.ak_public_pem()
    finally:
        other.close()
    problems = verify_bundle(bundle, b"nonce one", trusted_ak_pem=foreign_ak).problems
    assert any("bad signature" in p for p in problems), problems


# -- the launch policy ---------------------------------------------------------------------------------------


def _policy_for(config: VmConfig, tmp_path: Path, name: str) -> tuple[Path, Path, dict[str, object]]:
    """A policy allowing exactly what ``config`` launches (as `kvmlet attest measure` makes it)."""
    if not (tmp_path / "owner.key").exists():
        generate_key(tmp_path / "owner.key", tmp_path / "owner.pub")
    events = EventLoopThread()
    try:
        machine = build_machine(config, events)
        assert machine.devices is not None
        allow = {m.name: [m.sha256] for m in find_vtpm(machine.devices).measurements if m.name != "policy"}
        machine.close()
    finally:
        events.stop()
    path = tmp_path / f"{name}.policy"
    path.write_text(json.dumps(sign_policy({"name": name, "allow": allow}, tmp_path / "owner.key")))
    return path, tmp_path / "owner.pub", allow


def test_a_policy_allows_its_launch_and_refuses_another(stable_guest: Path, tpm: Tpm, tmp_path: Path,
                                                       no_leftovers: None) -> None:
    config = _config(stable_guest, tpm)
    policy, key, _ = _policy_for(config, tmp_path, "allowed")
    allowed = msgspec.structs.replace(config, tpm=msgspec.structs.replace(tpm, policy=str(policy),
                                                                          policy_key=str(key)))
    console = BufferConsole()
    with built_machine(allowed, console=console) as machine:
        machine.start()
        assert machine.wait(60).code == 0, console.output()
        assert machine.devices is not None
        bundle = find_vtpm(machine.devices).quote(b"n")
    launched = load_policy(policy, key)
    assert verify_bundle(bundle, b"n", policy=launched).ok
    assert "TEST tpm PASS" in console.output().decode()

    tampered = msgspec.structs.replace(allowed, boot_source=msgspec.structs.replace(
        allowed.boot_source, boot_args=TPM_TEST + " init=/bin/sh"))
    runs_before = set(Path(tempfile.gettempdir()).glob(f"kvmlet-vtpm-{os.getpid()}-*"))
    with pytest.raises(PolicyError) as refused, built_machine(tampered):
        pytest.fail("a launch the policy does not allow was built")
    message = str(refused.value)
    assert "launch refused by policy 'allowed'" in message and "cmdline sha256" in message
    assert "is not allowed (expected" in message and "kernel" not in message
    assert set(Path(tempfile.gettempdir()).glob(f"kvmlet-vtpm-{os.getpid()}-*")) == runs_before

    # the quote of a launch without the policy does not satisfy it either
    unpolicied = msgspec.structs.replace(tampered, tpm=tpm)
    with built_machine(unpolicied) as machine:
        assert machine.devices is not None
        bundle = find_vtpm(machine.devices).quote(b"m")
    problems = verify_bundle(bundle, b"m", policy=launched).problems
    assert any(p.startswith("policy: cmdline sha256") for p in problems), problems


def test_a_badly_signed_policy_refuses_the_launch(stable_guest: Path, tpm: Tpm, tmp_path: Path,
                                                 no_leftovers: None) -> None:
    config = _config(stable_guest, tpm)
    policy, key, _ = _policy_for(config, tmp_path, "signed")
    document = json.loads(policy.read_text())
    document["policy"]["name"] = "renamed"
    policy.write_text(json.dumps(document))
    bad = msgspec.structs.replace(config, tpm=msgspec.structs.replace(tpm, policy=str(policy), policy_key=str(key)))
    with pytest.raises(PolicyError, match="bad signature"), built_machine(bad):
        pass


# -- lifecycle -------------------------------------------------------------------------------------------------


def test_snapshot_and_restore_keep_the_pcrs_keys_and_log(guest_elf: Path, tpm: Tpm, tmp_path: Path,
                                                         no_leftovers: None) -> None:
    from kvmlet.config.models import SnapshotLoadParams
    from kvmlet.snapshot.create import create_snapshot
    from kvmlet.snapshot.restore import load_snapshot

    config = _config(guest_elf, tpm, TPM_TEST + ",vmgenid kvmlet.timeout=60")
    console = BufferConsole()
    with built_machine(config, console=console) as machine:
        machine.start()
        assert console.wait_for(b"vmgenid waiting", 60), console.output()
        machine.pause()
        assert machine.devices is not None
        vtpm = find_vtpm(machine.devices)
        values = vtpm.pcr_values(PCRS_WITH_GUEST)
        ak = vtpm.ak_public_pem()
        log = vtpm.event_log
        create_snapshot(machine, tmp_path / "vm.snap", tmp_path / "vm.mem")
    assert "TEST tpm PASS" in console.output().decode()

    events = EventLoopThread()
    restored_console = BufferConsole()
    try:
        params = SnapshotLoadParams(snapshot_path=str(tmp_path / "vm.snap"), mem_file_path=str(tmp_path / "vm.mem"))
        restored = load_snapshot(params, events, console=restored_console)
        try:
            assert restored.devices is not None
            again = find_vtpm(restored.devices)
            assert again.pcr_values(PCRS_WITH_GUEST) == values
            assert again.ak_public_pem() == ak and again.event_log == log
            restored.start()
            status = restored.wait(60)
            assert status.code == 0 and b"TEST vmgenid PASS" in restored_console.output()
            bundle = again.quote(b"after restore", PCRS_WITH_GUEST)
            result = verify_bundle(bundle, b"after restore", trusted_ak_pem=ak)
            assert result.ok, result.problems
        finally:
            restored.close()
    finally:
        events.stop()


def test_swtpm_dying_under_a_running_guest(guest_elf: Path, tpm: Tpm, caplog: pytest.LogCaptureFixture,
                                           no_leftovers: None) -> None:
    from kvmlet.devices.tpm_tis import TpmTis

    config = _config(guest_elf, tpm, "console=ttyS0 kvmlet.test=tpm,uart-rx,tpm,serial kvmlet.timeout=60")
    console = BufferConsole()
    with built_machine(config, console=console) as machine:
        machine.start()
        assert console.wait_for(b"READY uart-rx", 60), console.output()
        assert machine.devices is not None
        vtpm = find_vtpm(machine.devices)
        assert vtpm.swtpm is not None
        vtpm.swtpm.kill()
        deadline = time.monotonic() + 5
        while vtpm.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        console.feed(b"go on\n")
        status = machine.wait(60)
        output = console.output().decode(errors="replace")
        assert status.kind is StopKind.GUEST_EXIT and status.code == 1, output   # the VM ran to its end
        assert "TEST tpm PASS" in output and "TEST serial PASS" in output
        assert "TEST tpm FAIL" in output and "response code 0x101" in output      # TPM_RC_FAILURE
        tis = machine.devices.find("tpm")
        assert tis is not None and isinstance(tis.device, TpmTis)
        metrics = tis.device.stats()
        assert metrics.backend_deaths == 1 and metrics.backend_alive == 0 and metrics.failed_commands >= 1
    assert any("vTPM: swtpm" in record.message and "exited" in record.message for record in caplog.records)


def test_kvmlet_run_with_tpm_and_what_it_leaves_behind(tmp_path: Path, no_leftovers: None) -> None:
    """`kvmlet run --tpm`: the guest passes; SIGTERM removes the run directory; SIGKILL still ends swtpm
    (its data channel closes with the process) and the next kvmlet removes the stale run directory."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    command = [sys.executable, "-m", "kvmlet", "run", "--tpm", "--console", "none"]
    done = subprocess.run([*command, "--cmdline", TPM_TEST, "--console", "file:" + str(tmp_path / "out")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stderr, (tmp_path / "out").read_text())
    assert "TEST tpm PASS" in (tmp_path / "out").read_text()
    assert not list(tmp_path.glob("kvmlet-vtpm-*"))

    for sig in (signal.SIGTERM, signal.SIGKILL):
        process = subprocess.Popen([*command, "--cmdline", "console=ttyS0 kvmlet.test=vmgenid kvmlet.timeout=120"],
                                   env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            swtpm: list[int] = []
            while not swtpm and time.monotonic() < deadline:
                swtpm = [int(p) for p in subprocess.run(["pgrep", "-P", str(process.pid), "-x", "swtpm"],
                                                        capture_output=True, text=True).stdout.split()]
                time.sleep(0.05)
            assert swtpm, "kvmlet started no swtpm"
            time.sleep(0.3)
            process.send_signal(sig)
            process.wait(30)
            assert _gone(swtpm[0]), f"swtpm outlived kvmlet ({sig.name})"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        leftovers = list(tmp_path.glob("kvmlet-vtpm-*"))
        assert leftovers == [] if sig is signal.SIGTERM else len(leftovers) == 1, (sig.name, leftovers)
    from kvmlet.tpm.vtpm import remove_stale_run_dirs

    remove_stale_run_dirs(tmp_path)
    assert not list(tmp_path.glob("kvmlet-vtpm-*"))


def test_the_api_configures_the_vtpm_and_quotes(guest_elf: Path, tpm: Tpm, no_leftovers: None) -> None:
    from kvmlet.api.controller import Vmm
    from kvmlet.api.metrics import collect
    from kvmlet.errors import StateError

    events = EventLoopThread()
    vmm = Vmm(events, config=vm_config(guest_elf, cmdline="console=ttyS0 kvmlet.test=vmgenid kvmlet.timeout=60",
                                       console="none"))
    try:
        vmm.put_tpm(tpm)
        with pytest.raises(StateError):
            vmm.last_tpm_quote()
        vmm.instance_start()
        with pytest.raises(StateError):
            vmm.put_tpm(Tpm())
        vmm.tpm_quote("00ff", None)
        bundle = vmm.last_tpm_quote()
        assert verify_bundle(bundle, b"\x00\xff").ok
        metrics = collect(vmm)["tpm"]
        assert metrics["backend_alive"] == 1 and metrics["launch_ms"] > 0
    finally:
        vmm.close()
        events.stop()


def test_quotes_over_http_and_the_vtpm_migrates_with_the_vm(guest_elf: Path, tpm: Tpm, tmp_path: Path) -> None:
    """`kvmlet serve` with PUT /tpm; the guest extends PCR 23, then computes at CPL3; the VM migrates to a
    `kvmlet serve --migrate-listen` over a Unix socket; the destination's quote shows the same PCRs (PCR 23
    included), signed by the same AK, with the same event log; the source's swtpm ends with the source."""
    from tests.support.apiclient import ApiServer, guest_boot_source

    stream = tmp_path / "migration.sock"
    for side in ("source", "destination"):
        (tmp_path / side).mkdir()
    source = ApiServer(tmp_path / "source")
    destination = ApiServer(tmp_path / "destination", "--migrate-listen", f"unix:{stream}")
    try:
        assert source.call("PUT", "/boot-source", guest_boot_source(
            guest_elf, "tpm,cpl3", "kvmlet.loops=400000000000"))[0] == 204
        assert source.call("PUT", "/tpm", msgspec.to_builtins(tpm))[0] == 204
        assert source.call("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        source.wait_console("TEST tpm PASS", 60)
        assert source.call("PUT", "/tpm/quote", {"nonce": "0a0b", "pcrs": list(PCRS_WITH_GUEST)})[0] == 204
        status, before = source.call("GET", "/tpm/quote")
        assert status == 200 and verify_bundle(before, b"\x0a\x0b").ok
        swtpm = [int(p) for p in subprocess.run(["pgrep", "-P", str(source.process.pid), "-x", "swtpm"],
                                                capture_output=True, text=True).stdout.split()]
        assert len(swtpm) == 1
        assert source.call("PUT", "/migration/send", {"destination": f"unix:{stream}"})[0] == 204
        deadline = time.monotonic() + 60
        while (state := source.call("GET", "/migration")[1]["state"]) not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert state == "completed", source.call("GET", "/migration")[1]
        reply = destination.call("PUT", "/tpm/quote", {"nonce": "0c0d", "pcrs": list(PCRS_WITH_GUEST)})
        assert reply[0] == 204, reply
        status, after = destination.call("GET", "/tpm/quote")
        assert status == 200, after
        result = verify_bundle(after, b"\x0c\x0d", trusted_ak_pem=before["ak_public"].encode())
        assert result.ok, result.problems
        assert after["pcrs"] == before["pcrs"] and after["event_log"] == before["event_log"]
        source.stop()     # the source keeps its ended VM (and vTPM) until it closes it
        assert _gone(swtpm[0]), "the source's swtpm outlived its server"
    finally:
        source.stop()
        destination.stop()


def test_the_attest_commands_from_keys_to_a_verified_quote(stable_guest: Path, tpm: Tpm, tmp_path: Path) -> None:
    """keygen, measure (the flags of `kvmlet run`), sign, quote (through a `kvmlet serve` API socket),
    verify with the policy and tpm2_checkquote; a wrong nonce is rejected with the reason."""
    from tests.support.apiclient import ApiServer, guest_boot_source

    def attest(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvmlet", "attest", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    cmdline = "console=ttyS0 kvmlet.test=tpm,vmgenid kvmlet.timeout=60"
    assert attest("keygen", "--out", str(tmp_path / "owner")).returncode == 0
    measured = attest("measure", "--kernel", str(stable_guest), "--cmdline", cmdline, "--name", "cli")
    assert measured.returncode == 0, measured.stderr
    (tmp_path / "body.json").write_text(measured.stdout)
    assert set(json.loads(measured.stdout)["allow"]) == {"kvmlet", "config", "kernel", "cmdline"}
    signed = attest("sign", str(tmp_path / "body.json"), "--key", str(tmp_path / "owner.key"),
                    "--out", str(tmp_path / "cli.policy"))
    assert signed.returncode == 0, signed.stderr
    (tmp_path / "server").mkdir()
    server = ApiServer(tmp_path / "server")
    try:
        assert server.call("PUT", "/boot-source", guest_boot_source(stable_guest, "tpm,vmgenid",
                                                                    "kvmlet.timeout=60"))[0] == 204
        body = dict(msgspec.to_builtins(tpm), policy=str(tmp_path / "cli.policy"),
                    policy_key=str(tmp_path / "owner.pub"))
        assert server.call("PUT", "/tpm", body)[0] == 204
        assert server.call("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204, server.log.read_text()
        server.wait_console("TEST tpm PASS", 60)
        quote = attest("quote", "--api-sock", str(server.socket), "--nonce", "c0ffee", "--pcrs", "1,4,8,9,17,18,23",
                       "--out", str(tmp_path / "quote.json"))
        assert quote.returncode == 0, quote.stderr
    finally:
        server.stop()
    policy_args = ("--policy", str(tmp_path / "cli.policy"), "--policy-key", str(tmp_path / "owner.pub"))
    verified = attest("verify", str(tmp_path / "quote.json"), "--nonce", "c0ffee", *policy_args, "--checkquote")
    assert verified.returncode == 0 and "OK: quote verified" in verified.stdout, verified.stdout + verified.stderr
    assert "PCR 23 (not in the event log)" in verified.stdout
    replayed = attest("verify", str(tmp_path / "quote.json"), "--nonce", "c0ffef", *policy_args, "--checkquote")
    assert replayed.returncode == 1
    assert "REJECTED: nonce mismatch" in replayed.stdout and "tpm2_checkquote rejected" in replayed.stdout
