#!/usr/bin/env bash
# Set up kvmlet on a fresh Debian 12 machine: Debian packages, the Python package with its
# development tools, the test guest, and the Debian cloud kernel the boot-protocol tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

DEBIAN_PACKAGES=(build-essential make gcc binutils linux-libc-dev qemu-system-x86 iproute2 dpkg lz4
    swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config python3-dev  # the vTPM (kvmlet.tpm): tpm2-pytss builds against libtss2
    acpica-tools)  # iasl: tests/test_pci_vm.py disassembles the ACPI tables kvmlet writes
DEBIAN_PACKAGES+=(dpdk dpdk-dev)  # the vhost-user back end the tests and `kvmlet net switch` run: dpdk-testpmd
# Open vSwitch with DPDK: `kvmlet net switch`'s default engine (per-port MAC, VLAN, rate, trust) and tests/test_ovs_switch.py.
# kvmlet starts its own private ovsdb-server and /usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk as child processes; it
# never uses the system's openvswitch-switch service (nor update-alternatives), which does not start in CI's container.
DEBIAN_PACKAGES+=(openvswitch-switch-dpdk)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
echo "setup: installing kvmlet and its development tools with $($PYTHON --version)"
# compat mode: a plain path entry instead of an import hook, which costs start-up time on every run
$PYTHON -m pip install -q --disable-pip-version-check -e '.[dev,bench,tpm]' --config-settings editable_mode=compat

echo "setup: building the test guest"
make -s -C guest

echo "setup: fetching the Debian cloud kernel (boot-protocol reference, cached outside the repo)"
$PYTHON -m tests.support.debian_kernel

# ---- begin: firecracker-python client for tests/test_firecracker_client.py ----
# The third-party Firecracker client (PyPI firecracker-python) drives kvmlet-firecracker in that test. It pins
# many packages (docker, requests, paramiko, psutil, ...), so it gets its own virtual environment.
FCPY_VENV="${KVMLET_FCPY_VENV:-$HOME/.cache/kvmlet/fcpy-venv}"
FCPY_VERSION="0.0.5"
if [ ! -x "$FCPY_VENV/bin/pip" ]; then
    echo "setup: creating the firecracker-python venv at $FCPY_VENV"
    if ! $PYTHON -m venv "$FCPY_VENV" >/dev/null 2>&1; then
        # Debian's own python3 has no ensurepip without python3-venv
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
        $PYTHON -m venv "$FCPY_VENV"
    fi
fi
if ! "$FCPY_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('firecracker-python') != '$FCPY_VERSION')" 2>/dev/null; then
    echo "setup: installing firecracker-python==$FCPY_VERSION into $FCPY_VENV"
    "$FCPY_VENV/bin/python" -m pip install -q --disable-pip-version-check "firecracker-python==$FCPY_VERSION"
fi
# ---- end: firecracker-python client for tests/test_firecracker_client.py ----

if [ ! -w /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing or not writable by $(id -un); VMs cannot run" >&2
fi
echo "setup: done. Run 'kvmlet run' to boot the built-in guest, 'make test' to run the tests."
