"""Temperatures from sysfs: thermal zones and hwmon chips (read through `root` for recorded trees).

Both report millidegrees Celsius. A sensor that cannot be read right now (EINVAL/ENODATA from a
powered-down block, garbage, out of range) is left out; the others are still reported.
"""

import re
from pathlib import Path

from protocol.messages import HEALTH_MAX_TEMPERATURES, HEALTH_NAME_MAX, Temperature

# Jetson reports -256 C for sensors of blocks that are powered off (CV, GPU when idle on some
# releases); anything outside this range is such a placeholder or a broken sensor, not a reading.
PLAUSIBLE_C = (-60.0, 200.0)
_TEMP_INPUT = re.compile(r"^temp(\d+)_input$")


def _millidegrees(path: Path) -> float | None:
    try:
        celsius = int(path.read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None
    low, high = PLAUSIBLE_C
    return celsius if low <= celsius <= high else None


def _first_line(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text.splitlines()[0].strip() if text else None


def _name(text: str) -> str:
    return text[:HEALTH_NAME_MAX]


def _sorted_numerically(paths: list[Path], prefix: str) -> list[Path]:
    def key(p: Path) -> tuple[int, str]:
        suffix = p.name.removeprefix(prefix)
        return (int(suffix), p.name) if suffix.isdigit() else (1 << 30, p.name)

    return sorted(paths, key=key)


def thermal_zones(root: Path = Path("/")) -> list[Temperature]:
    result = []
    base = root / "sys/class/thermal"
    for zone in _sorted_numerically(list(base.glob("thermal_zone*")), "thermal_zone"):
        celsius = _millidegrees(zone / "temp")
        if celsius is None:
            continue
        kind = _first_line(zone / "type") or zone.name
        result.append(Temperature(sensor=_name(kind), celsius=celsius, source="thermal"))
    return result


def hwmon_sensors(root: Path = Path("/")) -> list[Temperature]:
    result = []
    base = root / "sys/class/hwmon"
    for chip in _sorted_numerically(list(base.glob("hwmon*")), "hwmon"):
        chip_name = _first_line(chip / "name") or chip.name
        inputs = []
        for path in chip.glob("temp*_input"):
            match = _TEMP_INPUT.match(path.name)
            if match:
                inputs.append((int(match.group(1)), path))
        for number, path in sorted(inputs):
            celsius = _millidegrees(path)
            if celsius is None:
                continue
            label = _first_line(chip / f"temp{number}_label") or f"temp{number}"
            result.append(Temperature(sensor=_name(f"{chip_name}/{label}"), celsius=celsius, source="hwmon"))
    return result


def read_temperatures(root: Path = Path("/")) -> list[Temperature]:
    """Thermal zones first (what the kernel throttles on), then hwmon chips; at most the Health cap."""
    return (thermal_zones(root) + hwmon_sensors(root))[:HEALTH_MAX_TEMPERATURES]
