"""Discrete NVIDIA GPUs through `nvidia-smi --query-gpu` (present wherever the driver is)."""

import csv
import io
import shutil

from pydantic import ValidationError

from device.sysinfo.tools import run_output
from protocol.messages import HEALTH_MAX_GPUS, GpuHealth

QUERY_FIELDS = (
    "index",
    "name",
    "utilization.gpu",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
    "clocks.sm",
)
MIB = 1024 * 1024


def command(binary: str) -> list[str]:
    return [binary, f"--query-gpu={','.join(QUERY_FIELDS)}", "--format=csv,noheader,nounits"]


def _number(text: str) -> float | None:
    # "[N/A]", "[Not Supported]", "N/A" and "" all mean the driver does not know this one.
    try:
        return float(text.strip())
    except ValueError:
        return None


def parse_nvidia_smi(text: str) -> list[GpuHealth]:
    """One GpuHealth per CSV row of `command()`'s output; rows that do not parse are skipped."""
    gpus = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if len(row) != len(QUERY_FIELDS):
            continue
        index, name, util, used, total, temp, power, clock = row
        number = _number(index)
        if number is None or number < 0:
            continue
        used_mib, total_mib, percent = _number(used), _number(total), _number(util)
        try:
            gpu = GpuHealth(
                index=int(number),
                name=name.strip()[:96],
                source="nvidia-smi",
                utilization_percent=None if percent is None else min(max(percent, 0.0), 100.0),
                memory_used_bytes=None if used_mib is None else int(used_mib * MIB),
                memory_total_bytes=None if total_mib is None else int(total_mib * MIB),
                temperature_c=_number(temp),
                power_w=_number(power),
                clock_mhz=_number(clock),
            )
        except ValidationError:  # a value out of any sane range: this row is broken, not the others
            continue
        gpus.append(gpu)
    return gpus[:HEALTH_MAX_GPUS]


def read_nvidia_gpus(binary: str | None = None, timeout_s: float = 5.0) -> list[GpuHealth] | None:
    """The GPUs now; None where nvidia-smi is absent, fails, or hangs past `timeout_s`."""
    binary = binary or shutil.which("nvidia-smi")
    if binary is None:
        return None
    output = run_output(command(binary), timeout_s)
    return None if output is None else parse_nvidia_smi(output)
