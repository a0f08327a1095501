"""A console reader that stops reading must never block the vCPU thread writing guest output."""

from __future__ import annotations

import os
import time

from kvmlet.devices.legacy.console import StdioConsole


def test_full_pipe_drops_output_instead_of_blocking() -> None:
    read_end, write_end = os.pipe()  # a blocking pipe that nobody reads, like `kvmlet run | sleep`
    try:
        console = StdioConsole(stdin_fd=read_end, stdout_fd=write_end)
        started = time.monotonic()
        for _ in range(200_000):  # far more than a pipe buffer (64 KiB)
            console.write(b"x")
        assert time.monotonic() - started < 5
        assert console.dropped_bytes > 0
    finally:
        os.close(read_end)
        os.close(write_end)
