#!/usr/bin/env bash
# Set up kvmlet on a fresh Debian 12 machine: Debian packages, the Python package with its
# development tools, the test guest, and the Debian cloud kernel the boot-protocol tests use.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

DEBIAN_PACKAGES=(build-essential make gcc binutils linux-libc-dev qemu-system-x86 iproute2 dpkg lz4)
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
$PYTHON -m pip install -q --disable-pip-version-check -e '.[dev,bench]' --config-settings editable_mode=compat

echo "setup: building the test guest"
make -s -C guest

echo "setup: fetching the Debian cloud kernel (boot-protocol reference, cached outside the repo)"
$PYTHON -m tests.support.debian_kernel

if [ ! -w /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing or not writable by $(id -un); VMs cannot run" >&2
fi
echo "setup: done. Run 'kvmlet run' to boot the built-in guest, 'make test' to run the tests."
