"""An i8042 keyboard controller (ports 0x60 and 0x64) with a keyboard that answers commands and whose only keys
are the ones the VMM presses: Ctrl+Alt+Del (``send_ctrl_alt_del``, Firecracker's ``SendCtrlAltDel``).

Its main job is the PC's reset line: command 0xFE on port 0x64 (or 0xD1 with output-port bit 0 clear) calls
``on_reset()``, which is how a Linux guest reboots (``reboot=k``). Besides that it implements enough of the
controller and PS/2 keyboard command sets for Linux's probing to find a sane controller quickly:

* controller commands 0x20 (read command byte), 0x60 (write it), 0xA7/0xA8 (disable/enable aux), 0xA9 (aux
  interface test -> 0), 0xAA (self test -> 0x55), 0xAB (keyboard interface test -> 0), 0xAD/0xAE
  (disable/enable keyboard), 0xD0/0xD1 (read/write output port), 0xD2/0xD3 (write keyboard/aux output
  buffer), 0xD4 (write to aux device: no aux device, ignored), 0xF0-0xFF (pulse output lines; bit 0 = reset);
* keyboard commands (bytes written to port 0x60 with no controller command pending): 0xFF reset
  (ACK, 0xAA), 0xF2 identify (ACK, 0xAB 0x83, translated 0x41), 0xEE echo, 0xF0 scan code set, 0xED LEDs,
  0xF3 typematic, 0xF4 enable, 0xF5 disable (and defaults), 0xF6 defaults, anything else: ACK.

Keys travel as on a PC: the keyboard sends its scan codes (in the set the guest selected, set 2 after reset) into
its own 16-byte buffer; the controller takes them one at a time, only while its output buffer is empty and the
keyboard interface is enabled (command byte bit 4 clear; otherwise the keyboard keeps them), and with the
TRANSLATE bit of the command byte set (as firmware leaves it, and Linux keeps it) converts set 2 to set 1 on the
way: Ctrl+Alt+Del reaches port 0x60 as ``1D 38 E0 53 E0 D3 B8 9D``, or untranslated ``14 11 E0 71 E0 F0 71 F0
11 F0 14``. Each byte is an IRQ 1 edge like any other keyboard byte. Firecracker puts the set 2 make codes in
the output buffer as they are, which is right for its command byte (translation off) and not for ours.

There is no mouse: a Linux guest should get ``i8042.noaux`` on its command line, as under Firecracker, or its
aux probe waits for an IRQ 12 that never comes (about 250 ms). Keyboard bytes raise ``kbd_irq`` (IRQ 1) on
each rising edge of "output buffer full with keyboard data" while the command byte enables it.

The device claims two 1-byte ranges through two views, ``data_port`` and ``command_port``; see ``bus_claims``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from kvmlet.devices.irq import InterruptLine
from kvmlet.devices.legacy.ports import PortClaim, all_ones
from kvmlet.devices.state import DeviceStateError, I8042State, expect_state
from kvmlet.errors import KvmletError

DATA_PORT = 0x60
COMMAND_PORT = 0x64
KEYBOARD_IRQ = 1
OUTPUT_QUEUE_LIMIT = 16
KEYBOARD_BUFFER_LIMIT = 16  # a PS/2 keyboard's own buffer


class Status(IntFlag):
    OUTPUT_FULL = 0x01
    INPUT_FULL = 0x02
    SYSTEM = 0x04
    LAST_WRITE_COMMAND = 0x08
    KEYBOARD_UNLOCKED = 0x10
    AUX_DATA = 0x20
    TIMEOUT = 0x40
    PARITY = 0x80


class CommandByte(IntFlag):
    KEYBOARD_INTERRUPT = 0x01
    AUX_INTERRUPT = 0x02
    SYSTEM = 0x04
    KEYBOARD_DISABLED = 0x10
    AUX_DISABLED = 0x20
    TRANSLATE = 0x40


class OutputPort(IntFlag):
    RESET_DEASSERTED = 0x01  # 0 holds the CPU in reset
    A20 = 0x02


class Command(IntEnum):
    READ_COMMAND_BYTE = 0x20
    WRITE_COMMAND_BYTE = 0x60
    DISABLE_AUX = 0xA7
    ENABLE_AUX = 0xA8
    TEST_AUX = 0xA9
    SELF_TEST = 0xAA
    TEST_KEYBOARD = 0xAB
    DISABLE_KEYBOARD = 0xAD
    ENABLE_KEYBOARD = 0xAE
    READ_OUTPUT_PORT = 0xD0
    WRITE_OUTPUT_PORT = 0xD1
    WRITE_KEYBOARD_BUFFER = 0xD2
    WRITE_AUX_BUFFER = 0xD3
    WRITE_AUX = 0xD4
    PULSE_RESET = 0xFE


COMMANDS_WITH_DATA = frozenset({Command.WRITE_COMMAND_BYTE, Command.WRITE_OUTPUT_PORT,
                                Command.WRITE_KEYBOARD_BUFFER, Command.WRITE_AUX_BUFFER, Command.WRITE_AUX})
SELF_TEST_PASSED = 0x55
INTERFACE_OK = 0x00


class KeyboardCommand(IntEnum):
    SET_LEDS = 0xED
    ECHO = 0xEE
    SCAN_CODE_SET = 0xF0
    IDENTIFY = 0xF2
    SET_TYPEMATIC = 0xF3
    ENABLE = 0xF4
    DISABLE = 0xF5
    SET_DEFAULT = 0xF6
    RESET = 0xFF


KEYBOARD_COMMANDS_WITH_PARAMETER = frozenset({KeyboardCommand.SET_LEDS, KeyboardCommand.SCAN_CODE_SET,
                                              KeyboardCommand.SET_TYPEMATIC})
ACK = 0xFA
RESEND = 0xFE
BAT_PASSED = 0xAA
KEYBOARD_ID = (0xAB, 0x83)
KEYBOARD_ID_TRANSLATED = (0xAB, 0x41)
SCAN_CODE_SET_TRANSLATED = {1: 0x43, 2: 0x41, 3: 0x3F}  # the 8042's set-2-to-set-1 translation
# Commands after which a keyboard discards the keys it still holds.
KEYBOARD_COMMANDS_CLEARING_BUFFER = frozenset({KeyboardCommand.ENABLE, KeyboardCommand.DISABLE,
                                               KeyboardCommand.SET_DEFAULT, KeyboardCommand.SCAN_CODE_SET,
                                               KeyboardCommand.RESET})

EXTENDED_PREFIX = 0xE0
BREAK_PREFIX = 0xF0  # sets 2 and 3: a release is F0 then the last byte of the make code
BREAK_BIT = 0x80     # set 1: a release is the make code with bit 7 set


@dataclass(frozen=True)
class Key:
    """A key's make code in scan code sets 1, 2 and 3 (an 0xE0 prefix is part of the code)."""

    name: str
    set1: tuple[int, ...]
    set2: tuple[int, ...]
    set3: tuple[int, ...]

    def make(self, scan_code_set: int) -> tuple[int, ...]:
        return {1: self.set1, 2: self.set2, 3: self.set3}[scan_code_set]

    def release(self, scan_code_set: int) -> tuple[int, ...]:
        *prefix, last = self.make(scan_code_set)
        if scan_code_set == 1:
            return (*prefix, last | BREAK_BIT)
        return (*prefix, BREAK_PREFIX, last)  # set 3 as Linux runs it: every key make/break (command 0xFA)


LEFT_CTRL = Key("Ctrl", set1=(0x1D,), set2=(0x14,), set3=(0x11,))
LEFT_ALT = Key("Alt", set1=(0x38,), set2=(0x11,), set3=(0x19,))
DELETE = Key("Delete", set1=(EXTENDED_PREFIX, 0x53), set2=(EXTENDED_PREFIX, 0x71), set3=(0x64,))
CTRL_ALT_DEL = (LEFT_CTRL, LEFT_ALT, DELETE)
# The 8042's set 2 -> set 1 translation, for the keys this keyboard has; the 0xE0 prefix passes unchanged and
# 0xF0 sets bit 7 of the next byte. (With translation on and the keyboard switched to set 1 or 3, real hardware
# garbles the codes and here they pass unchanged; no driver runs that way.)
TRANSLATION = {key.set2[-1]: key.set1[-1] for key in CTRL_ALT_DEL}


def key_sequence(keys: tuple[Key, ...], scan_code_set: int) -> list[int]:
    """The bytes a keyboard sends when ``keys`` are pressed in order and released in reverse order."""
    sequence = [byte for key in keys for byte in key.make(scan_code_set)]
    sequence += [byte for key in reversed(keys) for byte in key.release(scan_code_set)]
    return sequence


class KeyboardInputError(KvmletError, RuntimeError):
    """The keyboard could not send the keys; the message says why (nothing was sent)."""


INITIAL_COMMAND_BYTE = (CommandByte.KEYBOARD_INTERRUPT | CommandByte.SYSTEM | CommandByte.AUX_DISABLED
                        | CommandByte.TRANSLATE)  # as firmware leaves it
INITIAL_OUTPUT_PORT = OutputPort.RESET_DEASSERTED | OutputPort.A20


@dataclass(frozen=True)
class I8042Stats:
    resets: int
    commands: int
    unknown_commands: int
    interrupts: int


class _PortView:
    """One of the controller's two ports as a bus device (each range is 1 byte, so offsets are 0)."""

    def __init__(self, controller: I8042, command_port: bool) -> None:
        self._controller = controller
        self._command_port = command_port

    def bus_read(self, offset: int, size: int) -> int:
        if offset != 0:
            return all_ones(size)
        byte = self._controller.read_status() if self._command_port else self._controller.read_data()
        return byte | (all_ones(size) & ~0xFF)

    def bus_write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return
        if self._command_port:
            self._controller.write_command(value & 0xFF)
        else:
            self._controller.write_data(value & 0xFF)


class I8042:
    """The controller. ``on_reset`` is called (on the vCPU thread, without the lock) when the guest resets
    the CPU; ``kbd_irq`` is IRQ 1 (optional: without it the guest must poll)."""

    def __init__(self, on_reset: Callable[[], None], kbd_irq: InterruptLine | None = None) -> None:
        self._on_reset = on_reset
        self._kbd_irq = kbd_irq
        self._lock = threading.Lock()
        self._output: deque[tuple[int, bool]] = deque()  # (byte, from aux)
        self._keyboard_buffer: deque[int] = deque()  # keys the keyboard has not sent yet (its scan code set)
        self._translate_break = False  # translation: an 0xF0 was taken, the next byte is a release
        self._command_byte = int(INITIAL_COMMAND_BYTE)
        self._output_port = int(INITIAL_OUTPUT_PORT)
        self._pending_command: int | None = None
        self._last_write_command = False
        self._keyboard_pending: int | None = None  # a keyboard command waiting for its parameter
        self._keyboard_scanning = True
        self._scan_code_set = 2
        self._irq_level = False
        self._edges = 0
        self._resets = 0
        self._commands = 0
        self._unknown_commands = 0
        self._interrupts = 0
        self.data_port = _PortView(self, command_port=False)
        self.command_port = _PortView(self, command_port=True)

    def bus_claims(self) -> list[PortClaim]:
        return [PortClaim(DATA_PORT, 1, self.data_port, "i8042-data"),
                PortClaim(COMMAND_PORT, 1, self.command_port, "i8042-command")]

    # -- port 0x64 ----------------------------------------------------------------------------------------

    def read_status(self) -> int:
        with self._lock:
            status = Status.KEYBOARD_UNLOCKED
            if self._command_byte & CommandByte.SYSTEM:
                status |= Status.SYSTEM
            if self._last_write_command:
                status |= Status.LAST_WRITE_COMMAND
            if self._output:
                status |= Status.OUTPUT_FULL
                if self._output[0][1]:
                    status |= Status.AUX_DATA
            return int(status)

    def write_command(self, command: int) -> None:
        reset = False
        with self._lock:
            self._commands += 1
            self._last_write_command = True
            self._pending_command = None
            if command in COMMANDS_WITH_DATA:
                self._pending_command = command
            elif command == Command.READ_COMMAND_BYTE:
                self._put_locked(self._command_byte)
            elif command == Command.DISABLE_AUX:
                self._command_byte |= CommandByte.AUX_DISABLED
            elif command == Command.ENABLE_AUX:
                self._command_byte &= ~CommandByte.AUX_DISABLED
            elif command == Command.TEST_AUX or command == Command.TEST_KEYBOARD:
                self._put_locked(INTERFACE_OK)
            elif command == Command.SELF_TEST:
                self._command_byte |= CommandByte.SYSTEM
                self._put_locked(SELF_TEST_PASSED)
            elif command == Command.DISABLE_KEYBOARD:
                self._command_byte |= CommandByte.KEYBOARD_DISABLED
            elif command == Command.ENABLE_KEYBOARD:
                self._command_byte &= ~CommandByte.KEYBOARD_DISABLED
            elif command == Command.READ_OUTPUT_PORT:
                self._put_locked(self._output_port)
            elif command >= 0xF0:  # pulse output-port lines low for 6 us: bit 0 is the reset line
                reset = not command & 0x01
            else:
                self._unknown_commands += 1
            if reset:
                self._resets += 1
            self._pump_keyboard_locked()
            edges = self._take_edges_locked()
        self._send_edges(edges)
        if reset:
            self._on_reset()

    # -- port 0x60 ----------------------------------------------------------------------------------------

    def read_data(self) -> int:
        with self._lock:
            if not self._output:
                return 0x00
            byte, _ = self._output.popleft()
            self._irq_level = False  # the output buffer empties; the next byte (if any) is a new edge
            self._update_irq_locked()
            self._pump_keyboard_locked()
            edges = self._take_edges_locked()
        self._send_edges(edges)
        return byte

    def write_data(self, value: int) -> None:
        reset = False
        with self._lock:
            self._last_write_command = False
            command = self._pending_command
            self._pending_command = None
            if command is None:
                self._keyboard_write_locked(value)
            elif command == Command.WRITE_COMMAND_BYTE:
                self._command_byte = value
                self._update_irq_locked()
            elif command == Command.WRITE_OUTPUT_PORT:
                self._output_port = value
                reset = not value & OutputPort.RESET_DEASSERTED
                if reset:
                    self._resets += 1
                    self._output_port |= OutputPort.RESET_DEASSERTED  # the CPU comes out of reset
            elif command == Command.WRITE_KEYBOARD_BUFFER:
                self._put_locked(value)
            elif command == Command.WRITE_AUX_BUFFER:
                self._put_locked(value, aux=True)
            # WRITE_AUX: no aux device is attached; the byte goes nowhere
            self._pump_keyboard_locked()
            edges = self._take_edges_locked()
        self._send_edges(edges)
        if reset:
            self._on_reset()

    # -- the keyboard -------------------------------------------------------------------------------------

    def _keyboard_write_locked(self, value: int) -> None:
        self._command_byte &= ~CommandByte.KEYBOARD_DISABLED  # sending to the keyboard enables its clock
        pending = self._keyboard_pending
        self._keyboard_pending = None
        if pending == KeyboardCommand.SCAN_CODE_SET:
            self._put_locked(ACK)
            if value == 0:
                self._put_locked(self._translated_scan_code_set_locked())
            elif value in (1, 2, 3):
                self._scan_code_set = value
            return
        if pending is not None:  # LEDs, typematic rate: acknowledged and otherwise ignored
            self._put_locked(ACK)
            return
        if value == KeyboardCommand.ECHO:
            self._put_locked(KeyboardCommand.ECHO)
            return
        if value in KEYBOARD_COMMANDS_CLEARING_BUFFER:
            self._keyboard_buffer.clear()
        self._put_locked(ACK)
        if value in KEYBOARD_COMMANDS_WITH_PARAMETER:
            self._keyboard_pending = value
        elif value == KeyboardCommand.IDENTIFY:
            translated = self._command_byte & CommandByte.TRANSLATE
            for byte in KEYBOARD_ID_TRANSLATED if translated else KEYBOARD_ID:
                self._put_locked(byte)
        elif value == KeyboardCommand.RESET:
            self._scan_code_set = 2
            self._keyboard_scanning = True
            self._put_locked(BAT_PASSED)
        elif value == KeyboardCommand.ENABLE:
            self._keyboard_scanning = True
        elif value == KeyboardCommand.DISABLE or value == KeyboardCommand.SET_DEFAULT:
            self._scan_code_set = 2
            self._keyboard_scanning = value == KeyboardCommand.SET_DEFAULT

    def _translated_scan_code_set_locked(self) -> int:
        if self._command_byte & CommandByte.TRANSLATE:
            return SCAN_CODE_SET_TRANSLATED[self._scan_code_set]
        return self._scan_code_set

    # -- keys ---------------------------------------------------------------------------------------------

    def send_ctrl_alt_del(self) -> None:
        """Press Ctrl, Alt and Delete and release them (Delete, Alt, Ctrl), as a keyboard sends it; the guest
        reads the bytes from port 0x60, one IRQ 1 edge each (see the module docstring). Safe from any thread.
        Raises KeyboardInputError, sending nothing, if the guest has disabled the keyboard (command 0xF5) or
        the keyboard's buffer has no room for the whole sequence (the guest is not reading port 0x60)."""
        with self._lock:
            if not self._keyboard_scanning:
                raise KeyboardInputError("the guest has disabled the keyboard (keyboard command 0xF5): "
                                         "Ctrl+Alt+Del not sent")
            sequence = key_sequence(CTRL_ALT_DEL, self._scan_code_set)
            if len(self._keyboard_buffer) + len(sequence) > KEYBOARD_BUFFER_LIMIT:
                raise KeyboardInputError(f"the keyboard still holds {len(self._keyboard_buffer)} bytes the guest "
                                         "has not read from port 0x60: Ctrl+Alt+Del not sent")
            self._keyboard_buffer.extend(sequence)
            self._pump_keyboard_locked()
            edges = self._take_edges_locked()
        self._send_edges(edges)

    def _pump_keyboard_locked(self) -> None:
        """Moves the keyboard's bytes into the output buffer one at a time, as the controller takes them: only
        into an empty buffer (keyboard bytes never pile up behind a controller reply, and never fill the output
        queue) and while the keyboard interface is enabled; translated when the command byte says so."""
        while (self._keyboard_buffer and not self._output
               and not self._command_byte & CommandByte.KEYBOARD_DISABLED):
            byte = self._keyboard_buffer.popleft()
            if self._command_byte & CommandByte.TRANSLATE:
                if byte == BREAK_PREFIX:
                    self._translate_break = True
                    continue
                byte = TRANSLATION.get(byte, byte) | (BREAK_BIT if self._translate_break else 0)
                self._translate_break = False
            self._put_locked(byte)

    # -- output buffer and interrupt ----------------------------------------------------------------------

    def _put_locked(self, byte: int, aux: bool = False) -> None:
        if len(self._output) >= OUTPUT_QUEUE_LIMIT:
            return  # a guest that never reads; real hardware would hold the byte in the keyboard
        self._output.append((int(byte), aux))
        self._update_irq_locked()

    def _update_irq_locked(self) -> None:
        level = bool(self._output) and not self._output[0][1] and bool(
            self._command_byte & CommandByte.KEYBOARD_INTERRUPT)
        if level and not self._irq_level and self._kbd_irq is not None:
            self._edges += 1
            self._interrupts += 1
        self._irq_level = level

    def _take_edges_locked(self) -> int:
        edges = self._edges
        self._edges = 0
        return edges

    def _send_edges(self, edges: int) -> None:
        if self._kbd_irq is not None:
            for _ in range(edges):
                self._kbd_irq.trigger()

    def stats(self) -> I8042Stats:
        with self._lock:
            return I8042Stats(self._resets, self._commands, self._unknown_commands, self._interrupts)

    # -- snapshots ----------------------------------------------------------------------------------------

    def save_state(self) -> I8042State:
        with self._lock:
            return I8042State(output=list(self._output), keyboard_buffer=bytes(self._keyboard_buffer),
                              translate_break=self._translate_break, command_byte=self._command_byte,
                              output_port=self._output_port, pending_command=self._pending_command,
                              last_write_command=self._last_write_command, keyboard_pending=self._keyboard_pending,
                              keyboard_scanning=self._keyboard_scanning, scan_code_set=self._scan_code_set,
                              resets=self._resets, commands=self._commands, unknown_commands=self._unknown_commands,
                              interrupts=self._interrupts)

    def check_state(self, state: object) -> I8042State:
        """``state`` if it fits this controller, else DeviceStateError."""
        state = expect_state(state, I8042State, "i8042")
        if len(state.output) > OUTPUT_QUEUE_LIMIT or len(state.keyboard_buffer) > KEYBOARD_BUFFER_LIMIT:
            raise DeviceStateError(f"i8042: the saved state holds {len(state.output)} output and "
                                   f"{len(state.keyboard_buffer)} keyboard bytes (at most {OUTPUT_QUEUE_LIMIT} and "
                                   f"{KEYBOARD_BUFFER_LIMIT})")
        registers = [byte for byte, _ in state.output] + [state.command_byte, state.output_port,
                                                           state.pending_command or 0, state.keyboard_pending or 0]
        if not all(0 <= value <= 0xFF for value in registers) or state.scan_code_set not in (1, 2, 3):
            raise DeviceStateError("i8042: the saved state has a register that is not a byte or scan code set "
                                   f"{state.scan_code_set}")
        return state

    def restore_state(self, state: object) -> None:
        """Load a saved state (:meth:`check_state` first); a keyboard byte waiting in the output buffer raises
        IRQ 1 again."""
        state = self.check_state(state)
        with self._lock:
            self._output = deque((byte, bool(aux)) for byte, aux in state.output)
            self._keyboard_buffer = deque(state.keyboard_buffer)
            self._translate_break = state.translate_break
            self._command_byte = state.command_byte
            self._output_port = state.output_port
            self._pending_command = state.pending_command
            self._last_write_command = state.last_write_command
            self._keyboard_pending = state.keyboard_pending
            self._keyboard_scanning = state.keyboard_scanning
            self._scan_code_set = state.scan_code_set
            self._resets, self._commands = state.resets, state.commands
            self._unknown_commands, self._interrupts = state.unknown_commands, state.interrupts
            self._irq_level = False
            self._update_irq_locked()
            edges = self._take_edges_locked()
        self._send_edges(edges)
