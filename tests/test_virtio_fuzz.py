"""The virtqueue fuzz target runs clean on random inputs, in-process and as a script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fuzz.fuzz_virtqueue import TestOneInput, run_random

REPO = Path(__file__).resolve().parent.parent


def test_fuzz_target_on_random_inputs() -> None:
    run_random(300, seed=1234)


def test_fuzz_target_on_edge_inputs() -> None:
    for data in (b"", b"\xff" * 8, b"\x00" * 4096, bytes(range(256)) * 16):
        TestOneInput(data)


def test_fuzz_target_runs_as_a_script() -> None:
    result = subprocess.run([sys.executable, "tests/fuzz/fuzz_virtqueue.py", "--random", "50", "--seed", "7"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "50 random inputs, no failure" in result.stdout
