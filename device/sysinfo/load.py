"""Load averages from /proc/loadavg (read through `root`, so tests use recorded trees)."""

import os
from pathlib import Path

from protocol.messages import LoadAverage


def read_load(root: Path = Path("/")) -> LoadAverage | None:
    """The 1/5/15-minute load averages, or None where /proc/loadavg is missing or unreadable."""
    try:
        fields = (root / "proc/loadavg").read_text().split()
        load1, load5, load15 = (float(f) for f in fields[:3])
    except (OSError, ValueError):
        return None
    return LoadAverage(load1=load1, load5=load5, load15=load15, cpus=os.cpu_count())
