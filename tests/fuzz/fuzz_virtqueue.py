"""Fuzz target for the virtqueue parser and the virtio-mmio transport.

``TestOneInput(data)`` lays ``data`` out as guest memory (descriptor table, rings, indirect tables) and
a sequence of register writes, then drives a transport with an entropy device and a raw queue through it.
Only kvmlet's own virtqueue errors may come out, and nothing outside the used ring may change.

Run with atheris when it is installed (``python tests/fuzz/fuzz_virtqueue.py [atheris options]``),
or without it as ``python tests/fuzz/fuzz_virtqueue.py --random N [--seed S]`` for N random inputs.
"""

from __future__ import annotations

import logging
import os
import random
import struct
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.virtio.constants import MmioRegister
from kvmlet.devices.virtio.mmio import MmioTransport
from kvmlet.devices.virtio.queue import RingError, Virtqueue
from kvmlet.devices.virtio.rng import VirtioRng
from kvmlet.memory import GuestMemory

MEMORY_SIZE = 0x20000
RING_AREA = 0x1000          # data is copied here: descriptors, rings and tables all come from it
USED_ADDR = 0x10000
_memory: GuestMemory | None = None


def _guest_memory() -> GuestMemory:
    global _memory
    if _memory is None:
        _memory = GuestMemory([(0, MEMORY_SIZE)], hugepages=False)
    return _memory


def _u(data: bytes, offset: int, size: int) -> int:
    return int.from_bytes(data[offset:offset + size].ljust(size, b"\0"), "little")


def _check_unchanged(before: bytes, after: bytes, start: int, length: int) -> None:
    if before[:start] != after[:start] or before[start + length:] != after[start + length:]:
        raise AssertionError("memory outside the used ring changed")


def run_queue(data: bytes, memory: GuestMemory) -> None:
    """The queue alone: sizes, features and ring positions from the first bytes."""
    size = 1 << (_u(data, 0, 1) % 6)
    flags = _u(data, 1, 1)
    queue = Virtqueue(memory, 0, max_size=32)
    queue.size = size
    queue.desc_addr = RING_AREA + (_u(data, 2, 2) % 0x800) * 16 % 0x4000
    queue.driver_addr = RING_AREA + (_u(data, 4, 2) & 0x3FFE)
    queue.device_addr = USED_ADDR
    queue.set_features(event_idx=bool(flags & 1), indirect=bool(flags & 2))
    try:
        queue.activate()
    except RingError:
        return
    queue.next_avail = _u(data, 6, 2)
    before = memory.read(0, MEMORY_SIZE)
    try:
        for _ in range(size + 1):
            chain = queue.pop()
            if chain is None:
                break
            queue.push(chain.head, chain.writable.length)
            queue.needs_notification()
        queue.enable_notification()
    except RingError:
        pass
    _check_unchanged(before, memory.read(0, MEMORY_SIZE), USED_ADDR, 6 + 8 * size)


def _driver_init(transport: MmioTransport, data: bytes) -> None:
    """A well-behaved driver's initialization (section 3.1.1) with ring addresses from the input."""
    write = transport.bus_write
    write(MmioRegister.STATUS, 4, 0)
    write(MmioRegister.STATUS, 4, 3)
    offered = 0
    for sel in (0, 1):
        write(MmioRegister.DEVICE_FEATURES_SEL, 4, sel)
        offered |= transport.bus_read(MmioRegister.DEVICE_FEATURES, 4) << (32 * sel)
    wanted = offered & (_u(data, 8, 8) | (1 << 32))
    for sel in (0, 1):
        write(MmioRegister.DRIVER_FEATURES_SEL, 4, sel)
        write(MmioRegister.DRIVER_FEATURES, 4, (wanted >> (32 * sel)) & 0xFFFFFFFF)
    write(MmioRegister.STATUS, 4, 3 | 8)
    write(MmioRegister.QUEUE_SEL, 4, 0)
    write(MmioRegister.QUEUE_NUM, 4, 1 << (_u(data, 0, 1) % 6))
    write(MmioRegister.QUEUE_DESC_LOW, 4, RING_AREA + (_u(data, 2, 2) & 0x3FF0))
    write(MmioRegister.QUEUE_DRIVER_LOW, 4, RING_AREA + (_u(data, 4, 2) & 0x3FFE))
    write(MmioRegister.QUEUE_DEVICE_LOW, 4, USED_ADDR)
    write(MmioRegister.QUEUE_READY, 4, 1)
    write(MmioRegister.STATUS, 4, 3 | 8 | 4)


def run_transport(data: bytes, memory: GuestMemory) -> None:
    """The MMIO transport with an entropy device: an optional proper initialization, then register
    accesses taken from the input (6 bytes each: register, value, read-or-write)."""
    transport = MmioTransport(VirtioRng(), memory, NullInterrupt())
    try:
        if _u(data, 1, 1) & 4:
            _driver_init(transport, data)
            transport.poll()
        ops = data[16:16 + 6 * 24]
        for i in range(0, len(ops) - 5, 6):
            reg = (ops[i] % 0x44) * 4
            value = _u(ops, i + 1, 4)
            if ops[i + 5] & 1:
                transport.bus_read(reg, 4 if ops[i + 5] & 2 else ops[i + 5] % 9)
            else:
                if reg in (MmioRegister.QUEUE_DESC_LOW, MmioRegister.QUEUE_DRIVER_LOW,
                           MmioRegister.QUEUE_DEVICE_LOW) and ops[i + 5] & 4:
                    value = RING_AREA + value % 0x8000
                transport.bus_write(reg, 4, value)
            transport.poll()
    finally:
        transport.close()


def TestOneInput(data: bytes) -> None:
    memory = _guest_memory()
    memory.fill(0, MEMORY_SIZE)
    memory.write(RING_AREA, data[:0xF000])
    run_queue(data, memory)
    memory.fill(0, MEMORY_SIZE)
    memory.write(RING_AREA, data[:0xF000])
    run_transport(data, memory)


def _structured_input(rng: random.Random) -> bytes:
    """A random input that often looks like real rings (so the parser gets past the first checks):
    descriptors at offset 0x100 of the ring area, an available ring at 0x800 with a small index."""
    size_log = rng.randrange(6)
    size = 1 << size_log
    out = bytearray(0x900)
    struct.pack_into("<BBHH", out, 0, size_log, rng.randrange(256), 0x100, 0x800)
    out[6:16] = rng.randbytes(10)
    for i in range(16, 160, 6):  # register accesses: mostly notifies and harmless reads
        reg = rng.choice([MmioRegister.QUEUE_NOTIFY, MmioRegister.INTERRUPT_STATUS, MmioRegister.INTERRUPT_ACK,
                          MmioRegister.STATUS, rng.randrange(0x110)]) // 4
        out[i:i + 6] = bytes([reg]) + rng.randbytes(4) + bytes([rng.randrange(256)])
    for i in range(size):
        addr = rng.choice([RING_AREA + rng.randrange(0x4000), rng.randrange(MEMORY_SIZE + 64),
                           rng.getrandbits(64), RING_AREA + 0x100 + 16 * rng.randrange(size)])
        length = rng.choice([0, 1, 16, 32, 512, 16 * rng.randrange(1, 8), rng.getrandbits(32)])
        struct.pack_into("<QIHH", out, 0x100 + 16 * i, addr, length, rng.randrange(8),
                         rng.randrange(size + 2))
    struct.pack_into("<HH", out, 0x800, rng.randrange(2), rng.randrange(size + 2))
    for i in range(size):
        struct.pack_into("<H", out, 0x804 + 2 * i, rng.randrange(size + 1))
    return bytes(out)


def run_random(count: int, seed: int | None = None) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        TestOneInput(_structured_input(rng) if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 4096)))


def main(argv: list[str]) -> int:
    logging.getLogger("kvmlet.virtio").setLevel(logging.ERROR)  # devices needing a reset are expected
    if "--random" in argv:
        index = argv.index("--random")
        count = int(argv[index + 1]) if index + 1 < len(argv) else 1000
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else None
        run_random(count, seed)
        print(f"fuzz_virtqueue: {count} random inputs, no failure")
        return 0
    try:
        import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        run_random(1000)
        print("fuzz_virtqueue: atheris is not installed; ran 1000 random inputs, no failure")
        return 0
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
