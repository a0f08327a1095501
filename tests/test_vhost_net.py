"""vhost-net (the kernel's data path for a TAP): ioctl numbers and structures against <linux/vhost.h>, the device's
set-up sequence against a recording stand-in for /dev/vhost-net, the configuration, the error on a host without
/dev/vhost-net, and (where the host has it) the test guest's echo through it.

The development and CI hosts have no /dev/vhost-net (docs/vhost-net.md): there the VM test skips, naming it, and
everything else runs. The C program below is compiled against the kernel's header, so the ioctl numbers and
structure layouts are checked against the header itself, not against the same Python arithmetic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from kvmlet.config import NetworkInterface, decode
from kvmlet.config.specs import parse_net
from kvmlet.devices.virtio.constants import VIRTIO_F_VERSION_1, feature_bit
from kvmlet.devices.virtio.net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
)
from kvmlet.devices.virtio.queue import Virtqueue
from kvmlet.devices.virtio.vhost_device import VhostNetDevice
from kvmlet.devices.virtio.vhost_kernel_net import VhostKernelNet, open_vhost_net
from kvmlet.devices.virtio.vhost_user_net import VhostUserNet
from kvmlet.errors import ConfigError, UnsupportedError
from kvmlet.memory import GuestMemory, MiB
from kvmlet.net.tap import Offload, Tap
from kvmlet.vhost import common, kernel
from kvmlet.vhost.common import VRING_STATE, MemoryRegionSpec, VringAddresses
from kvmlet.vhost.kernel import U64, VRING_FILE, VhostKernelError, VhostNetFd
from tests.support.netlab import PeerNetwork, peer_network
from tests.support.vmrun import run_vm

HAS_VHOST_NET = os.path.exists(kernel.VHOST_NET_DEVICE)
NO_VHOST_NET = "no /dev/vhost-net on this host (vhost_net module not loaded/available)"
CAN_TAP = os.geteuid() == 0 and os.path.exists("/dev/net/tun")

# -- the kernel header, through a C compiler ---------------------------------------------------------------------
_CONSTANTS = ("VHOST_GET_FEATURES", "VHOST_SET_FEATURES", "VHOST_SET_OWNER", "VHOST_RESET_OWNER",
              "VHOST_SET_MEM_TABLE", "VHOST_SET_LOG_BASE", "VHOST_SET_LOG_FD", "VHOST_SET_VRING_NUM",
              "VHOST_SET_VRING_ADDR", "VHOST_SET_VRING_BASE", "VHOST_GET_VRING_BASE", "VHOST_SET_VRING_KICK",
              "VHOST_SET_VRING_CALL", "VHOST_SET_VRING_ERR", "VHOST_SET_BACKEND_FEATURES",
              "VHOST_GET_BACKEND_FEATURES", "VHOST_NET_SET_BACKEND", "VHOST_VIRTIO", "VHOST_FILE_UNBIND",
              "VHOST_F_LOG_ALL", "VHOST_NET_F_VIRTIO_NET_HDR")

_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <linux/vhost.h>

static void hex(const char *name, const void *data, size_t size)
{
    const unsigned char *bytes = data;
    printf("%s ", name);
    for (size_t i = 0; i < size; i++)
        printf("%02x", bytes[i]);
    printf("\n");
}

int main(void)
{
%CONSTANTS%
    printf("sizeof_vring_state %zu\n", sizeof(struct vhost_vring_state));
    printf("sizeof_vring_addr %zu\n", sizeof(struct vhost_vring_addr));
    printf("sizeof_vring_file %zu\n", sizeof(struct vhost_vring_file));
    printf("sizeof_memory %zu\n", sizeof(struct vhost_memory));
    printf("sizeof_memory_region %zu\n", sizeof(struct vhost_memory_region));

    struct vhost_vring_addr addr;
    memset(&addr, 0, sizeof(addr));
    addr.index = 1;
    addr.desc_user_addr = 0x7f0000001000ULL;
    addr.used_user_addr = 0x7f0000002000ULL;
    addr.avail_user_addr = 0x7f0000003000ULL;
    hex("vring_addr", &addr, sizeof(addr));

    size_t size = sizeof(struct vhost_memory) + 2 * sizeof(struct vhost_memory_region);
    struct vhost_memory *memory = calloc(1, size);
    memory->nregions = 2;
    memory->regions[0].guest_phys_addr = 0;
    memory->regions[0].memory_size = 0xc0000000ULL;
    memory->regions[0].userspace_addr = 0x7f1000000000ULL;
    memory->regions[1].guest_phys_addr = 0x100000000ULL;
    memory->regions[1].memory_size = 0x40000000ULL;
    memory->regions[1].userspace_addr = 0x7f10c0000000ULL;
    hex("memory", memory, size);

    struct vhost_vring_file file = { .index = 1, .fd = -1 };
    hex("vring_file_unbind", &file, sizeof(file));
    struct vhost_vring_state state = { .index = 3, .num = 256 };
    hex("vring_state", &state, sizeof(state));
    return 0;
}
"""


@pytest.fixture(scope="module")
def header() -> dict[str, str]:
    """What a C program built against <linux/vhost.h> prints: the constants, sizes and packed structures."""
    gcc = shutil.which("gcc")
    if gcc is None or not Path("/usr/include/linux/vhost.h").exists():
        pytest.skip("gcc and linux-libc-dev (<linux/vhost.h>) are needed to check against the kernel header")
    constants = "\n".join(f'    printf("{name} %lld\\n", (long long)({name}));' for name in _CONSTANTS)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvmlet-vhost-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        source = work / "vhost_constants.c"
        source.write_text(_PROGRAM.replace("%CONSTANTS%", constants))
        subprocess.run([gcc, "-std=c11", "-Wall", "-Werror", "-o", str(work / "vhost_constants"), str(source)],
                       check=True, capture_output=True, text=True, timeout=60)
        output = subprocess.run([str(work / "vhost_constants")], check=True, capture_output=True, text=True,
                                timeout=10).stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dict(line.split(" ", 1) for line in output.splitlines())


@pytest.mark.parametrize("name", [name for name in _CONSTANTS if name.startswith("VHOST_")
                                  and name not in ("VHOST_F_LOG_ALL", "VHOST_NET_F_VIRTIO_NET_HDR")])
def test_ioctl_numbers_are_the_headers(header: dict[str, str], name: str) -> None:
    assert getattr(kernel, name) == int(header[name])


def test_feature_bits_are_the_headers(header: dict[str, str]) -> None:

    assert int(header["VHOST_F_LOG_ALL"]) == common.VHOST_F_LOG_ALL
    assert int(header["VHOST_NET_F_VIRTIO_NET_HDR"]) == common.VHOST_NET_F_VIRTIO_NET_HDR


def test_structure_sizes_are_the_headers(header: dict[str, str]) -> None:
    assert VRING_STATE.size == int(header["sizeof_vring_state"])
    assert common.VRING_ADDR.size == int(header["sizeof_vring_addr"])
    assert VRING_FILE.size == int(header["sizeof_vring_file"])
    assert kernel.MEMORY_HEADER.size == int(header["sizeof_memory"])
    assert kernel.MEMORY_REGION.size == int(header["sizeof_memory_region"])


def test_packed_structures_are_the_c_compilers(header: dict[str, str]) -> None:
    addresses = VringAddresses(descriptor=0x7f0000001000, used=0x7f0000002000, available=0x7f0000003000)
    assert kernel.pack_vring_addr(1, addresses).hex() == header["vring_addr"]
    regions = [MemoryRegionSpec(0, 0xC0000000, 0x7F1000000000, fd=5, fd_offset=0),
               MemoryRegionSpec(0x100000000, 0x40000000, 0x7F10C0000000, fd=5, fd_offset=0xC0000000)]
    assert kernel.pack_memory_table(regions).hex() == header["memory"]   # the fd and its offset are not sent
    assert VRING_FILE.pack(1, kernel.VHOST_FILE_UNBIND).hex() == header["vring_file_unbind"]
    assert VRING_STATE.pack(3, 256).hex() == header["vring_state"]


def test_a_memory_table_must_have_one_to_64_regions() -> None:
    with pytest.raises(VhostKernelError, match="0 memory regions"):
        kernel.pack_memory_table([])


# -- the device against a recording /dev/vhost-net ------------------------------------------------------------
KERNEL_FEATURES = (feature_bit(VIRTIO_F_VERSION_1) | feature_bit(VIRTIO_NET_F_MRG_RXBUF) | feature_bit(28)
                   | feature_bit(29) | feature_bit(26) | feature_bit(27))   # + INDIRECT, EVENT_IDX, LOG_ALL, HDR


class RecordingVhostNet(VhostNetFd):
    """/dev/vhost-net as the device sees it: every ioctl recorded (number, bytes) and answered."""

    def __init__(self) -> None:
        super().__init__(-1, "/dev/vhost-net (recording)")
        self.calls: list[tuple[int, bytes]] = []
        self.features = KERNEL_FEATURES

    def _ioctl(self, request: int, argument: int | bytes | bytearray) -> bytes | int:
        data = bytes(argument) if not isinstance(argument, int) else b""
        self.calls.append((request, data))
        if request == kernel.VHOST_GET_FEATURES:
            return U64.pack(KERNEL_FEATURES)
        if request == kernel.VHOST_GET_VRING_BASE:
            return VRING_STATE.pack(VRING_STATE.unpack(data)[0], 7)
        return data or 0

    def requests(self) -> list[int]:
        return [request for request, _ in self.calls]

    def files(self, request: int) -> list[tuple[int, int]]:
        return [VRING_FILE.unpack(data) for number, data in self.calls if number == request]


class StubLoop:
    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}

    def watch_read(self, fd: int, callback: Callable[[], None]) -> None:
        self.watched[fd] = callback

    def unwatch_read(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def call_soon(self, callback: Callable[[], None]) -> None:
        callback()

    def call_later(self, delay: float, callback: Callable[[], None]) -> None: ...


class StubIrq:
    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)


class StubHost:
    """The transport as the device sees it: one kick eventfd per queue and the irqfd's eventfd."""

    def __init__(self, queues: int) -> None:
        self.queue_eventfds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(queues)]
        self.irq = StubIrq()
        self.config_changes = 0

    def signal_config_change(self) -> None:
        self.config_changes += 1

    def close(self) -> None:
        for fd in (*self.queue_eventfds, self.irq.fd):
            os.close(fd)


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory.with_size(16 * MiB) as mem:
        yield mem


needs_tap = pytest.mark.skipif(not CAN_TAP, reason="TAP devices need root and /dev/net/tun")


def _ready_queues(memory: GuestMemory, count: int) -> list[Virtqueue]:
    queues = []
    for index in range(count):
        queue = Virtqueue(memory, index, 256)
        queue.desc_addr, queue.driver_addr, queue.device_addr = (0x10000 * (index + 1), 0x10000 * (index + 1) + 0x1000,
                                                                 0x10000 * (index + 1) + 0x2000)
        queue.ready = True
        queues.append(queue)
    return queues


@needs_tap
def test_the_kernel_device_hands_each_pair_to_its_own_vhost_net_with_its_tap_queue(memory: GuestMemory) -> None:
    tap = Tap.open("auto", 2)
    channels = [RecordingVhostNet(), RecordingVhostNet()]
    device = VhostKernelNet(tap, channels, b"\x02\0\0\0\0\1", memory, StubLoop(), name="net:vh")  # type: ignore[arg-type]
    host = StubHost(5)
    try:
        assert isinstance(device, VhostNetDevice) and device.external_queues == frozenset(range(4))
        offered = device.device_features()
        # ring features from the kernel (less the vhost-only bits), offloads from the TAP, MAC/STATUS/MQ kvmlet's
        assert offered & feature_bit(VIRTIO_F_VERSION_1) and offered & feature_bit(VIRTIO_NET_F_MRG_RXBUF)
        assert offered & feature_bit(VIRTIO_NET_F_GUEST_TSO4) and offered & feature_bit(VIRTIO_NET_F_MAC)
        assert not offered & (feature_bit(26) | feature_bit(27))
        accepted = (feature_bit(VIRTIO_F_VERSION_1) | feature_bit(VIRTIO_NET_F_MRG_RXBUF)
                    | feature_bit(VIRTIO_NET_F_MAC) | feature_bit(VIRTIO_NET_F_STATUS) | feature_bit(VIRTIO_NET_F_CSUM)
                    | feature_bit(VIRTIO_NET_F_GUEST_CSUM) | feature_bit(VIRTIO_NET_F_GUEST_TSO4) | feature_bit(17)
                    | feature_bit(22))
        device.activate(host, _ready_queues(memory, 5), accepted)   # type: ignore[arg-type]
        for pair, channel in enumerate(channels):
            requests = channel.requests()
            assert requests[:2] == [kernel.VHOST_SET_FEATURES, kernel.VHOST_SET_MEM_TABLE]
            told = U64.unpack(channel.calls[0][1])[0]
            assert told == feature_bit(VIRTIO_F_VERSION_1) | feature_bit(VIRTIO_NET_F_MRG_RXBUF)   # only its own
            assert requests[2:7] == [kernel.VHOST_SET_VRING_NUM, kernel.VHOST_SET_VRING_BASE,
                                     kernel.VHOST_SET_VRING_ADDR, kernel.VHOST_SET_VRING_KICK,
                                     kernel.VHOST_SET_VRING_CALL]
            assert channel.files(kernel.VHOST_SET_VRING_KICK) == [(0, host.queue_eventfds[2 * pair]),
                                                                  (1, host.queue_eventfds[2 * pair + 1])]
            assert channel.files(kernel.VHOST_SET_VRING_CALL) == [(0, host.irq.fd), (1, host.irq.fd)]
            assert channel.files(kernel.VHOST_NET_SET_BACKEND) == [(0, tap.fds[pair]), (1, tap.fds[pair])]
            assert len(channel.files(kernel.VHOST_SET_VRING_ERR)) == 2
            _, _, desc, used, avail, _ = common.VRING_ADDR.unpack(
                next(data for number, data in channel.calls if number == kernel.VHOST_SET_VRING_ADDR))
            assert (desc, avail, used) == (memory.host_address(0x10000 * (2 * pair + 1)),
                                           memory.host_address(0x10000 * (2 * pair + 1) + 0x1000),
                                           memory.host_address(0x10000 * (2 * pair + 1) + 0x2000))
        assert device.offload == Offload.CSUM | Offload.TSO4          # the receive offloads the driver took
        assert tap.attached == [True, False]                           # pair 1 waits for VIRTIO_NET_CTRL_MQ
        assert device.external_interrupt_status == 1 and device.stats.rings_started == 4
        for channel in channels:
            channel.calls.clear()
        device.reset()
        for channel in channels:   # detach the TAP queue first, then stop the ring
            assert channel.requests() == [kernel.VHOST_NET_SET_BACKEND, kernel.VHOST_GET_VRING_BASE] * 2
            assert channel.files(kernel.VHOST_NET_SET_BACKEND) == [(0, -1), (1, -1)]
        assert device.offload == Offload.NONE
    finally:
        device.close()
        host.close()
    assert tap.fds == [] and all(channel.fd == -1 for channel in channels)


@needs_tap
def test_a_ring_error_from_the_kernel_is_counted(memory: GuestMemory) -> None:
    loop = StubLoop()
    device = VhostKernelNet(Tap.open("auto", 1), [RecordingVhostNet()], b"\x02\0\0\0\0\1", memory,
                            loop)  # type: ignore[arg-type]
    try:
        [(fd, callback)] = loop.watched.items()
        os.eventfd_write(fd, 1)
        callback()
        assert device.stats.ring_errors == 1 and "ring error" in device.stats.last_error
    finally:
        device.close()


@needs_tap
def test_snapshots_are_refused_naming_vhost_net(memory: GuestMemory) -> None:
    device = VhostKernelNet(Tap.open("auto", 1), [RecordingVhostNet()], b"\x02\0\0\0\0\1", memory, StubLoop(),
                            name="net:fast")  # type: ignore[arg-type]
    try:
        with pytest.raises(UnsupportedError, match=r"net:fast cannot be saved: .*kernel's vhost-net .*dirty logging"):
            device.save_state()
    finally:
        device.close()


def test_vhost_user_and_vhost_net_are_one_device_model() -> None:
    assert issubclass(VhostUserNet, VhostNetDevice) and issubclass(VhostKernelNet, VhostNetDevice)
    assert VhostUserNet._control is VhostKernelNet._control is VhostNetDevice._control
    assert VhostUserNet._start_rings is VhostKernelNet._start_rings


# -- a host without /dev/vhost-net ----------------------------------------------------------------------------
def test_a_missing_device_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "vhost-net")
    with pytest.raises(VhostKernelError) as raised:
        open_vhost_net(2, missing)
    message = str(raised.value)
    assert message.startswith(f"vhost-net (vhost=on) needs {missing}, which this host does not have")
    assert "modprobe vhost_net" in message and "\n" not in message


@pytest.mark.skipif(HAS_VHOST_NET, reason="this host has /dev/vhost-net: the missing-device error cannot happen")
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")
def test_kvmlet_run_with_vhost_on_and_no_device_fails_naming_it_and_does_not_fall_back(guest_elf: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kvmlet", "run", "--kernel", str(guest_elf), "--timeout", "20",
                             "--net", "tap=auto,vhost=on"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == ["kvmlet: network interface 'net0': vhost-net (vhost=on) needs /dev/vhost-net, which this host "
                     "does not have (the vhost_net module is not loaded or not available: 'modprobe vhost_net'); "
                     "leave vhost off to use kvmlet's own TAP data path"], result.stderr


# -- configuration ----------------------------------------------------------------------------------------------
def test_the_cli_spec() -> None:
    net = parse_net("tap=tap0,vhost=on,queues=2", 0)
    assert net.vhost_net and net.host_dev_name == "tap0" and net.queues == 2 and net.vhost_user_socket is None
    assert parse_net("tap0,vhost=off", 1).vhost_net is False
    assert parse_net("tap=auto", 1).vhost_net is False                  # the default: kvmlet's own TAP path
    assert parse_net("tap=auto,vhost=on,bridge=br0,address=10.0.0.1/24", 1).bridge == "br0"   # the TAP's host side
    with pytest.raises(ConfigError, match="vhost='maybe': use on or off"):
        parse_net("tap=auto,vhost=maybe", 0)
    with pytest.raises(ConfigError, match="vhost=on is the kernel's data path for a TAP"):
        parse_net("vhost-user=/run/x.sock,vhost=on", 0)
    with pytest.raises(ConfigError, match="rx_rate_limiter needs kvmlet's own TAP data path"):
        parse_net("tap=auto,vhost=on,rx-bps=1M", 0)
    with pytest.raises(ConfigError, match="vhost-net interface needs transport mmio"):
        parse_net("tap=auto,vhost=on,transport=pci", 0)


def test_the_config_file_and_api_field() -> None:
    net = decode(b'{"iface_id": "eth0", "host_dev_name": "tap3", "vhost_net": true}', NetworkInterface)
    assert net.vhost_net and net.host_dev_name == "tap3"
    net.validate()
    assert decode(b'{"iface_id": "eth0"}', NetworkInterface).vhost_net is False
    assert msgspec.json.decode(msgspec.json.encode(net))["vhost_net"] is True
    with pytest.raises(ConfigError, match="exclude each other"):
        NetworkInterface(iface_id="n", vhost_net=True, vhost_user_socket="/run/x.sock").validate()


def test_the_openapi_document_describes_the_field() -> None:
    import json

    document = json.loads((Path(__file__).parent.parent / "kvmlet/api/openapi.json").read_text())
    field = document["components"]["schemas"]["NetworkInterface"]["properties"]["vhost_net"]
    assert field["type"] == "boolean" and field["default"] is False and "/dev/vhost-net" in field["description"]


# -- the test guest's echo over vhost-net ---------------------------------------------------------------------------
@pytest.fixture
def peer() -> Iterator[PeerNetwork]:
    with peer_network(udp_port=7777) as net:
        yield net


@pytest.mark.skipif(not HAS_VHOST_NET, reason=NO_VHOST_NET)
@pytest.mark.skipif(not CAN_TAP, reason="TAP devices and network namespaces need root and /dev/net/tun")
@pytest.mark.parametrize("queues", [1, 2])
def test_guest_udp_echo_over_vhost_net(guest_elf: Path, peer: PeerNetwork, queues: int) -> None:
    cmdline = (f"console=ttyS0 kvmlet.test=virtio-net,serial kvmlet.net_ip={peer.guest_ip} "
               f"kvmlet.net_peer={peer.peer_ip} kvmlet.net_port={peer.udp_port} kvmlet.net_queues={queues} "
               "kvmlet.timeout=10")
    net = NetworkInterface(iface_id="net0", host_dev_name="auto", queues=queues, bridge=peer.bridge, vhost_net=True)
    vm = run_vm(guest_elf, cmdline, nets=[net], timeout=60)
    assert vm.passed("virtio-net") and vm.passed("serial"), vm.output
    assert f"NET queues={queues}" in vm.output
    [device] = vm.devices
    assert isinstance(device, VhostKernelNet)
    assert device.stats.rings_started >= 2 and device.stats.ring_errors == 0, device.stats
