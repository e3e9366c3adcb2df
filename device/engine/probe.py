"""Read the machine into one profile that the backend registry, the status API and the CLI use.

Every file is read under `root`, so tests can point the probe at a recorded /proc, /sys, /etc and
/usr tree of another machine (tests/device/engine/fixtures/). What cannot come from such a tree
(which Python runtimes import here) always describes this Python environment.
"""

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REAL_ROOT = Path("/")

# MIDR implementer/part -> the core's LLVM -mcpu name (Arm TRMs; NVIDIA's own cores under 0x4e).
# fmt: off
ARM_CORES: dict[tuple[int, int], str] = {
    (0x41, 0xD03): "cortex-a53", (0x41, 0xD04): "cortex-a35", (0x41, 0xD05): "cortex-a55",
    (0x41, 0xD07): "cortex-a57", (0x41, 0xD08): "cortex-a72", (0x41, 0xD09): "cortex-a73",
    (0x41, 0xD0A): "cortex-a75", (0x41, 0xD0B): "cortex-a76", (0x41, 0xD0C): "neoverse-n1",
    (0x41, 0xD0D): "cortex-a77", (0x41, 0xD0E): "cortex-a76ae", (0x41, 0xD40): "neoverse-v1",
    (0x41, 0xD41): "cortex-a78", (0x41, 0xD42): "cortex-a78ae", (0x41, 0xD44): "cortex-x1",
    (0x41, 0xD46): "cortex-a510", (0x41, 0xD47): "cortex-a710", (0x41, 0xD48): "cortex-x2",
    (0x41, 0xD49): "neoverse-n2", (0x41, 0xD4B): "cortex-a78c", (0x41, 0xD4F): "neoverse-v2",
    (0x41, 0xD80): "cortex-a520", (0x41, 0xD81): "cortex-a720", (0x4E, 0x004): "carmel",
}
# fmt: on
ARM_VENDORS = {0x41: "ARM", 0x42: "Broadcom", 0x4E: "NVIDIA", 0x51: "Qualcomm", 0x61: "Apple"}

# Jetson modules by the board id in the device tree's `compatible` (module part number P<id>-<sku>).
JETSON_MODULES: dict[str, str] = {
    "p3701-0000": "Jetson AGX Orin",
    "p3701-0004": "Jetson AGX Orin 32GB",
    "p3701-0005": "Jetson AGX Orin 64GB",
    "p3701-0008": "Jetson AGX Orin Industrial",
    "p3767-0000": "Jetson Orin NX 16GB",
    "p3767-0001": "Jetson Orin NX 8GB",
    "p3767-0003": "Jetson Orin Nano 8GB",
    "p3767-0004": "Jetson Orin Nano 4GB",
    "p3767-0005": "Jetson Orin Nano 8GB (developer kit)",
    "p2888-0001": "Jetson AGX Xavier 16GB",
    "p2888-0004": "Jetson AGX Xavier 32GB",
    "p2888-0005": "Jetson AGX Xavier 64GB",
    "p2888-0008": "Jetson AGX Xavier Industrial",
    "p3668-0000": "Jetson Xavier NX (developer kit)",
    "p3668-0001": "Jetson Xavier NX",
    "p3668-0003": "Jetson Xavier NX 16GB",
    "p3448-0000": "Jetson Nano (developer kit)",
    "p3448-0002": "Jetson Nano",
    "p3448-0003": "Jetson Nano 2GB",
    "p3310-1000": "Jetson TX2",
    "p3489-0000": "Jetson TX2i",
    "p3489-0888": "Jetson TX2 4GB",
    "p3636-0001": "Jetson TX2 NX",
    "p2180-1000": "Jetson TX1",
}
# Tegra SoC -> (family, integrated GPU, its CUDA compute capability). The soc_id is the chip id
# /sys/devices/soc0/soc_id reports, for trees without a device tree (some containers).
TEGRA_SOCS: dict[str, tuple[str, str, str]] = {
    "tegra234": ("Orin", "Orin (nvgpu, Ampere)", "8.7"),
    "tegra194": ("Xavier", "Xavier (nvgpu, Volta)", "7.2"),
    "tegra186": ("TX2", "TX2 (nvgpu, Pascal)", "6.2"),
    "tegra210": ("Nano/TX1", "Tegra X1 (nvgpu, Maxwell)", "5.3"),
}
TEGRA_SOC_IDS = {"35": "tegra234", "25": "tegra194", "24": "tegra186", "33": "tegra210"}

# L4T release -> JetPack, from NVIDIA's release notes; a release not listed falls back to its major.
# fmt: off
JETPACK_BY_L4T: dict[str, str] = {
    "32.4.3": "4.4", "32.4.4": "4.4.1", "32.5.0": "4.5", "32.5.1": "4.5.1", "32.5.2": "4.5.1",
    "32.6.1": "4.6", "32.7.1": "4.6.1", "32.7.2": "4.6.2", "32.7.3": "4.6.3", "32.7.4": "4.6.4",
    "32.7.5": "4.6.5", "32.7.6": "4.6.6", "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1",
    "35.4.1": "5.1.2", "35.5.0": "5.1.3", "35.6.0": "5.1.4", "35.6.1": "5.1.5", "36.2.0": "6.0 DP",
    "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
}
# fmt: on
JETPACK_BY_L4T_MAJOR = {"32": "4.x", "35": "5.x", "36": "6.x", "38": "7.x"}

# NVIDIA GPU model name -> compute capability, for driver files that do not state it. First match
# wins, so more specific patterns come first.
GPU_COMPUTE_CAPABILITY: list[tuple[str, str]] = [
    (r"\bH100|\bH200|\bGH200", "9.0"),
    (r"\bB200|\bGB200", "10.0"),
    (r"GeForce RTX 50\d0|RTX PRO \d000 Blackwell", "12.0"),
    (r"\bL4\b|\bL40S?\b|GeForce RTX 40\d0|RTX \d000 Ada", "8.9"),
    (r"\bA100\b|\bA30\b", "8.0"),
    (r"\bA2\b|\bA10G?\b|\bA16\b|\bA40\b|RTX A\d{3,4}\b|GeForce RTX 30\d0", "8.6"),
    (r"\bT4\b|\bT400\b|\bT600\b|\bT1000\b|GeForce RTX 20\d0|Quadro RTX|GeForce GTX 16\d0|TITAN RTX", "7.5"),
    (r"\bV100\b|TITAN V\b", "7.0"),
    (r"\bP100\b", "6.0"),
    (r"\bP4\b|\bP40\b|GeForce GTX 10\d0|TITAN Xp|Quadro P\d+", "6.1"),
]

CUDNN_HEADERS = (
    "usr/include/cudnn_version.h",
    "usr/include/*-linux-gnu/cudnn_version*.h",
    "usr/local/cuda/include/cudnn_version.h",
    "usr/include/cudnn.h",  # cuDNN 7 kept the version in the main header
)
TENSORRT_HEADERS = ("usr/include/*-linux-gnu/NvInferVersion.h", "usr/include/NvInferVersion.h")


@dataclass(frozen=True)
class CpuInfo:
    vendor: str = ""
    model: str = ""
    # The core's LLVM -mcpu name on ARM (cortex-a76, carmel); None on x86 and unknown cores.
    core: str | None = None
    flags: list[str] = field(default_factory=list)
    family: int | None = None  # x86 `cpu family` / `model`: what llvm_target maps to a -mcpu
    model_id: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str | None = None
    integrated: bool = False
    bus: str | None = None


@dataclass(frozen=True)
class HardwareProfile:
    arch: str
    cpu_count: int
    memory_bytes: int
    jetson: str | None = None  # the Jetson module ("Jetson AGX Orin 64GB"), None off Jetson
    nvidia_gpu: bool = False
    runtimes: dict[str, bool] = field(default_factory=dict)
    onnxruntime_providers: list[str] = field(default_factory=list)
    cpu: CpuInfo = field(default_factory=CpuInfo)
    board: str | None = None  # the device tree's model line, on boards that have one
    l4t: str | None = None
    jetpack: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    nvidia_driver: str | None = None
    cuda: str | None = None
    cudnn: str | None = None
    tensorrt: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _read(root: Path, relative: str) -> str | None:
    try:
        return (root / relative).read_text(errors="replace")
    except OSError:
        return None


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    return blocks


def _hex(value: str | None) -> int | None:
    try:
        return int(value, 16) if value else None
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    try:
        return int(value, 0) if value else None
    except ValueError:
        return None


def _core_title(core: str) -> str:
    """cortex-a78ae -> Cortex-A78AE, neoverse-n1 -> Neoverse-N1, carmel -> Carmel."""
    family, _, name = core.partition("-")
    return f"{family.capitalize()}-{name.upper()}" if name else core.capitalize()


def _cpu(blocks: list[dict[str, str]]) -> CpuInfo:
    cores = [b for b in blocks if "processor" in b and ("flags" in b or "Features" in b)]
    if not cores:
        return CpuInfo()
    first = cores[0]
    if "vendor_id" in first:
        return CpuInfo(
            vendor=first["vendor_id"],
            model=first.get("model name", ""),
            flags=sorted(set(first.get("flags", "").split())),
            family=_int(first.get("cpu family")),
            model_id=_int(first.get("model")),
        )
    implementer, part = _hex(first.get("CPU implementer")), _hex(first.get("CPU part"))
    core = ARM_CORES.get((implementer, part)) if implementer is not None and part is not None else None
    vendor = ARM_VENDORS.get(implementer or -1, f"implementer {first.get('CPU implementer', '?')}")
    model = f"{vendor} {_core_title(core) if core else 'part ' + first.get('CPU part', '?')}"
    return CpuInfo(vendor=vendor, model=model, core=core, flags=sorted(set(first["Features"].split())))


def _arch(root: Path, blocks: list[dict[str, str]]) -> str:
    if root == REAL_ROOT or not blocks:
        return platform.machine()
    first = blocks[0]
    if "vendor_id" in first:
        return "x86_64" if "lm" in first.get("flags", "").split() else "i686"
    if first.get("CPU architecture") == "8" or "asimd" in first.get("Features", "").split():
        return "aarch64"
    return f"armv{first.get('CPU architecture', '7')}l"


def _cpu_count(root: Path, blocks: list[dict[str, str]]) -> int:
    if root == REAL_ROOT:
        # The CPUs this process may run on, which is what thread pools should size for.
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    online = (_read(root, "sys/devices/system/cpu/online") or "").strip()
    count = 0
    for span in filter(None, online.split(",")):
        low, _, high = span.partition("-")
        count += int(high or low) - int(low) + 1
    return count or sum(1 for b in blocks if "processor" in b) or 1


def _memory_bytes(root: Path) -> int:
    for line in (_read(root, "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) * 1024
            except (ValueError, IndexError):
                return 0
    return 0


def _device_tree(root: Path) -> tuple[str | None, list[str]]:
    model = _read(root, "proc/device-tree/model")
    compatible = _read(root, "proc/device-tree/compatible") or ""
    return (
        model.strip("\x00\n ") or None if model is not None else None,
        [c for c in compatible.split("\x00") if c.strip()],
    )


def _l4t(root: Path) -> str | None:
    text = _read(root, "etc/nv_tegra_release")
    if text is None:
        return None
    found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if not found:
        return "unknown"
    major, minor, patch = found.group(1), found.group(2), found.group(3) or "0"
    return f"{major}.{minor}.{patch}"


def jetpack_for_l4t(l4t: str) -> str | None:
    """The JetPack release that ships L4T `l4t` ("36.4.3" -> "6.2")."""
    return JETPACK_BY_L4T.get(l4t) or JETPACK_BY_L4T_MAJOR.get(l4t.split(".")[0])


def _tegra(root: Path, compatible: list[str]) -> tuple[str | None, str | None]:
    """(module name, Tegra SoC) from the device tree, else from /sys/devices/soc0."""
    soc = next((c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")), None)
    if soc is None and (_read(root, "sys/devices/soc0/family") or "").strip() == "Tegra":
        soc = TEGRA_SOC_IDS.get((_read(root, "sys/devices/soc0/soc_id") or "").strip())
    module = None
    for entry in compatible:
        for board_id in re.findall(r"p\d{4}-\d{4}", entry):
            module = JETSON_MODULES.get(board_id, module)
    if module is None and soc in TEGRA_SOCS:
        module = f"Jetson {TEGRA_SOCS[soc][0]} (unknown module)"
    return module, soc


def compute_capability_for(gpu_name: str) -> str | None:
    """The CUDA compute capability of a GPU by its marketing name, for names this table knows."""
    for pattern, capability in GPU_COMPUTE_CAPABILITY:
        if re.search(pattern, gpu_name):
            return capability
    return None


def _discrete_gpus(root: Path) -> list[GpuInfo]:
    gpus = []
    for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in info.read_text().splitlines())
        )
        name = fields.get("Model", "unknown NVIDIA GPU")
        gpus.append(GpuInfo(name, compute_capability_for(name), False, fields.get("Bus Location")))
    return gpus


def _nvidia_driver(root: Path) -> str | None:
    found = re.search(
        r"Kernel Module\s+(?:for \S+\s+)?(\d[\d.]+)", _read(root, "proc/driver/nvidia/version") or ""
    )
    return found.group(1) if found else None


def _cuda(root: Path) -> str | None:
    folders = [root / "usr/local/cuda", *sorted((root / "usr/local").glob("cuda-*"), reverse=True)]
    for folder in folders:
        try:
            return str(json.loads((folder / "version.json").read_text())["cuda"]["version"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        found = re.search(r"CUDA Version\s+(\S+)", _read(folder, "version.txt") or "")
        if found:
            return found.group(1)
    return None


def _header_defines(path: Path) -> dict[str, str]:
    defines: dict[str, str] = {}
    for name, value in re.findall(r"^\s*#define\s+(\w+)\s+(\w+)", path.read_text(errors="replace"), re.M):
        defines[name] = value
    return defines


def _header_version(root: Path, patterns: tuple[str, ...], parts: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        for header in sorted(root.glob(pattern), reverse=True):
            defines = _header_defines(header)
            values = []
            for part in parts:
                value = defines.get(part)
                # TensorRT 10 defines NV_TENSORRT_MAJOR as another macro (TRT_MAJOR_ENTERPRISE).
                while value is not None and not value.isdigit():
                    value = defines.get(value)
                values.append(value)
            if all(values):
                return ".".join(v for v in values if v is not None)
    return None


# Distributions that install the `tensorrt` module: the pip wheels per CUDA major, and JetPack's.
TENSORRT_DISTRIBUTIONS = (
    "tensorrt",
    "tensorrt-cu13",
    "tensorrt-cu12",
    "tensorrt-cu11",
    "tensorrt-cu13-bindings",
    "tensorrt-cu12-bindings",
    "tensorrt-cu11-bindings",
)


def _tensorrt_version(root: Path) -> str | None:
    if root == REAL_ROOT and _importable("tensorrt"):
        # The Python package is what the backend imports, so its version wins over system headers.
        for dist in TENSORRT_DISTRIBUTIONS:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
    return _header_version(
        root,
        TENSORRT_HEADERS,
        ("NV_TENSORRT_MAJOR", "NV_TENSORRT_MINOR", "NV_TENSORRT_PATCH", "NV_TENSORRT_BUILD"),
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a dotted name whose parent package is missing
        return False


def runtimes_here() -> dict[str, bool]:
    """Which runtimes this Python can import; found by spec so no heavy library is loaded."""
    return {
        "onnxruntime": _importable("onnxruntime"),
        "tensorrt": _importable("tensorrt"),
        "cuda-python": _importable("cuda.bindings") or _importable("cuda.cudart"),
        "tvm": _importable("tvm"),
        "litert": _importable("ai_edge_litert") or _importable("tflite_runtime"),
    }


def _ort_providers() -> list[str]:
    if not _importable("onnxruntime"):
        return []
    import onnxruntime  # the provider list exists only inside the library

    return list(onnxruntime.get_available_providers())


def probe(root: Path = REAL_ROOT) -> HardwareProfile:
    """Probe the machine; `root` lets tests point it at a recorded /proc, /sys, /etc and /usr tree."""
    blocks = _cpuinfo_blocks(_read(root, "proc/cpuinfo") or "")
    board, compatible = _device_tree(root)
    l4t = _l4t(root)
    module, soc = _tegra(root, compatible)
    if module is None and l4t is not None:
        module = "Jetson (unknown module)"
    gpus = _discrete_gpus(root)
    if soc in TEGRA_SOCS:
        gpus.insert(0, GpuInfo(TEGRA_SOCS[soc][1], TEGRA_SOCS[soc][2], integrated=True))
    return HardwareProfile(
        arch=_arch(root, blocks),
        cpu_count=_cpu_count(root, blocks),
        memory_bytes=_memory_bytes(root),
        jetson=module,
        nvidia_gpu=bool(gpus) or (root / "proc/driver/nvidia/gpus").is_dir(),
        runtimes=runtimes_here(),
        onnxruntime_providers=_ort_providers(),
        cpu=_cpu(blocks),
        board=board,
        l4t=l4t,
        jetpack=jetpack_for_l4t(l4t) if l4t else None,
        gpus=gpus,
        nvidia_driver=_nvidia_driver(root),
        cuda=_cuda(root),
        cudnn=_header_version(root, CUDNN_HEADERS, ("CUDNN_MAJOR", "CUDNN_MINOR", "CUDNN_PATCHLEVEL")),
        tensorrt=_tensorrt_version(root),
    )


# -- LLVM target for TVM ---------------------------------------------------------------------------
# Intel family 6 models -> LLVM -mcpu. A name is used only when the flags confirm the ISA it implies
# (hypervisors often mask AVX-512), else the x86-64 level the flags support.
INTEL_CPUS: dict[int, str] = {
    **dict.fromkeys((0x3C, 0x3F, 0x45, 0x46), "haswell"),
    **dict.fromkeys((0x3D, 0x47, 0x4F, 0x56), "broadwell"),
    **dict.fromkeys((0x4E, 0x5E, 0x8E, 0x9E, 0xA5, 0xA6), "skylake"),
    0x55: "skylake-avx512",
    **dict.fromkeys((0x6A, 0x6C), "icelake-server"),
    **dict.fromkeys((0x7D, 0x7E), "icelake-client"),
    **dict.fromkeys((0x8C, 0x8D), "tigerlake"),
    0xA7: "rocketlake",
    **dict.fromkeys((0x97, 0x9A, 0xBE), "alderlake"),
    **dict.fromkeys((0xB7, 0xBA, 0xBF), "raptorlake"),
    **dict.fromkeys((0xAA, 0xAC), "meteorlake"),
    0x8F: "sapphirerapids",
    0xCF: "emeraldrapids",
    **dict.fromkeys((0xAD, 0xAE), "graniterapids"),
}
# fmt: off
AVX512_CPUS = {
    "skylake-avx512", "cascadelake", "cooperlake", "icelake-server", "icelake-client", "tigerlake",
    "rocketlake", "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5",
}
# fmt: on
X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx2", "bmi1", "bmi2", "fma", "movbe", "f16c", "abm"}),
    ("x86-64-v2", {"sse4_2", "popcnt", "ssse3", "cx16"}),
)
# Kernel Features names -> LLVM -mattr, for what the core name may not imply on every LLVM.
# fmt: off
ARM_ATTRS = {
    "asimd": "+neon", "asimdhp": "+fullfp16", "asimddp": "+dotprod", "i8mm": "+i8mm", "bf16": "+bf16",
}
# fmt: on


def _x86_cpu(cpu: CpuInfo) -> str:
    flags = set(cpu.flags)
    name: str | None = None
    if cpu.vendor == "GenuineIntel" and cpu.family == 6 and cpu.model_id is not None:
        name = INTEL_CPUS.get(cpu.model_id)
        if name == "skylake-avx512":  # one model number for three server generations
            name = (
                "cooperlake" if "avx512_bf16" in flags else "cascadelake" if "avx512_vnni" in flags else name
            )
    elif cpu.vendor == "AuthenticAMD" and cpu.family is not None and cpu.model_id is not None:
        if cpu.family == 0x17:
            name = "znver2" if cpu.model_id >= 0x30 else "znver1"
        elif cpu.family == 0x19:
            zen4 = 0x10 <= cpu.model_id <= 0x1F or 0x60 <= cpu.model_id <= 0x7F or cpu.model_id >= 0xA0
            name = "znver4" if zen4 else "znver3"
        elif cpu.family == 0x1A:
            name = "znver5"
    needs = {"avx2", "avx512f"} if name in AVX512_CPUS else {"avx2"}
    if name is not None and needs <= flags:
        return name
    return next((level for level, needs in X86_LEVELS if needs <= flags), "x86-64")


def llvm_target_parts(profile: HardwareProfile) -> dict[str, Any]:
    """The LLVM target for this CPU as TVM's JSON target form: kind, mtriple, mcpu, mattr."""
    if profile.arch in ("x86_64", "amd64"):
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": _x86_cpu(profile.cpu)}
    if profile.arch in ("aarch64", "arm64"):
        flags = set(profile.cpu.flags)
        attrs = [attr for feature, attr in ARM_ATTRS.items() if feature in flags]
        return {
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mcpu": profile.cpu.core or "generic",
            "mattr": attrs or ["+neon"],
        }
    raise ValueError(f"no LLVM target for architecture {profile.arch!r}; TVM backs x86_64 and aarch64 only")


def llvm_target(profile: HardwareProfile) -> str:
    """The target as one string ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76 -mattr=+neon,...").

    TVM 0.22+ wants the dict form (`llvm_target_parts`); this string is for logs and cache keys.
    """
    parts = llvm_target_parts(profile)
    text = f"llvm -mtriple={parts['mtriple']} -mcpu={parts['mcpu']}"
    if parts.get("mattr"):
        text += " -mattr=" + ",".join(parts["mattr"])
    return text


# -- text output -----------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def format_profile(profile: HardwareProfile, backend_order: list[str] | None = None) -> str:
    """The profile as aligned `key  value` lines for `edgefleet device probe`."""
    cpu = profile.cpu
    lines = [
        ("arch", profile.arch),
        ("cpu", f"{cpu.model or 'unknown'} x{profile.cpu_count}"),
        ("cpu flags", _interesting_flags(profile)),
        ("memory", _gib(profile.memory_bytes)),
    ]
    if profile.board:
        lines.append(("board", profile.board))
    if profile.jetson:
        detail = ", ".join(
            p
            for p in (
                f"L4T {profile.l4t}" if profile.l4t else "",
                f"JetPack {profile.jetpack}" if profile.jetpack else "",
            )
            if p
        )
        lines.append(("jetson", f"{profile.jetson}" + (f" ({detail})" if detail else "")))
    for gpu in profile.gpus:
        capability = f"sm_{gpu.compute_capability.replace('.', '')}" if gpu.compute_capability else "sm_?"
        lines.append(("gpu", f"{gpu.name}, {capability}" + (f", {gpu.bus}" if gpu.bus else "")))
    if not profile.gpus:
        lines.append(("gpu", "no NVIDIA GPU" if not profile.nvidia_gpu else "NVIDIA GPU (model unknown)"))
    for key, value in (
        ("nvidia driver", profile.nvidia_driver),
        ("cuda", profile.cuda),
        ("cudnn", profile.cudnn),
        ("tensorrt", profile.tensorrt),
    ):
        lines.append((key, value or "-"))
    present = [name for name, ok in profile.runtimes.items() if ok]
    missing = [name for name, ok in profile.runtimes.items() if not ok]
    lines.append(("runtimes", ", ".join(present) or "none"))
    lines.append(("runtimes missing", ", ".join(missing) or "none"))
    if profile.onnxruntime_providers:
        lines.append(("onnxruntime providers", ", ".join(profile.onnxruntime_providers)))
    with contextlib.suppress(ValueError):
        lines.append(("llvm target", llvm_target(profile)))
    if backend_order is not None:
        lines.append(("backend order", " > ".join(backend_order)))
    width = max(len(key) for key, _ in lines) + 2
    return "\n".join(f"{key:<{width}}{value}" for key, value in lines) + "\n"


# fmt: off
INTERESTING_FLAGS = (
    "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx2", "fma", "avx", "sse4_2",
    "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2",
)
# fmt: on


def _interesting_flags(profile: HardwareProfile) -> str:
    """The flags that change which kernels a backend can use; the full list is in --json."""
    flags = set(profile.cpu.flags)
    return " ".join(f for f in INTERESTING_FLAGS if f in flags) or "-"
