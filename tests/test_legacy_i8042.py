"""The i8042 controller: reset, the probing Linux does, the keyboard's replies, Ctrl+Alt+Del and IRQ 1."""

from __future__ import annotations

import threading
import time

import pytest

from kvmlet.devices.bus import Bus
from kvmlet.devices.irq import NullInterrupt
from kvmlet.devices.legacy.i8042 import I8042, KEYBOARD_BUFFER_LIMIT, OUTPUT_QUEUE_LIMIT, KeyboardInputError
from kvmlet.devices.legacy.ports import register_claims

STATUS_OBF, STATUS_SYS, STATUS_CMD, STATUS_UNLOCKED, STATUS_AUX = 0x01, 0x04, 0x08, 0x10, 0x20
CTR_KBD_INT, CTR_KBD_DISABLED, CTR_TRANSLATE = 0x01, 0x10, 0x40
# Ctrl, Alt, Delete pressed, then Delete, Alt, Ctrl released.
CTRL_ALT_DEL_SET1 = [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]  # also set 2 through translation
CTRL_ALT_DEL_SET2 = [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
CTRL_ALT_DEL_SET3 = [0x11, 0x19, 0x64, 0xF0, 0x64, 0xF0, 0x19, 0xF0, 0x11]


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

    def command_byte(self) -> int:
        self.command(0x20)
        return self.read_all()[0]

    def set_command_byte(self, set_bits: int = 0, clear_bits: int = 0) -> None:
        self.command(0x60, (self.command_byte() | set_bits) & ~clear_bits)


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


def test_ctrl_alt_del_is_translated_to_set_1_by_default(machine: Machine) -> None:
    assert machine.command_byte() & CTR_TRANSLATE
    irqs = machine.irq.count
    machine.i8042.send_ctrl_alt_del()
    assert machine.status() & (STATUS_OBF | STATUS_AUX) == STATUS_OBF
    assert machine.irq.count == irqs + 1  # one byte in the output buffer, one edge
    assert machine.read_all() == CTRL_ALT_DEL_SET1
    assert machine.irq.count == irqs + len(CTRL_ALT_DEL_SET1)  # an edge per byte
    assert not machine.status() & STATUS_OBF


def test_ctrl_alt_del_untranslated_is_set_2(machine: Machine) -> None:
    machine.set_command_byte(clear_bits=CTR_TRANSLATE)
    irqs = machine.irq.count
    machine.i8042.send_ctrl_alt_del()
    assert machine.read_all() == CTRL_ALT_DEL_SET2
    assert machine.irq.count == irqs + len(CTRL_ALT_DEL_SET2)


@pytest.mark.parametrize(("scan_code_set", "expected"), [(1, CTRL_ALT_DEL_SET1), (3, CTRL_ALT_DEL_SET3)])
def test_ctrl_alt_del_in_the_selected_scan_code_set(machine: Machine, scan_code_set: int,
                                                    expected: list[int]) -> None:
    machine.set_command_byte(clear_bits=CTR_TRANSLATE)
    machine.bus.write(0x60, 1, 0xF0)
    machine.bus.write(0x60, 1, scan_code_set)
    assert machine.read_all() == [0xFA, 0xFA]
    machine.i8042.send_ctrl_alt_del()
    assert machine.read_all() == expected
    machine.bus.write(0x60, 1, 0xFF)  # a keyboard reset selects set 2 again
    assert machine.read_all() == [0xFA, 0xAA]
    machine.i8042.send_ctrl_alt_del()
    assert machine.read_all() == CTRL_ALT_DEL_SET2


def test_translation_applies_as_bytes_enter_the_output_buffer(machine: Machine) -> None:
    ctr = machine.command_byte()
    machine.i8042.send_ctrl_alt_del()
    assert machine.bus.read(0x60, 1) == 0x1D  # Ctrl; Alt (0x11 -> 0x38) took its place in the buffer
    machine.command(0x60, ctr & ~CTR_TRANSLATE)  # the bytes still in the keyboard pass untranslated
    assert machine.read_all() == [0x38, *CTRL_ALT_DEL_SET2[2:]]


def test_with_the_interrupt_disabled_the_guest_polls(machine: Machine) -> None:
    ctr = machine.command_byte()
    machine.command(0x60, ctr & ~CTR_KBD_INT)
    irqs = machine.irq.count
    machine.i8042.send_ctrl_alt_del()
    assert machine.status() & STATUS_OBF
    assert machine.irq.count == irqs
    assert machine.bus.read(0x60, 1) == CTRL_ALT_DEL_SET1[0]
    machine.command(0x60, ctr)  # enabling it with a byte waiting is an edge
    assert machine.irq.count == irqs + 1
    assert machine.read_all() == CTRL_ALT_DEL_SET1[1:]
    assert machine.irq.count == irqs + len(CTRL_ALT_DEL_SET1) - 1


def test_a_disabled_keyboard_interface_holds_the_keys(machine: Machine) -> None:
    machine.command(0xAD)
    irqs = machine.irq.count
    machine.i8042.send_ctrl_alt_del()
    assert not machine.status() & STATUS_OBF
    assert machine.irq.count == irqs
    machine.command(0xAE)
    assert machine.irq.count == irqs + 1
    assert machine.read_all() == CTRL_ALT_DEL_SET1


def test_keys_wait_behind_a_controller_reply(machine: Machine) -> None:
    machine.command(0x20)
    machine.i8042.send_ctrl_alt_del()
    command_byte, *keys = machine.read_all()
    assert command_byte & CTR_TRANSLATE
    assert keys == CTRL_ALT_DEL_SET1


def test_keyboard_commands_discard_held_keys(machine: Machine) -> None:
    machine.command(0xAD)
    machine.i8042.send_ctrl_alt_del()
    machine.bus.write(0x60, 1, 0xFF)  # writing to the keyboard enables its interface; the reset drops the keys
    assert machine.read_all() == [0xFA, 0xAA]


def test_a_keyboard_disabled_by_the_guest_refuses_keys(machine: Machine) -> None:
    machine.bus.write(0x60, 1, 0xF5)
    assert machine.read_all() == [0xFA]
    with pytest.raises(KeyboardInputError, match="0xF5"):
        machine.i8042.send_ctrl_alt_del()
    assert machine.read_all() == []
    machine.bus.write(0x60, 1, 0xF4)
    assert machine.read_all() == [0xFA]
    machine.i8042.send_ctrl_alt_del()
    assert machine.read_all() == CTRL_ALT_DEL_SET1


def test_a_guest_that_does_not_read_fills_the_keyboard_buffer(machine: Machine) -> None:
    assert len(CTRL_ALT_DEL_SET2) <= KEYBOARD_BUFFER_LIMIT <= OUTPUT_QUEUE_LIMIT
    machine.i8042.send_ctrl_alt_del()  # one byte in the output buffer, ten held by the keyboard
    with pytest.raises(KeyboardInputError, match="port 0x60"):
        machine.i8042.send_ctrl_alt_del()  # no room for all eleven: nothing is sent
    assert machine.read_all() == CTRL_ALT_DEL_SET1
    machine.i8042.send_ctrl_alt_del()
    assert machine.read_all() == CTRL_ALT_DEL_SET1


def test_ctrl_alt_del_from_another_thread_while_the_guest_reads(machine: Machine) -> None:
    rounds = 50

    def sender() -> None:
        sent = 0
        while sent < rounds:
            try:
                machine.i8042.send_ctrl_alt_del()
                sent += 1
            except KeyboardInputError:
                time.sleep(0.0001)

    thread = threading.Thread(target=sender)
    thread.start()
    received: list[int] = []
    deadline = time.monotonic() + 10
    while len(received) < rounds * len(CTRL_ALT_DEL_SET1) and time.monotonic() < deadline:
        received += machine.read_all()
    thread.join()
    assert received == CTRL_ALT_DEL_SET1 * rounds
    assert machine.irq.count == rounds * len(CTRL_ALT_DEL_SET1)
