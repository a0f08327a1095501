"""The console escape sequence on a terminal: Ctrl-A followed by a command key (as QEMU's -nographic).

Ctrl-A x stops the VM, Ctrl-A s saves a snapshot (docs/snapshots.md), Ctrl-A h prints help, Ctrl-A Ctrl-A
sends one Ctrl-A to the guest. Ctrl-A followed by
any other key sends both bytes to the guest unchanged.
"""

from __future__ import annotations

from enum import Enum

ESCAPE_BYTE = 0x01  # Ctrl-A

ESCAPE_HELP = (b"\n[kvmlet console]\n"
               b"  Ctrl-A x       stop the VM\n"
               b"  Ctrl-A s       save a snapshot (kvmlet-<pid>-<n>.snap and .mem here)\n"
               b"  Ctrl-A Ctrl-A  send Ctrl-A to the guest\n"
               b"  Ctrl-A h       this help\n")


class EscapeAction(Enum):
    QUIT = "quit"
    HELP = "help"
    SNAPSHOT = "snapshot"


_COMMANDS = {ord("x"): EscapeAction.QUIT, ord("X"): EscapeAction.QUIT,
             ord("s"): EscapeAction.SNAPSHOT, ord("S"): EscapeAction.SNAPSHOT,
             ord("h"): EscapeAction.HELP, ord("?"): EscapeAction.HELP}


class EscapeFilter:
    """Removes escape sequences from terminal input; keeps state across reads."""

    def __init__(self) -> None:
        self._escaped = False

    def feed(self, data: bytes) -> tuple[bytes, list[EscapeAction]]:
        """Returns the bytes for the guest and the commands seen, in order."""
        if not self._escaped and ESCAPE_BYTE not in data:
            return data, []
        out = bytearray()
        actions: list[EscapeAction] = []
        for byte in data:
            if self._escaped:
                self._escaped = False
                action = _COMMANDS.get(byte)
                if action is not None:
                    actions.append(action)
                elif byte == ESCAPE_BYTE:
                    out.append(ESCAPE_BYTE)
                else:
                    out += bytes((ESCAPE_BYTE, byte))
            elif byte == ESCAPE_BYTE:
                self._escaped = True
            else:
                out.append(byte)
        return bytes(out), actions
