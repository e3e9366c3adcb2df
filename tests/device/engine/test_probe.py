"""The probe read against recorded trees of five machines (fixtures/README.md), and this machine."""

import json
import platform
import shutil
from pathlib import Path
from typing import Any

import pytest

from device.engine.probe import (
    HardwareProfile,
    compute_capability_for,
    format_profile,
    jetpack_for_l4t,
    llvm_target,
    llvm_target_parts,
    probe,
)

FIXTURES = Path(__file__).parent / "fixtures"
GIB = 2**30

EXPECTED: dict[str, dict[str, Any]] = {
    "orin_agx": {
        "arch": "aarch64",
        "cpu_count": 12,
        "memory_bytes": 64335836 * 1024,
        "jetson": "Jetson AGX Orin 64GB",
        "board": "NVIDIA Jetson AGX Orin Developer Kit",
        "l4t": "36.4.3",
        "jetpack": "6.2",
        "core": "cortex-a78ae",
        "cpu_model": "ARM Cortex-A78AE",
        "gpus": [("Orin (nvgpu, Ampere)", "8.7", True)],
        "nvidia_driver": None,
        "cuda": "12.6.68",
        "cudnn": "9.3.0",
        "tensorrt": "10.3.0.30",
        "llvm": "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a78ae -mattr=+neon,+fullfp16,+dotprod",
    },
    "xavier_nx": {
        "arch": "aarch64",
        "cpu_count": 6,
        "memory_bytes": 7773104 * 1024,
        "jetson": "Jetson Xavier NX (developer kit)",
        "board": "NVIDIA Jetson Xavier NX Developer Kit",
        "l4t": "32.7.4",
        "jetpack": "4.6.4",
        "core": "carmel",
        "cpu_model": "NVIDIA Carmel",
        "gpus": [("Xavier (nvgpu, Volta)", "7.2", True)],
        "nvidia_driver": None,
        "cuda": "10.2.300",
        "cudnn": "8.2.1",
        "tensorrt": "8.2.1.8",
        "llvm": "llvm -mtriple=aarch64-linux-gnu -mcpu=carmel -mattr=+neon,+fullfp16",
    },
    "rpi5": {
        "arch": "aarch64",
        "cpu_count": 4,
        "memory_bytes": 8245328 * 1024,
        "jetson": None,
        "board": "Raspberry Pi 5 Model B Rev 1.0",
        "l4t": None,
        "jetpack": None,
        "core": "cortex-a76",
        "cpu_model": "ARM Cortex-A76",
        "gpus": [],
        "nvidia_driver": None,
        "cuda": None,
        "cudnn": None,
        "tensorrt": None,
        "llvm": "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a76 -mattr=+neon,+fullfp16,+dotprod",
    },
    "x86_gpu": {
        "arch": "x86_64",
        "cpu_count": 24,
        "memory_bytes": 131598676 * 1024,
        "jetson": None,
        "board": None,
        "l4t": None,
        "jetpack": None,
        "core": None,
        "cpu_model": "Intel(R) Xeon(R) Silver 4310 CPU @ 2.10GHz",
        "gpus": [("Tesla T4", "7.5", False)],
        "nvidia_driver": "550.127.05",
        "cuda": "12.4.1",
        "cudnn": "9.1.0",
        "tensorrt": "10.0.1.6",
        "llvm": "llvm -mtriple=x86_64-linux-gnu -mcpu=icelake-server",
    },
    "x86_cpu": {
        "arch": "x86_64",
        "cpu_count": 6,
        "memory_bytes": 16231580 * 1024,
        "jetson": None,
        "board": None,
        "l4t": None,
        "jetpack": None,
        "core": None,
        "cpu_model": "Intel(R) Core(TM) i5-8500T CPU @ 2.10GHz",
        "gpus": [],
        "nvidia_driver": None,
        "cuda": None,
        "cudnn": None,
        "tensorrt": None,
        "llvm": "llvm -mtriple=x86_64-linux-gnu -mcpu=skylake",
    },
}


@pytest.mark.parametrize("machine", sorted(EXPECTED))
def test_profile_of_each_recorded_machine(machine: str) -> None:
    want = EXPECTED[machine]
    profile = probe(FIXTURES / machine)
    assert profile.arch == want["arch"]
    assert profile.cpu_count == want["cpu_count"]
    assert profile.memory_bytes == want["memory_bytes"]
    assert profile.jetson == want["jetson"] and profile.board == want["board"]
    assert (profile.l4t, profile.jetpack) == (want["l4t"], want["jetpack"])
    assert profile.cpu.core == want["core"] and profile.cpu.model == want["cpu_model"]
    assert [(g.name, g.compute_capability, g.integrated) for g in profile.gpus] == want["gpus"]
    assert profile.nvidia_gpu is bool(want["gpus"])
    assert profile.nvidia_driver == want["nvidia_driver"]
    assert (profile.cuda, profile.cudnn, profile.tensorrt) == (want["cuda"], want["cudnn"], want["tensorrt"])
    assert llvm_target(profile) == want["llvm"]


@pytest.mark.parametrize(
    ("machine", "present", "absent"),
    [
        ("orin_agx", {"asimd", "asimddp", "asimdhp", "atomics"}, {"sve", "i8mm"}),
        ("xavier_nx", {"asimd", "asimdhp", "dcpop"}, {"asimddp"}),
        ("rpi5", {"asimd", "asimddp", "asimdhp"}, {"sve"}),
        ("x86_gpu", {"avx2", "avx512f", "avx512_vnni", "fma"}, {"amx_tile"}),
        ("x86_cpu", {"avx2", "fma", "sse4_2"}, {"avx512f"}),
    ],
)
def test_cpu_flags(machine: str, present: set[str], absent: set[str]) -> None:
    flags = set(probe(FIXTURES / machine).cpu.flags)
    assert present <= flags and not absent & flags


def test_text_output_of_a_jetson() -> None:
    text = format_profile(probe(FIXTURES / "orin_agx"), ["tensorrt", "onnxruntime-cpu"])
    lines = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in text.splitlines()}
    assert lines["jetson"] == "Jetson AGX Orin 64GB (L4T 36.4.3, JetPack 6.2)"
    assert lines["gpu"] == "Orin (nvgpu, Ampere), sm_87"
    assert lines["cpu"] == "ARM Cortex-A78AE x12" and lines["memory"] == "61.4 GiB"
    assert lines["tensorrt"] == "10.3.0.30" and lines["cuda"] == "12.6.68"
    assert lines["backend order"] == "tensorrt > onnxruntime-cpu"
    assert lines["llvm target"].startswith("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a78ae")


def test_text_output_of_a_box_without_gpu() -> None:
    text = format_profile(probe(FIXTURES / "x86_cpu"))
    assert "no NVIDIA GPU" in text and "jetson" not in text and "backend order" not in text
    assert "avx2 fma avx sse4_2" in text


@pytest.mark.parametrize("machine", sorted(EXPECTED))
def test_json_output_keeps_the_field_names_others_read(machine: str) -> None:
    profile = probe(FIXTURES / machine)
    data = json.loads(profile.to_json())
    for key in (
        "arch",
        "cpu_count",
        "memory_bytes",
        "jetson",
        "nvidia_gpu",
        "runtimes",
        "onnxruntime_providers",
    ):
        assert data[key] == getattr(profile, key)
    assert data["cpu"]["flags"] == profile.cpu.flags
    assert [g["compute_capability"] for g in data["gpus"]] == [g[1] for g in EXPECTED[machine]["gpus"]]
    assert data == profile.to_dict()


def test_a_jetson_without_a_device_tree_is_known_by_soc0(tmp_path: Path) -> None:
    """Some containers hide /proc/device-tree; /sys/devices/soc0 still names the SoC."""
    root = Path(shutil.copytree(FIXTURES / "orin_agx", tmp_path / "orin"))
    shutil.rmtree(root / "proc/device-tree")
    profile = probe(root)
    assert profile.jetson == "Jetson Orin (unknown module)" and profile.board is None
    assert profile.gpus[0].compute_capability == "8.7" and profile.nvidia_gpu


def test_a_bare_tegra_release_still_reads_as_a_jetson(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref\n"
    )
    (tmp_path / "proc/driver/nvidia/gpus").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text("MemTotal:       65536000 kB\nMemFree: 1 kB\n")
    profile = probe(tmp_path)
    assert profile.jetson == "Jetson (unknown module)" and (profile.l4t, profile.jetpack) == (
        "35.5.0",
        "5.1.3",
    )
    assert profile.nvidia_gpu and profile.memory_bytes == 65536000 * 1024


def test_an_empty_tree_gives_this_platform_and_no_hardware(tmp_path: Path) -> None:
    profile = probe(tmp_path)
    assert profile.arch == platform.machine() and profile.memory_bytes == 0
    assert profile.jetson is None and not profile.nvidia_gpu and profile.gpus == []
    assert profile.cuda is None and profile.tensorrt is None and profile.cpu_count == 1


def test_a_masked_avx512_falls_back_to_what_the_flags_allow(tmp_path: Path) -> None:
    """A hypervisor that hides AVX-512 from an Ice Lake guest must not get -mcpu=icelake-server."""
    root = Path(shutil.copytree(FIXTURES / "x86_gpu", tmp_path / "vm"))
    cpuinfo = root / "proc/cpuinfo"
    lines = cpuinfo.read_text().splitlines()
    masked = [
        " ".join(f for f in line.split(" ") if not f.startswith("avx512"))
        if line.startswith("flags")
        else line
        for line in lines
    ]
    cpuinfo.write_text("\n".join(masked) + "\n")
    profile = probe(root)
    assert "avx512f" not in profile.cpu.flags
    assert llvm_target_parts(profile)["mcpu"] == "x86-64-v3"


def test_the_open_kernel_module_version_line(tmp_path: Path) -> None:
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs@U16)\n"
    )
    assert probe(tmp_path).nvidia_driver == "570.86.15"


@pytest.mark.parametrize(
    ("l4t", "jetpack"),
    [
        ("36.4.3", "6.2"),
        ("36.3.0", "6.0"),
        ("35.5.0", "5.1.3"),
        ("32.7.4", "4.6.4"),
        ("36.9.9", "6.x"),
        ("1.0", None),
    ],
)
def test_jetpack_from_l4t(l4t: str, jetpack: str | None) -> None:
    assert jetpack_for_l4t(l4t) == jetpack


@pytest.mark.parametrize(
    ("name", "capability"),
    [
        ("Tesla T4", "7.5"),
        ("Quadro RTX 4000", "7.5"),
        ("NVIDIA GeForce RTX 4090", "8.9"),
        ("NVIDIA RTX 4000 Ada Generation", "8.9"),
        ("NVIDIA RTX A2000 12GB", "8.6"),
        ("NVIDIA A100-SXM4-40GB", "8.0"),
        ("NVIDIA H100 80GB HBM3", "9.0"),
        ("NVIDIA L4", "8.9"),
        ("Tesla P100-PCIE-16GB", "6.0"),
        ("NVIDIA Imaginary 9000", None),
    ],
)
def test_compute_capability_by_gpu_name(name: str, capability: str | None) -> None:
    assert compute_capability_for(name) == capability


@pytest.mark.parametrize("machine", sorted(EXPECTED))
def test_llvm_knows_each_target_cpu(machine: str) -> None:
    tvm = pytest.importorskip("tvm", reason="TVM's LLVM checks the CPU names (pip install apache-tvm)")
    from tvm.target import codegen

    parts = llvm_target_parts(probe(FIXTURES / machine))
    known = codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": parts["mtriple"]}))
    assert parts["mcpu"] in known
    tvm.target.Target(parts)  # TVM accepts the whole dict, -mattr included


def test_llvm_target_refuses_an_architecture_tvm_does_not_build_for() -> None:
    with pytest.raises(ValueError, match="x86_64 and aarch64"):
        llvm_target(HardwareProfile(arch="riscv64", cpu_count=1, memory_bytes=0))


def test_probe_of_this_machine_lists_onnxruntime() -> None:
    profile = probe()
    assert profile.runtimes["onnxruntime"] and "CPUExecutionProvider" in profile.onnxruntime_providers
    assert profile.cpu_count >= 1 and profile.arch == platform.machine()
    assert profile.memory_bytes > 0 and profile.cpu.flags
