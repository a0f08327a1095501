"""The migration stream, page transfer, the CPU gate and auto-converge, without VMs (tests/test_migration.py
migrates real ones between network namespaces)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kvmlet.config import decode
from kvmlet.errors import ConfigError
from kvmlet.memory import PAGE_SIZE, GuestMemory, MiB
from kvmlet.migration.pages import FRAME_DATA, SAME, ZERO, PageSender, apply_pages, memory_digest
from kvmlet.migration.params import Address, MigrationSendParams, parse_address
from kvmlet.migration.source import AutoConverge, Throttler, switchover_due
from kvmlet.migration.stream import (
    HEADER,
    PREAMBLE,
    Channel,
    Complete,
    CpuOffer,
    Error,
    Hello,
    Pages,
    Refuse,
    StreamError,
)

CPU_DATA = Path(__file__).parent / "data" / "cpu"


# -- addresses and parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.2:4444", Address("tcp", "10.0.0.2", 4444)),
    ("tcp:host.example:1", Address("tcp", "host.example", 1)),
    ("tcp:[fd00::2]:65535", Address("tcp", "fd00::2", 65535)),
    ("unix:/run/kvmlet/mig.sock", Address("unix", path="/run/kvmlet/mig.sock")),
])
def test_addresses_parse(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize(("text", "words"), [
    ("host", "expected tcp:HOST:PORT"), ("host:0", "port must be 1 to 65535"), ("host:x", "not a number"),
    (":4444", "no host"), ("fd00::2:4444", "brackets"), ("unix:", "path"), ("unix:" + "x" * 200, "at most"),
    ("a b:1", "not a host"),
])
def test_bad_addresses_are_refused_in_one_line(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_address(text)


def test_a_listening_address_may_leave_host_and_port_to_the_kernel() -> None:
    assert parse_address(":0", listening=True) == Address("tcp", "", 0)


def test_send_parameters_are_checked(tmp_path: Path) -> None:
    params = decode(b'{"destination": "unix:/x"}', MigrationSendParams)
    assert (params.downtime_limit_ms, params.max_rounds, params.auto_converge, params.timeout_s) == (50, 30, True, 10)
    with pytest.raises(ConfigError, match="downtime_limit_ms"):
        decode(b'{"destination": "unix:/x", "downtime_limit_ms": 0}', MigrationSendParams)
    with pytest.raises(ConfigError, match="unknown field"):
        decode(b'{"destination": "unix:/x", "speed": 1}', MigrationSendParams)
    missing = decode(json.dumps({"destination": "h:1", "tls": {"ca_file": str(tmp_path / "none.pem")}}),
                     MigrationSendParams)
    with pytest.raises(ConfigError, match="no such file"):
        missing.validate()


# -- the stream --------------------------------------------------------------------------------------------
def _pair(timeout: float = 2.0) -> tuple[Channel, Channel, socket.socket]:
    a, b = socket.socketpair()
    return Channel(a, "source", timeout), Channel(b, "destination", timeout), b


def _hello() -> Hello:
    return Hello("0.1.0", "vm", {"machine-config": {"mem_size_mib": 16}}, [(0, 16 * MiB)],
                 CpuOffer("host", "GenuineIntel", [], {}, ["fpu"]))


def test_frames_arrive_in_order_with_their_data() -> None:
    source, destination, _ = _pair()
    source.send_preamble()
    destination.expect_preamble("source")
    source.send(_hello())
    source.send(Pages(3, [(16, 2, 0), (18, 5, ZERO)]), [b"a" * PAGE_SIZE, memoryview(b"b" * PAGE_SIZE)])
    source.send(Complete(resume=True, memory_sha256="ab"))
    hello, data = destination.receive()
    assert isinstance(hello, Hello) and hello.cpu.features == ["fpu"] and not data
    pages, data = destination.receive()
    assert pages == Pages(3, [(16, 2, 0), (18, 5, ZERO)]) and bytes(data) == b"a" * PAGE_SIZE + b"b" * PAGE_SIZE
    assert destination.receive()[0] == Complete(resume=True, memory_sha256="ab")
    assert source.bytes_sent == destination.bytes_received


@pytest.mark.parametrize(("offset", "words"), [
    (PREAMBLE.size + 5, "header does not match its checksum"),           # a length
    (PREAMBLE.size + HEADER.size + 3, "contents do not match their checksum"),   # the message
    (-100, "contents do not match their checksum"),                      # a page
])
def test_a_flipped_byte_anywhere_is_caught(offset: int, words: str) -> None:
    wire_source, wire_sink = socket.socketpair()
    source = Channel(wire_source, "source", 2)
    source.send_preamble()
    source.send(Pages(0, [(0, 4, 0)]), [os.urandom(4 * PAGE_SIZE)])
    raw = bytearray(wire_sink.recv(1 << 20))
    raw[offset] ^= 0x01
    relay_source, relay_sink = socket.socketpair()
    relay_source.sendall(raw)
    destination = Channel(relay_sink, "source", 2)
    destination.expect_preamble("source")
    with pytest.raises(StreamError, match=words):
        destination.receive()


def test_another_version_or_protocol_is_named() -> None:
    a, b = socket.socketpair()
    a.sendall(PREAMBLE.pack(b"KVMLETMG", 7, 0))
    with pytest.raises(StreamError, match="speaks migration stream version 7; this kvmlet speaks version 1"):
        Channel(b, "tcp:h:1", 2).expect_preamble("destination")
    a, b = socket.socketpair()
    a.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    with pytest.raises(StreamError, match="not a kvmlet migration destination"):
        Channel(b, "tcp:h:22", 2).expect_preamble("destination")


def test_a_closed_or_silent_peer_ends_the_stream() -> None:
    source, destination, _ = _pair(timeout=0.2)
    with pytest.raises(StreamError, match=r"stalled: nothing arrived for 0\.2 s"):
        destination.receive()
    source.close()
    with pytest.raises(StreamError, match="closed the connection"):
        destination.receive()


def test_a_reader_sees_what_the_peer_sent_while_it_was_streaming() -> None:
    source, destination, _ = _pair()
    assert not source.pending()
    destination.send(Error("frame 3 from tcp:a:1: its contents do not match their checksum"))
    assert source.pending()
    assert isinstance(source.receive()[0], Error)


# -- pages -------------------------------------------------------------------------------------------------
def _memory() -> GuestMemory:
    return GuestMemory([(0, 8 * MiB), (16 * MiB, 4 * MiB)], hugepages=False)


def test_pages_reach_the_destination_as_data_zero_and_unchanged_markers() -> None:
    source_memory, destination_memory = _memory(), _memory()
    frames: list[tuple[list[tuple[int, int, int]], int]] = []

    def emit(runs: list[tuple[int, int, int]], pieces: list[memoryview]) -> None:
        data = b"".join(pieces)
        assert len(data) <= FRAME_DATA + 256 * PAGE_SIZE
        frames.append((runs, len(data)))
        apply_pages(destination_memory, runs, memoryview(data), first_pass=first[0])

    first = [True]
    source_memory.write(0x1000, os.urandom(3 * MiB))
    source_memory.write(16 * MiB + 0x3000, b"x" * 100)
    source_memory.fill(0x2000, PAGE_SIZE, 0)             # a zero page inside data
    sender = PageSender(source_memory, emit)
    from kvmlet.snapshot.memory_file import region_data_spans

    sender.first_pass(lambda index: region_data_spans(source_memory, source_memory.regions[index]))
    total_pages = source_memory.size // PAGE_SIZE
    assert sender.counts.total == total_pages
    assert sender.counts.data * PAGE_SIZE <= 3 * MiB + PAGE_SIZE and sender.counts.same == 0
    assert memory_digest(source_memory) == memory_digest(destination_memory)

    first[0] = False
    dirty = [bytearray(region.size // PAGE_SIZE) for region in source_memory.regions]
    dirty[0][1:11] = b"\1" * 10            # pages 1-10: 5-10 rewritten with the same bytes, 1-4 changed
    dirty[1][3] = 1                        # region 2's page 3 zeroed
    sender.send_dirty(dirty)                # the first dirty round records the pages' hashes
    source_memory.write(0x1000, os.urandom(4 * PAGE_SIZE))
    source_memory.write(0x5000, source_memory.read(0x5000, 6 * PAGE_SIZE))
    source_memory.fill(16 * MiB + 0x3000, PAGE_SIZE, 0)
    before = sender.counts.same, sender.counts.zero
    frames.clear()
    sender.send_dirty(dirty)
    assert sender.counts.same - before[0] == 6
    runs = [run for frame, _ in frames for run in frame]
    assert (5, 6, SAME) in runs and ((16 * MiB + 0x3000) >> 12, 1, ZERO) in runs
    assert sum(size for _, size in frames) == 4 * PAGE_SIZE
    assert memory_digest(source_memory) == memory_digest(destination_memory)


def test_runs_outside_memory_or_data_that_does_not_add_up_are_refused() -> None:
    memory = _memory()
    with pytest.raises(ValueError, match="outside guest memory"):
        apply_pages(memory, [(9 * MiB >> 12, 1, 0)], memoryview(bytes(PAGE_SIZE)), first_pass=True)
    with pytest.raises(ValueError, match="belong to no run"):
        apply_pages(memory, [(0, 1, 0)], memoryview(bytes(2 * PAGE_SIZE)), first_pass=True)
    with pytest.raises(ValueError, match="ends inside the run"):
        apply_pages(memory, [(0, 2, 0)], memoryview(bytes(PAGE_SIZE)), first_pass=True)
    with pytest.raises(ValueError, match="not one kvmlet sends"):
        apply_pages(memory, [(0, 1, 7)], memoryview(b""), first_pass=True)


def test_the_digest_is_of_contents_not_of_how_zeros_are_stored() -> None:
    a, b = _memory(), _memory()
    b.write(0x4000, bytes(PAGE_SIZE * 3))     # allocated zeros: the same contents as a hole
    assert memory_digest(a) == memory_digest(b)
    b.write(0x4000, b"\1")
    assert memory_digest(a) != memory_digest(b)


# -- auto-converge -----------------------------------------------------------------------------------------
def test_auto_converge_follows_qemus_steps() -> None:
    policy = AutoConverge()
    seen = [policy.update(dirtied, sent) for dirtied, sent in
            [(60, 100), (60, 100), (10, 100), (60, 100), (70, 100)] + [(90, 100)] * 30]
    assert seen[:6] == [0, 20, 20, 20, 30, 30]
    assert seen[-1] == 99 and max(seen) == 99


@pytest.mark.parametrize(("expected", "pages", "previous", "rounds", "due"), [
    (80.0, 1000, 5000, 2, False),      # over the limit
    (30.0, 1000, 5000, 2, False),      # within it, but the rounds still shrink the rest: one more
    (30.0, 3000, 5000, 2, True),       # within it, and no longer halving
    (4.0, 1000, 5000, 2, True),        # under a tenth of the limit
    (500.0, 9000, 9000, 30, True),     # the round limit
])
def test_the_switchover_comes_when_another_round_would_not_help(expected: float, pages: int, previous: int,
                                                                 rounds: int, due: bool) -> None:
    assert switchover_due(expected, 50, pages, previous, rounds, 30) is due


def test_the_throttler_keeps_each_vcpu_out_of_the_guest_its_share_of_the_time() -> None:
    class Vcpu:
        def __init__(self) -> None:
            self.sleeps: list[float] = []

        def throttle(self, seconds: float) -> None:
            self.sleeps.append(seconds)

    vcpus = [Vcpu(), Vcpu()]
    throttler = Throttler(vcpus)   # type: ignore[arg-type]
    throttler.set(50)
    deadline = time.monotonic() + 5
    while min(len(v.sleeps) for v in vcpus) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    throttler.stop()
    assert throttler.pct == 0
    assert all(v.sleeps and all(sleep == pytest.approx(Throttler.TIMESLICE) for sleep in v.sleeps) for v in vcpus)


def test_dirty_maps_give_their_runs_and_merge() -> None:
    from kvmlet.migration.pages import dirty_runs, merge_dirty

    assert list(dirty_runs(bytearray(b"\1\1\0\0\1\0\1"))) == [(0, 2), (4, 1), (6, 1)]
    assert list(dirty_runs(bytearray(8))) == []
    into = [bytearray(b"\1\0\0\0"), bytearray(2)]
    merge_dirty(into, [bytearray(b"\0\0\1\1"), bytearray(b"\0\1")])
    assert into == [bytearray(b"\1\0\1\1"), bytearray(b"\0\1")]


# -- the CPU gate ------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a channel: keeps what the destination sends."""

    peer = "tcp:192.0.2.1:4444"

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any, data: Any = ()) -> int:
        self.sent.append(message)
        return 0


def _offer(capture_name: str) -> CpuOffer:
    from kvmlet.cpu.capture import load_capture
    from kvmlet.cpu.features import sorted_features

    capture = load_capture(CPU_DATA / f"{capture_name}.json")
    return CpuOffer("host", capture.vendor, list(capture.cpuid), capture.msrs or {}, sorted_features(capture.features))


@pytest.mark.parametrize(("vm", "host", "expected"), [
    ("icelake-sp-xeon-gold-6336y", "haswell-ep-xeon-e5-2699v3", "avx512f"),
    ("epyc-milan-7763", "skylake-sp-xeon-gold-6154", "vendor AuthenticAMD (destination: GenuineIntel)"),
])
def test_the_gate_refuses_a_cpu_the_host_lacks_and_names_it(vm: str, host: str, expected: str) -> None:
    from kvmlet.cpu.capture import load_capture
    from kvmlet.migration.destination import Incoming, Refused
    from kvmlet.migration.params import ListenOptions

    incoming = Incoming(ListenOptions(Address("tcp", "", 0)), events=None,  # type: ignore[arg-type]
                        on_machine=lambda machine: None)
    incoming.capture = load_capture(CPU_DATA / f"{host}.json")
    channel = _Recorder()
    hello = msgspec.structs.replace(_hello(), cpu=_offer(vm))
    with pytest.raises(Refused, match="cannot provide the VM's CPU"):
        incoming._gate(channel, hello)   # type: ignore[arg-type]
    (refusal,) = channel.sent
    assert isinstance(refusal, Refuse) and expected in refusal.missing
    assert expected.split()[0] in refusal.reason
    incoming.capture = load_capture(CPU_DATA / f"{vm}.json")      # its own host: no refusal
    incoming._gate(channel, hello)   # type: ignore[arg-type]
    assert len(channel.sent) == 1


def test_a_listener_answers_on_the_port_it_reports(tmp_path: Path) -> None:
    from kvmlet.migration.stream import Listener

    listener = Listener(parse_address("127.0.0.1:0", listening=True), None, 2)
    try:
        bound = listener.bound
        assert bound.port > 0
        done: list[Channel | None] = []
        thread = threading.Thread(target=lambda: done.append(listener.accept(5)))
        thread.start()
        client = socket.create_connection((bound.host, bound.port))
        thread.join(5)
        assert done and done[0] is not None
        client.close()
        done[0].close()
    finally:
        listener.close()
    path = tmp_path / "mig.sock"
    unix = Listener(parse_address(f"unix:{path}", listening=True), None, 2)
    unix.close()
    assert not path.exists()     # the listener removes the socket it made
