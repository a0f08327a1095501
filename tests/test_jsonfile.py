"""The JSON files users name: a missing or malformed one is one line naming the file, in the caller's error."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmlet.cpu.capture import load_capture
from kvmlet.cpu.errors import CpuModelError
from kvmlet.cpu.models import load_model_file
from kvmlet.errors import ConfigError
from kvmlet.jsonfile import read_json_file


def test_a_document_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"a": [1, 2]}')
    assert read_json_file(path, "a") == {"a": [1, 2]}


def test_missing_and_malformed_files_are_one_line_in_the_callers_error(tmp_path: Path) -> None:
    missing, broken = tmp_path / "missing.json", tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"^--cpu-model x: No such file or directory$"):
        read_json_file(missing, "--cpu-model x", ConfigError)
    with pytest.raises(CpuModelError) as refused:
        load_capture(broken)
    assert str(refused.value).startswith(f"capture {broken}: not JSON (") and "\n" not in str(refused.value)
    with pytest.raises(CpuModelError, match=r"^CPU model file .*missing.json: No such file or directory$"):
        load_model_file(missing)
