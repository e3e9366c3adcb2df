from pathlib import Path

from device.engine.probe import probe


def test_probe_reads_a_recorded_jetson_tree(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic\n"
    )
    (tmp_path / "proc/driver/nvidia/gpus").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text("MemTotal:       65536000 kB\nMemFree: 1 kB\n")
    profile = probe(tmp_path)
    assert profile.jetson is not None and profile.jetson.startswith("R36")
    assert profile.nvidia_gpu and profile.memory_bytes == 65536000 * 1024


def test_probe_of_this_machine_lists_onnxruntime() -> None:
    profile = probe()
    assert profile.runtimes["onnxruntime"] and "CPUExecutionProvider" in profile.onnxruntime_providers
    assert profile.cpu_count >= 1
