"""Drive ``kvmlet-firecracker`` with the third-party Firecracker client ``firecracker-python`` (PyPI, 0.0.5).

Run by the Python of the client's own virtual environment (the client pins many packages), so this file
imports only the standard library and the client: never kvmlet or pytest. tests/test_firecracker_client.py
runs it; by hand::

    ~/.cache/kvmlet/fcpy-venv/bin/python tests/support/fcpy_driver.py \\
        "$(command -v kvmlet-firecracker)" guest/build/kvmlet-guest.elf /tmp/fcpy 60

It creates a microVM with the test guest as its kernel through the client's public API, pauses it, resumes
it, reads its state and configuration, and deletes it (the client's stop), and prints one JSON line on
stdout: what each step returned, the states seen, the VMM's exit status, and the first error. Anything else
(the client's warnings, tracebacks) goes to standard error. Exit status 0 when every step ran.

The client assumes a host prepared for Firecracker; the patches below remove only what this test host
(no Docker daemon, no internet, no TAP or nftables set-up) cannot give, each with its reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

# The guest's checks for this run. The client's kernel command line ("console=ttyS0 reboot=k pci=off panic=1
# ip=...") names none, so the test guest would run its default checks and end at once, and with it the VMM
# process, before create() has checked that it runs. ctrlaltdel with timeout 0 waits for a keyboard
# interrupt for ever: the guest runs (and is paused and resumed) until the client stops the VMM.
GUEST_ARGS = "kvmlet.test=ctrlaltdel kvmlet.timeout=0"
GUEST_BANNER = "kvmlet-guest"
GUEST_WAITING = "ctrlaltdel: waiting"


class Report:
    """The JSON line, printed exactly once (by the main thread or by the watchdog)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {"ok": False, "steps": {}, "states": [], "error": None}
        self.step = "start"
        self.vmm_exit: int | None = None
        self._printed = threading.Lock()

    def error(self, message: str) -> None:
        if self.data["error"] is None:
            self.data["error"] = f"{self.step}: {message}"

    def emit(self) -> None:
        if self._printed.acquire(blocking=False):
            self.data["vmm_exit_status"] = self.vmm_exit
            for _ in range(10):   # the watchdog may print while the main thread still adds to the report
                try:
                    line = json.dumps(self.data, default=str)
                    break
                except RuntimeError:
                    time.sleep(0.01)
            else:
                line = json.dumps({"ok": False, "error": self.data["error"]})
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def tail(path: str, lines: int = 40) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary", help="kvmlet-firecracker (the client runs it in place of firecracker)")
    parser.add_argument("kernel", help="the test guest ELF")
    parser.add_argument("data_dir", help="the client's data directory (VM directories, sockets, logs)")
    parser.add_argument("timeout", type=float, help="seconds for the whole run")
    args = parser.parse_args()
    binary, kernel = os.path.abspath(args.binary), os.path.abspath(args.kernel)
    data_dir = os.path.abspath(args.data_dir)
    report = Report()
    report.data.update(binary=binary, kernel=kernel)

    def watchdog() -> None:
        report.error(f"timed out after {args.timeout:g} s")
        for pid in child_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        report.emit()
        os._exit(3)

    timer = threading.Timer(args.timeout, watchdog)
    timer.daemon = True
    timer.start()
    try:
        run(report, binary, kernel, data_dir)
    except Exception as exc:
        traceback.print_exc()
        report.error(f"{type(exc).__name__}: {exc}")
    finally:
        stop_leftover_vmms(report)
        timer.cancel()
        report.data["ok"] = report.data["error"] is None
        report.emit()
    return 0 if report.data["ok"] else 1


def run(report: Report, binary: str, kernel: str, data_dir: str) -> None:
    steps, states = report.data["steps"], report.data["states"]
    report.step = "data directory"
    # The client's URL is http://<quote_plus(socket path)>/..., and requests lowercases that "host": a path
    # with capitals names another file (ENOENT on connect). The socket is <data>/<8-char id>/firecracker.socket.
    if data_dir != data_dir.lower():
        raise ValueError(f"{data_dir} has capitals: the client lowercases the API socket's path")
    if len(f"{data_dir}/12345678/firecracker.socket".encode()) > 107:
        raise ValueError(f"{data_dir} is too long for the API socket's path (107 bytes at most)")
    os.makedirs(data_dir, exist_ok=True)

    # Patch: no proxy. requests takes HTTP(S)_PROXY from the environment even for the client's Unix-socket
    # URLs, and requests-unixsocket then refuses every call ("does not support specifying proxies").
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(name, None)

    report.step = "import"
    # Importing the package checks /usr/local/bin/firecracker and prints a warning (on stdout) when it is
    # missing, or creates /var/lib/firecracker when it is there: keep stdout for the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        import firecracker
        import firecracker.config
        import firecracker.microvm
        import firecracker.network
        import firecracker.process
        import firecracker.vmm
    report.data["client_version"] = getattr(firecracker, "__version__", None)

    # Patch: the binary and the data directory. MicroVMConfig is a dataclass whose defaults are the only
    # setting: binary_path="/usr/local/bin/firecracker" (PATH is not searched), data_path="/var/lib/firecracker"
    # (root-owned, shared). Every manager makes its own MicroVMConfig(), imported by name into each module,
    # so a subclass with other defaults replaces it there. The basename of the binary does not matter:
    # kvmlet-firecracker names its process "firecracker" (prctl), which is what the client looks for.
    @dataclasses.dataclass
    class Config(firecracker.config.MicroVMConfig):
        data_path: str = data_dir
        snapshot_path: str = os.path.join(data_dir, "snapshots")
        binary_path: str = binary

    for module in (firecracker.microvm, firecracker.process, firecracker.vmm, firecracker.network):
        module.MicroVMConfig = Config

    # Patch: no Docker daemon. MicroVM() calls docker.from_env() even without an image (only image= uses it).
    firecracker.microvm.docker.from_env = lambda *a, **k: None
    # Patch: no internet. MicroVM() asks ifconfig.me and others for the host's public IP (only port
    # forwarding uses it).
    firecracker.microvm.get_public_ip = lambda *a, **k: "127.0.0.1"
    # Patch: no host network set-up. create() makes a TAP device tap_<id> and nftables NAT/masquerade rules
    # (root, python3-nftables), delete() removes them: the test guest has no network, and the test must not
    # change the host's firewall.
    firecracker.network.NetworkManager.setup = lambda self, **kw: None
    firecracker.network.NetworkManager.cleanup = lambda self, tap_device: None
    # Patch: no network interface in the VM. create() always sends PUT /network-interfaces/<host's default
    # route interface> with host_dev_name tap_<id>, a TAP that no longer exists without the set-up above.
    firecracker.microvm.MicroVM._configure_vmm_network = lambda self: None

    # Patch: the guest's arguments. The client has no parameter for extra kernel arguments: its init_file
    # reaches the command line only with mmds_enabled (kvmlet has no MMDS) or overlayfs (a second drive and
    # overlay_root=/vdb). Append them to the client's own command line, which is kept as it is.
    class MicroVM(firecracker.microvm.MicroVM):
        @property
        def _boot_args(self) -> str:
            return f"{super()._boot_args} {GUEST_ARGS}"

    from firecracker import Api
    from firecracker.vmm import VMMManager

    # The client requires a root file system image (it copies it into the VM's directory and attaches it
    # as the root drive); the test guest never reads it, so an empty file does.
    rootfs = os.path.join(data_dir, "rootfs.img")
    open(rootfs, "wb").close()

    report.step = "MicroVM()"
    vm = MicroVM(name="kvmlet-fcpy", kernel_file=kernel, base_rootfs=rootfs, vcpu=1, memory=128)
    report.step = "create"
    started = time.monotonic()
    steps["create"] = vm.create()
    steps["create_s"] = round(time.monotonic() - started, 2)
    # The client's own record of the VM (config.json): its id and the VMM's pid.
    record = vm.inspect()
    vmid, pid = record["ID"], int(record["State"]["Pid"])
    report.data.update(id=vmid, pid=pid)
    threading.Thread(target=reap, args=(report, pid), daemon=True).start()
    vm_dir = os.path.join(data_dir, vmid)
    socket_path = os.path.join(vm_dir, "firecracker.socket")
    console_log = os.path.join(vm_dir, "firecracker.log")        # the VMM's stdout: the guest's serial
    vmm_log = os.path.join(vm_dir, "logs", f"{vmid}.log")          # --log-path
    vmm = VMMManager()

    report.step = "describe"
    api = Api(socket_path)
    try:
        info = api.describe.get().json()                            # GET /
        report.data["instance_info"] = info
        report.data["version"] = api.version.get().json()           # GET /version
    finally:
        api.close()
    states.append(vmm.get_vmm_state(vmid))                          # GET / state
    report.step = "list"
    report.data["listed"] = [v["id"] for v in MicroVM.list()]       # psutil: a process named firecracker

    report.step = "pause"
    steps["pause"] = vm.pause()                                     # PATCH /vm {"state": "Paused"}
    states.append(vmm.get_vmm_state(vmid))
    report.step = "resume"
    steps["resume"] = vm.resume()                                   # PATCH /vm {"state": "Resumed"}
    states.append(vmm.get_vmm_state(vmid))

    report.step = "config"
    config = vm.config()                                            # GET /vm/config
    report.data["config"] = {
        "kernel_image_path": config["boot-source"]["kernel_image_path"],
        "boot_args": config["boot-source"]["boot_args"],
        "machine": {k: config["machine-config"][k] for k in ("vcpu_count", "mem_size_mib")},
        "drives": [d["drive_id"] for d in config.get("drives", [])],
    }

    report.step = "console"
    deadline = time.monotonic() + 10
    while True:
        console = tail(console_log, 200) or ""
        if GUEST_WAITING in console or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    report.data["console"] = console[-4000:]

    report.step = "delete"
    report.data["vmm_log"] = (tail(vmm_log) or "")[-4000:]          # the directory goes with the VM
    started = time.monotonic()
    steps["delete"] = vm.delete()                                   # SIGTERM (SIGKILL after 2 s), rm -rf
    steps["delete_s"] = round(time.monotonic() - started, 2)
    for _ in range(50):                                             # the reaper thread: the exit status
        if report.vmm_exit is not None:
            break
        time.sleep(0.1)
    gone = report.vmm_exit is not None and not os.path.exists(vm_dir)
    states.append("stopped" if gone else "still there")
    report.data["listed_after"] = [v["id"] for v in MicroVM.list()]


def reap(report: Report, pid: int) -> None:
    """Wait for the VMM (this process's child): its exit status, and no zombie for the client to wait on
    (delete() polls kill(pid, 0) each second for 2 s, then SIGKILLs, so an unreaped child costs ~7 s)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return
    report.vmm_exit = os.waitstatus_to_exitcode(status)


def child_pids() -> list[int]:
    """This process's children (the VMMs the client started), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.append(int(entry))
    return children


def stop_leftover_vmms(report: Report) -> None:
    """After a failure (even one in create(), before the pid is known): no VMM this run started outlives it."""
    for pid in child_pids():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            report.error(f"process {pid} (a VMM) was still running at the end and was killed")


if __name__ == "__main__":
    sys.exit(main())
