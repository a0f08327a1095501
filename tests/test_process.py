"""Process-wide start-up settings."""

from __future__ import annotations

import subprocess
import sys


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096)); "
            "from kvmlet.process import raise_open_file_limit; print(raise_open_file_limit(), "
            "resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["4096", "4096"]
