"""What the machine says about itself for the health report, one module per source.

- `load`: /proc/loadavg;          - `thermal`: sysfs thermal zones and hwmon chips;
- `links`: netlink via pyroute2;   - `nvidia_smi`: discrete NVIDIA GPUs;
- `tegrastats`: a Jetson's iGPU and power rails.

A package rather than one module because each source has its own format, its own failure modes and
its own recorded fixtures; `read_system` is the one entry point. Every source fails soft: a missing
file, tool or library leaves its field empty and is logged once, never raised into the health loop.
"""

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from device.sysinfo.links import read_links
from device.sysinfo.load import read_load
from device.sysinfo.nvidia_smi import read_nvidia_gpus
from device.sysinfo.tegrastats import gpu_from_sample, jetson_model, read_tegrastats
from device.sysinfo.thermal import read_temperatures
from protocol.messages import GpuHealth, LinkHealth, LoadAverage, PowerRail, Temperature

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SysinfoConfig:
    root: Path = Path("/")  # where /proc and /sys are read from; tests point it at recorded trees
    include_loopback: bool = False
    links: bool = True
    # None: look the tool up on PATH at each read; "" : never run it.
    nvidia_smi: str | None = None
    tegrastats: str | None = None
    tool_timeout_s: float = 3.0


@dataclass
class SystemSnapshot:
    load: LoadAverage | None = None
    temperatures: list[Temperature] = field(default_factory=list)
    links: list[LinkHealth] = field(default_factory=list)
    gpus: list[GpuHealth] = field(default_factory=list)
    power_rails: list[PowerRail] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # source -> why, for this read


_reported: set[tuple[str, str]] = set()


def _soft(source: str, read: Callable[[], T], default: T, failed: dict[str, str]) -> T:
    try:
        return read()
    except Exception as e:  # one source's trouble must never stop the health loop
        why = f"{type(e).__name__}: {e}"[:200]
        failed[source] = why
        if (source, type(e).__name__) not in _reported:  # once per kind of failure, not every 5 s
            _reported.add((source, type(e).__name__))
            log.warning("health source %s unavailable (%s); its fields stay empty", source, why)
        return default


def _tool(configured: str | None, name: str) -> str | None:
    if configured == "":
        return None
    return configured or shutil.which(name)


def _gpus(config: SysinfoConfig, snapshot: SystemSnapshot) -> list[GpuHealth]:
    # A Jetson has tegrastats; its nvidia-smi (JetPack 6) reports N/A for nearly everything.
    tegrastats = _tool(config.tegrastats, "tegrastats")
    if tegrastats is not None:
        sample = read_tegrastats(tegrastats, config.tool_timeout_s)
        if sample is not None:
            snapshot.power_rails = sample.rails
            gpu = gpu_from_sample(sample, jetson_model(config.root))
            return [gpu] if gpu else []
    nvidia_smi = _tool(config.nvidia_smi, "nvidia-smi")
    if nvidia_smi is not None:
        return read_nvidia_gpus(nvidia_smi, config.tool_timeout_s) or []
    return []


def read_system(config: SysinfoConfig | None = None) -> SystemSnapshot:
    config = config or SysinfoConfig()
    snapshot = SystemSnapshot()
    failed = snapshot.failed
    snapshot.load = _soft("load", lambda: read_load(config.root), None, failed)
    snapshot.temperatures = _soft("temperatures", lambda: read_temperatures(config.root), [], failed)
    if config.links:
        snapshot.links = _soft(
            "links", lambda: read_links(include_loopback=config.include_loopback), [], failed
        )
    snapshot.gpus = _soft("gpus", lambda: _gpus(config, snapshot), [], failed)
    return snapshot


__all__ = ["SysinfoConfig", "SystemSnapshot", "read_system"]
