"""Reading a JSON document a user names on the command line or in a configuration (CPU models, captures, launch
policies): one line saying which file and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvmlet.errors import KvmletError


def read_json_file(path: str | Path, label: str, error: type[KvmletError] = KvmletError) -> Any:
    """The parsed document; ``error("<label>: <why>")`` if the file cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise error(f"{label}: {exc.strerror}") from None
    except ValueError as exc:
        raise error(f"{label}: not JSON ({exc})") from None
