"""NVIDIA Jetson: one line of `tegrastats`, parsed into the iGPU's load and the power rails.

Formats handled (one line each, fields separated by spaces; tests/device/fixtures/health/tegrastats):
- JetPack 4 (L4T 32, Nano/TX2):   `RAM 1766/3964MB (lfb 197x4MB) ... GR3D_FREQ 0% ... GPU@23.5C ...
  POM_5V_IN 2545/2547 POM_5V_GPU 0/0` (rails as current/average mW without a unit);
- JetPack 5 (L4T 35, Xavier, Orin): `RAM 2019/30536MB ... GR3D_FREQ 0%@[0,0] ... GPU@-256C ...
  VDD_GPU_SOC 2004mW/2004mW` (AGX Xavier names its rails `GPU`, `CPU`, `SOC`, `CV`, `VDDRQ`, `SYS5V`);
- JetPack 6 (L4T 36, Orin): a leading `MM-DD-YYYY HH:MM:SS`, lower-case sensors `gpu@45.5C`,
  `GR3D_FREQ 0%@[305]`;
- newer releases: sensors as `cpu@52.9C/52.9C` and rails as current/average/max `...mW/...mW/...mW`.
A sensor at -256C is a powered-down block, not a reading, and is dropped.
"""

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from device.sysinfo.tools import first_line
from protocol.messages import HEALTH_MAX_POWER_RAILS, HEALTH_NAME_MAX, GpuHealth, PowerRail

_RAM = re.compile(r"\bRAM (\d+)/(\d+)([kMG])B\b")
_GR3D = re.compile(r"\bGR3D_FREQ (?:(\d+)%)?(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"(?<![\w@])([A-Za-z][\w-]*)@(-?\d+(?:\.\d+)?)C(?:/-?\d+(?:\.\d+)?C)?(?!\w)")
_RAIL_MW = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+(?:\.\d+)?)mW/(\d+(?:\.\d+)?)mW(?:/\d+(?:\.\d+)?mW)?")
# JetPack 4 wrote rails without a unit ("POM_5V_IN 2545/2547", AGX Xavier's "GPU 0/0"); the
# lookahead keeps "RAM 1766/3964MB" and "SWAP 0/2048MB" out.
_RAIL_BARE = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)/(\d+)(?![\w/])")
_UNIT = {"k": 1024, "M": 1024**2, "G": 1024**3}
PLAUSIBLE_C = (-60.0, 200.0)


@dataclass
class TegraSample:
    """What one tegrastats line says; a field the line lacks stays None or empty."""

    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None
    gpu_percent: float | None = None
    gpu_clock_mhz: float | None = None
    temperatures: dict[str, float] = field(default_factory=dict)
    rails: list[PowerRail] = field(default_factory=list)

    def gpu_temperature(self) -> float | None:
        for name, celsius in self.temperatures.items():
            if name.lower() == "gpu":
                return celsius
        return None


def parse_tegrastats(line: str) -> TegraSample:
    sample = TegraSample()
    if ram := _RAM.search(line):
        unit = _UNIT[ram.group(3)]
        sample.ram_used_bytes = int(ram.group(1)) * unit
        sample.ram_total_bytes = int(ram.group(2)) * unit
    if (gr3d := _GR3D.search(line)) and (gr3d.group(1) or gr3d.group(2)):
        if gr3d.group(1) is not None:
            sample.gpu_percent = min(float(gr3d.group(1)), 100.0)
        clocks = [float(c) for c in (gr3d.group(2) or "").split(",") if c]
        if clocks:
            sample.gpu_clock_mhz = max(clocks)  # one clock per GPC on Orin; they run together
    low, high = PLAUSIBLE_C
    for name, value in _TEMP.findall(line):
        celsius = float(value)
        if low <= celsius <= high:
            sample.temperatures[name[:HEALTH_NAME_MAX]] = celsius
    seen: set[str] = set()
    for name, current, average in _RAIL_MW.findall(line) + _RAIL_BARE.findall(line):
        if name in seen or name in ("RAM", "SWAP", "IRAM"):
            continue
        seen.add(name)
        try:
            sample.rails.append(
                PowerRail(
                    name=name[:HEALTH_NAME_MAX], milliwatts=float(current), average_milliwatts=float(average)
                )
            )
        except ValidationError:
            continue
    sample.rails = sample.rails[:HEALTH_MAX_POWER_RAILS]
    return sample


def jetson_model(root: Path = Path("/")) -> str:
    """The board's name from the device tree (e.g. 'NVIDIA Jetson AGX Orin Developer Kit')."""
    try:
        model = (root / "proc/device-tree/model").read_bytes().rstrip(b"\0\n").decode(errors="replace")
    except OSError:
        return "Jetson iGPU"
    return f"{model} iGPU"[:96] if model else "Jetson iGPU"


def gpu_from_sample(sample: TegraSample, name: str = "Jetson iGPU") -> GpuHealth | None:
    if sample.gpu_percent is None and sample.gpu_clock_mhz is None:
        return None
    return GpuHealth(
        index=0,
        name=name,
        source="tegrastats",
        utilization_percent=sample.gpu_percent,
        memory_used_bytes=sample.ram_used_bytes,
        memory_total_bytes=sample.ram_total_bytes,
        memory_shared=True,
        temperature_c=sample.gpu_temperature(),
        clock_mhz=sample.gpu_clock_mhz,
    )


def read_tegrastats(binary: str | None = None, timeout_s: float = 3.0) -> TegraSample | None:
    """One sample from tegrastats (about one interval, 1 s); None where it is absent or silent."""
    binary = binary or shutil.which("tegrastats")
    if binary is None:
        return None
    line = first_line([binary, "--interval", "1000"], timeout_s)
    return None if line is None else parse_tegrastats(line)
