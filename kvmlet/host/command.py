"""``kvmlet host``: print the report, exit 0 when KVM is usable and 1 when it is not."""

from __future__ import annotations

import sys

from kvmlet.host.render import render_json, render_text
from kvmlet.host.report import probe_host


def host_main(json_output: bool = False) -> int:
    report = probe_host()
    sys.stdout.write(render_json(report) + "\n" if json_output else render_text(report))
    return 0 if report.kvm.usable else 1
