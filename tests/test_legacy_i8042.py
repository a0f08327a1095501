"""The i8042 controller: reset, the probing Linux does, the keyboard's replies and IRQ 1."""

from __future__ import annotations

import pytest

from kvmlet.devices.bus import Bus
from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.legacy.i8042 import I8042
from kvmlet.devices.legacy.ports import register_claims

STATUS_OBF, STATUS_SYS, STATUS_CMD, STATUS_UNLOCKED, STATUS_AUX = 0x01, 0x04, 0x08, 0x10, 0x20


class Machine:
    def __init__(self) -> None:
        self.resets = 0
        self.irq = NullInterrupt()
        self.i8042 = I8042(self.reset, self.irq)
        self.bus = Bus("pio")
        register_claims(self.bus, self.i8042.bus_claims())

    def reset(self) -> None:
        self.resets += 1

    def command(self, command: int, *data: int) -> None:
        self.bus.write(0x64, 1, command)
        for byte in data:
            self.bus.write(0x60, 1, byte)

    def status(self) -> int:
        return self.bus.read(0x64, 1)

    def read_all(self) -> list[int]:
        out = []
        while self.status() & STATUS_OBF:
            out.append(self.bus.read(0x60, 1))
        return out


@pytest.fixture
def machine() -> Machine:
    return Machine()


def test_claims_two_one_byte_ports(machine: Machine) -> None:
    assert [(r.base, r.size) for r in machine.bus.ranges()] == [(0x60, 1), (0x64, 1)]
    assert machine.bus.read(0x61, 1) == 0xFF  # not ours


def test_status_after_power_on(machine: Machine) -> None:
    assert machine.status() == STATUS_SYS | STATUS_UNLOCKED
    machine.command(0xAE)
    assert machine.status() & STATUS_CMD
    machine.bus.write(0x60, 1, 0xF4)
    assert not machine.status() & STATUS_CMD


def test_cpu_reset_by_pulse_command(machine: Machine) -> None:
    machine.command(0xFF)  # pulse nothing
    assert machine.resets == 0
    machine.command(0xFE)
    assert machine.resets == 1
    assert machine.i8042.stats().resets == 1


def test_cpu_reset_through_the_output_port(machine: Machine) -> None:
    machine.command(0xD0)
    assert machine.read_all() == [0x03]  # reset deasserted, A20 on
    machine.command(0xD1, 0x03)
    assert machine.resets == 0
    machine.command(0xD1, 0xFE)  # bit 0 clear: reset
    assert machine.resets == 1


def test_linux_controller_probe(machine: Machine) -> None:
    assert machine.read_all() == []  # i8042_flush
    machine.command(0xAA)
    assert machine.read_all() == [0x55]
    machine.command(0x20)
    ctr = machine.read_all()[0]
    assert ctr & 0x40  # translation on, as firmware leaves it
    machine.command(0x60, ctr & ~0x03)  # interrupts off while probing
    machine.command(0x20)
    assert machine.read_all() == [ctr & ~0x03]
    machine.command(0xAB)
    assert machine.read_all() == [0x00]
    machine.command(0xA9)
    assert machine.read_all() == [0x00]
    machine.command(0xA7)
    machine.command(0x20)
    assert machine.read_all()[0] & 0x20
    machine.command(0xA8)
    machine.command(0x20)
    assert not machine.read_all()[0] & 0x20
    machine.command(0xAD)
    machine.command(0x20)
    assert machine.read_all()[0] & 0x10
    machine.command(0xAE)
    machine.command(0x20)
    assert not machine.read_all()[0] & 0x10
    assert machine.i8042.stats().unknown_commands == 0


def test_aux_loopback_is_marked_as_aux_data(machine: Machine) -> None:
    machine.command(0xD3, 0x5A)
    assert machine.status() & (STATUS_OBF | STATUS_AUX) == STATUS_OBF | STATUS_AUX
    assert machine.read_all() == [0x5A]
    machine.command(0xD2, 0x1C)
    assert machine.status() & STATUS_AUX == 0
    assert machine.read_all() == [0x1C]


def test_keyboard_answers_commands(machine: Machine) -> None:
    machine.bus.write(0x60, 1, 0xF2)  # identify, translated
    assert machine.read_all() == [0xFA, 0xAB, 0x41]
    machine.command(0x20)
    ctr = machine.read_all()[0]
    machine.command(0x60, ctr & ~0x40)
    machine.bus.write(0x60, 1, 0xF2)
    assert machine.read_all() == [0xFA, 0xAB, 0x83]
    machine.bus.write(0x60, 1, 0xFF)
    assert machine.read_all() == [0xFA, 0xAA]
    machine.bus.write(0x60, 1, 0xEE)
    assert machine.read_all() == [0xEE]
    machine.bus.write(0x60, 1, 0xF0)
    machine.bus.write(0x60, 1, 0x00)
    assert machine.read_all() == [0xFA, 0xFA, 0x02]
    machine.bus.write(0x60, 1, 0xED)
    machine.bus.write(0x60, 1, 0x07)
    assert machine.read_all() == [0xFA, 0xFA]


def test_keyboard_interrupt_edges(machine: Machine) -> None:
    machine.bus.write(0x60, 1, 0xF2)  # three bytes, each a new edge as the previous one is read
    assert machine.irq.count == 1
    machine.read_all()
    assert machine.irq.count == 3
    machine.command(0x20)  # the command byte read also fills the output buffer
    assert machine.irq.count == 4
    ctr = machine.read_all()[0]
    machine.command(0x60, ctr & ~0x01)
    machine.command(0x20)
    assert machine.irq.count == 4
    machine.read_all()
    machine.command(0xD3, 0x11)  # aux data does not raise IRQ 1
    assert machine.irq.count == 4
    machine.read_all()
    assert machine.i8042.stats().interrupts == 4


def test_without_an_irq_line_the_guest_polls() -> None:
    i8042 = I8042(lambda: None)
    i8042.write_data(0xF4)
    assert i8042.read_status() & STATUS_OBF
    assert i8042.read_data() == 0xFA
    assert i8042.read_data() == 0x00  # empty
