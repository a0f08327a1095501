"""The fuzz input, read as a hostile driver's program, and the chains it builds for each kind of queue.

Every read past the end of the input gives 0, so any byte string is a valid program. Choices are made from
short lists that mix the values a correct driver uses with the edges a hostile one would try.
"""

from __future__ import annotations

import struct

from tests.fuzz.device_rig import GUEST_CID, GUEST_MAC, HOST_MAC, IMAGE_SIZE

REGIONS = ((0, 0x10000), (0x20000, 0x8000))     # guest RAM: 64 KiB, a 64 KiB hole, 32 KiB
RAM_END = 0x28000
CAPACITY = IMAGE_SIZE // 512
U32, U64 = 0xFFFFFFFF, (1 << 64) - 1
FIRST_LOCAL_PORT = 1 << 30                      # vsock's ports for host-initiated connections


class Input:
    """Bytes read as a program; past the end every read is 0 (and the case ends after that operation)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def byte(self) -> int:
        if self.pos < len(self.data):
            self.pos += 1
            return self.data[self.pos - 1]
        return 0

    def int(self, size: int) -> int:
        raw = self.data[self.pos:self.pos + size]
        self.pos += size
        return int.from_bytes(raw.ljust(size, b"\0"), "little")

    def take(self, size: int) -> bytes:
        raw = self.data[self.pos:self.pos + size]
        self.pos += size
        return raw.ljust(size, b"\0")

    def below(self, n: int) -> int:
        return self.byte() % n if n <= 256 else self.int(4) % n

    def pick(self, choices: tuple[int, ...] | list[int]) -> int:
        return choices[self.below(len(choices))]

    def chance(self, per256: int) -> bool:
        return self.byte() < per256


Part = tuple[bytes, int, bool]   # (content for a readable buffer, length, device-writable)


def hostile_address(inp: Input) -> int:
    return inp.pick([0x10000, 0x10000 - 1, 0x10000 - 8, 0x18000, RAM_END, RAM_END - 1, RAM_END - 4, 0xFFFFFFFF,
                     1 << 32, U64, U64 - 15, 1 << 63, inp.int(8), inp.int(4), 0x20000 - 16, inp.below(RAM_END)])


def hostile_length(inp: Input) -> int:
    return inp.pick([0, 1, 15, 17, U32, 0x80000000, 0x10000, 0x20000, inp.int(4), inp.int(2)])


def parts_for(inp: Input, role: str, connections: list[tuple[int, int]]) -> list[Part]:
    """A chain's buffers for a queue of ``role`` (rng, blk, vsock_rx/tx/event, net_rx/tx/ctrl)."""
    if role.isdigit():
        role = ("rng", "blk", "vsock_rx", "vsock_tx", "vsock_event", "net_rx", "net_tx", "net_ctrl",
                "blk")[int(role)]
    if role == "rng":
        parts = [(b"", inp.pick([1, 8, 64, 512, 4096, 3]), True) for _ in range(inp.pick([1, 1, 1, 2, 3]))]
        if inp.chance(25):
            parts.insert(0, (b"\x01" * 16, 16, False))
        return parts
    if role == "blk":
        return blk_request(inp)
    if role == "vsock_tx":
        return vsock_packet(inp, connections)
    if role in ("vsock_rx", "net_rx"):
        sizes = [44, 108, 4140, 10, 200, 45] if role == "vsock_rx" else [12, 64, 1526, 4096, 100, 11, 2048]
        return [(b"", inp.pick(sizes), True) for _ in range(inp.pick([1, 1, 1, 2]))]
    if role == "vsock_event":
        return [(b"", inp.pick([8, 4, 64]), True)]
    if role == "net_tx":
        return net_frame(inp)
    if inp.chance(128):   # VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET with a pair count the device has
        command = bytes([4, 0]) + struct.pack("<H", inp.pick([1, 2]))
    else:
        command = bytes([inp.pick([4, 4, 4, 0, 1, 2, 5, 255]), inp.pick([0, 0, 0, 1, 2, 255])])
        command += struct.pack("<H", inp.pick([1, 2, 0, 3, inp.int(2)]))[: inp.pick([2, 2, 2, 1, 0])]
    parts: list[Part] = [(command, len(command), False)]
    if inp.chance(230):
        parts.append((b"", inp.pick([1, 1, 1, 4]), True))
    return parts


def blk_request(inp: Input) -> list[Part]:
    kind = inp.pick([0, 0, 0, 0, 1, 1, 1, 1, 4, 8, 11, 13, 10, 14, inp.int(4)])
    sector = inp.pick([0, 1, 7, CAPACITY - 1, CAPACITY - 8, CAPACITY, CAPACITY + 1, 1 << 63, U64,
                       inp.below(CAPACITY), inp.below(CAPACITY), inp.below(CAPACITY), inp.below(CAPACITY)])
    header = struct.pack("<IIQ", kind, inp.pick([0, 0, 0, 1]), sector)
    split = inp.below(8)
    parts: list[Part] = [(header[:8], 8, False), (header[8:], 8, False)] if split == 0 else \
        [(header[:12], 12, False)] if split == 1 else [(header, 16, False)]
    if kind in (11, 13) and inp.chance(220):
        for _ in range(inp.pick([1, 1, 1, 2, 0])):
            segment = struct.pack("<QII", inp.pick([0, 8, CAPACITY - 8, CAPACITY, inp.int(8)]),
                                  inp.pick([1, 8, CAPACITY, (1 << 22) + 1, inp.int(4)]), inp.pick([0, 0, 1, 2]))
            parts.append((segment, 16, False))
    else:
        writes = kind in (0, 8)
        if inp.chance(20):
            writes = not writes
        sizes = [20, 512, 8] if kind == 8 else [512, 512, 1024, 4096, 511, 513, 1, 2048]
        for _ in range(inp.pick([0, 1, 1, 1, 1, 2, 3]) if kind != 4 else inp.pick([0, 0, 0, 1])):
            size = inp.pick(sizes)
            parts.append((bytes([0x5A]) * size, size, writes))
    status = inp.below(16)
    if status < 12:
        parts.append((b"", 1, True))
    elif status == 12 and parts[-1][2]:
        last = parts.pop()
        parts.append((b"", last[1] + 1, True))   # the status byte at the end of the data buffer
    elif status == 13:
        parts.append((b"", 2, True))
    elif status == 14:
        parts.append((b"\0", 1, False))
    return parts


def vsock_packet(inp: Input, connections: list[tuple[int, int]]) -> list[Part]:
    if connections and inp.chance(160):   # on a connection the device has: answer, data, shutdown, credit
        dst_port, src_port = connections[inp.below(len(connections))]
        op = inp.pick([2, 5, 5, 5, 5, 4, 7, 6, 3, 1])
    else:
        op = inp.pick([1, 1, 1, 2, 3, 4, 5, 5, 6, 7, 0, 8, inp.byte()])
        dst_port = inp.pick([1024, 1025, 1024, 9, FIRST_LOCAL_PORT, FIRST_LOCAL_PORT + 1, inp.int(4)])
        src_port = inp.pick([5000, 5001, 7, inp.int(4)])
    src_cid = GUEST_CID if inp.chance(235) else inp.pick([2, 0, U64, 4])
    dst_cid = 2 if inp.chance(235) else inp.pick([3, 1, inp.int(8)])
    kind = 1 if inp.chance(240) else inp.pick([2, 0, 3])
    payload = inp.pick([0, 1, 100, 4096, 20000, 3]) if op == 5 else (0 if inp.chance(240) else 16)
    length = payload if inp.chance(225) else inp.pick([payload + 1, U32, 65537, inp.int(4)])
    flags = inp.pick([0, 1, 2, 3, inp.int(4)]) if op == 4 else (0 if inp.chance(240) else inp.int(4))
    buf_alloc = inp.pick([65536, 65536, 0, 1, U32, inp.int(4)])
    fwd_cnt = 0 if inp.chance(200) else inp.int(4)
    header = struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, kind, op, flags,
                         buf_alloc, fwd_cnt)
    body = bytes([0x61 + payload % 26]) * payload
    layout = inp.below(6)
    if layout == 0:
        return [(header + body, 44 + payload, False)]
    if layout == 1 and payload:
        return [(header[:20], 20, False), (header[20:] + body, 24 + payload, False)]
    parts: list[Part] = [(header, 44, False)]
    if payload:
        parts.append((body, payload, False))
    if layout == 5:
        parts.append((b"", 16, True))
    return parts


def net_frame(inp: Input) -> list[Part]:
    header = struct.pack("<BBHHHHH", inp.pick([0, 0, 0, 1, 2, 3, inp.byte()]),
                         inp.pick([0, 0, 0, 1, 3, 4, 0x81, 0x84, inp.byte()]), inp.pick([0, 54, inp.int(2)]),
                         inp.pick([0, 1448, 1, inp.int(2)]), inp.pick([0, 14, 34, inp.int(2)]),
                         inp.pick([0, 16, 6, inp.int(2)]), 0)
    dst = inp.pick([0, 1, 2])
    frame = (HOST_MAC, b"\xff" * 6, inp.take(6))[dst] + GUEST_MAC + inp.pick([0x88B5, 0x0800, 0x86DD]).to_bytes(2,
                                                                                                           "big")
    frame += bytes([0x42]) * inp.pick([46, 46, 0, 100, 1486, 3000, 9000, 1])
    layout = inp.below(5)
    if layout == 0:
        return [(header + frame, 12 + len(frame), False)]
    if layout == 1:
        return [(header[:6], 6, False), (header[6:] + frame, 6 + len(frame), False)]
    if layout == 2 and len(frame) > 20:
        return [(header, 12, False), (frame[:14], 14, False), (frame[14:], len(frame) - 14, False)]
    parts: list[Part] = [(header, 12, False), (frame, len(frame), False)]
    if layout == 4 and inp.chance(60):
        parts.append((b"", 4, True))
    return parts
