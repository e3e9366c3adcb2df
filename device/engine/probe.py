"""Read the machine into one profile that backends and the status API use.

This is the first cut: architecture, CPU, memory, Jetson and NVIDIA presence, and which runtimes
import. Versions of CUDA/TensorRT and CPU feature flags come with the engine issue.
"""

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class HardwareProfile:
    arch: str
    cpu_count: int
    memory_bytes: int
    jetson: str | None = None
    nvidia_gpu: bool = False
    runtimes: dict[str, bool] = field(default_factory=dict)
    onnxruntime_providers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _memory_bytes(root: Path) -> int:
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _jetson(root: Path) -> str | None:
    release = root / "etc/nv_tegra_release"
    if release.exists():
        return release.read_text(errors="replace").splitlines()[0].strip("# ").strip()
    return None


def _ort_providers() -> list[str]:
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def probe(root: Path = Path("/")) -> HardwareProfile:
    """Probe the machine; `root` lets tests point it at a recorded /proc, /sys and /etc tree."""
    runtimes = {
        name: importlib.util.find_spec(module) is not None
        for name, module in {
            "onnxruntime": "onnxruntime",
            "tensorrt": "tensorrt",
            "tvm": "tvm",
            "litert": "ai_edge_litert",
        }.items()
    }
    return HardwareProfile(
        arch=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=_memory_bytes(root),
        jetson=_jetson(root),
        nvidia_gpu=(root / "proc/driver/nvidia/gpus").is_dir(),
        runtimes=runtimes,
        onnxruntime_providers=_ort_providers(),
    )
