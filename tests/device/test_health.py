"""The device health report: sysfs trees laid out as real boards have them, this machine's real netlink
and engine, and the vendor tools' output (NVIDIA GPUs and Jetsons are not here: a script prints the
recorded output in place of the binary; the real subprocess handling runs up to it)."""

import asyncio
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from device.engine.engine import Engine
from device.health import collect, model_health
from device.sysinfo import SysinfoConfig, read_system
from device.sysinfo.links import read_links
from device.sysinfo.load import read_load
from device.sysinfo.nvidia_smi import parse_nvidia_smi, read_nvidia_gpus
from device.sysinfo.tegrastats import gpu_from_sample, jetson_model, parse_tegrastats, read_tegrastats
from device.sysinfo.thermal import read_temperatures
from models.manifest import load_manifest
from protocol.messages import (
    HEALTH_MAX_LINKS,
    HEALTH_MAX_TEMPERATURES,
    Health,
    ModelHealth,
    UpdateState,
    decode,
    encode,
)

FIXTURES = Path(__file__).parent / "fixtures" / "health"
X86 = FIXTURES / "x86_box"
ORIN = FIXTURES / "agx_orin_jp5"
GIB = 1024**3
MIB = 1024**2


def tool(tmp_path: Path, name: str, body: str) -> str:
    """An executable standing in for a vendor tool that needs hardware this machine lacks."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def streaming_tegrastats(tmp_path: Path, line_file: Path, pid_file: Path) -> str:
    # Like the real one: a line per interval, forever, until it is stopped.
    return tool(
        tmp_path,
        "tegrastats",
        f"import os, sys, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        f"line = open({str(line_file)!r}).read().strip()\n"
        "while True:\n    print(line, flush=True)\n    time.sleep(1)\n",
    )


# -- temperatures and load ------------------------------------------------------------------------
def test_x86_sensors_in_zone_then_chip_order_with_broken_ones_left_out() -> None:
    temps = [(t.sensor, t.celsius, t.source) for t in read_temperatures(X86)]
    assert temps == [
        ("acpitz", 27.8, "thermal"),
        ("x86_pkg_temp", 45.0, "thermal"),
        # thermal_zone2 reads nothing (sensor gone); zone 10 sorts after 2, not after 1
        ("INT3400 Thermal", 20.0, "thermal"),
        ("acpitz/temp1", 27.8, "hwmon"),
        ("coretemp/Package id 0", 45.0, "hwmon"),
        ("coretemp/Core 0", 43.0, "hwmon"),
        ("coretemp/Core 8", 44.0, "hwmon"),
        ("nvme/Composite", 38.85, "hwmon"),
        ("nvme/Sensor 1", 38.85, "hwmon"),
        ("nct6798/SYSTIN", 33.0, "hwmon"),
        # AUXTIN0 (-128 C, unconnected) is dropped; an input without a label is named by number
        ("nct6798/temp3", 31.5, "hwmon"),
    ]


def test_orin_powered_down_blocks_are_not_readings() -> None:
    temps = {t.sensor: t.celsius for t in read_temperatures(ORIN)}
    assert temps["CPU-therm"] == pytest.approx(43.187)
    assert temps["tj-therm"] == pytest.approx(43.187)
    assert temps["tmp451/temp2"] == pytest.approx(33.75)
    assert not [name for name in temps if name.startswith("CV")]  # -256 C: DLA/PVA powered down
    assert jetson_model(ORIN) == "NVIDIA Jetson AGX Orin Developer Kit iGPU"


def test_many_sensors_are_capped_not_refused(tmp_path: Path) -> None:
    for i in range(HEALTH_MAX_TEMPERATURES + 20):
        zone = tmp_path / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(f"zone-{i}\n")
        (zone / "temp").write_text("30000\n")
    temps = read_temperatures(tmp_path)
    assert len(temps) == HEALTH_MAX_TEMPERATURES
    assert temps[-1].sensor == f"zone-{HEALTH_MAX_TEMPERATURES - 1}"


def test_load_average_from_proc() -> None:
    load = read_load(X86)
    assert load is not None
    assert (load.load1, load.load5, load.load15) == (0.52, 0.58, 0.61)
    assert read_load(FIXTURES / "empty") is None


def test_real_proc_has_a_load_average() -> None:
    load = read_load()
    assert load is not None and load.load1 >= 0 and load.cpus == os.cpu_count()


# -- network links over real netlink --------------------------------------------------------------
def loopback_roundtrip(size: int) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as client:
        peer, _ = server.accept()
        with peer:
            client.sendall(b"x" * size)
            got = 0
            while got < size:
                got += len(peer.recv(65536))


def test_loopback_counters_move_with_real_traffic() -> None:
    before = {link.name: link for link in read_links(include_loopback=True)}
    assert "lo" in before, "every Linux netns has lo"
    assert "127.0.0.1/8" in before["lo"].addresses
    assert before["lo"].operstate in ("UNKNOWN", "UP")
    loopback_roundtrip(256 * 1024)
    after = {link.name: link for link in read_links(include_loopback=True)}
    assert after["lo"].rx_bytes - before["lo"].rx_bytes >= 256 * 1024
    assert after["lo"].tx_packets > before["lo"].tx_packets


def test_loopback_is_left_out_by_default_and_other_links_carry_counters() -> None:
    links = read_links()
    assert "lo" not in [link.name for link in links]
    with open("/proc/net/dev") as f:
        others = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    others = [name for name in others if name != "lo"]
    if not others:
        pytest.skip("this machine has no link but lo")
    names = sorted(link.name for link in links)
    assert names == sorted(others) if len(others) <= HEALTH_MAX_LINKS else len(names) == HEALTH_MAX_LINKS
    up = [link for link in links if link.operstate == "UP"]
    if up:
        assert links[0].operstate == "UP", "links that are up come first, so the cap drops idle ones"
        assert up[0].mac and up[0].mtu and up[0].rx_packets > 0


def test_links_read_inside_a_running_event_loop() -> None:
    async def main() -> list[str]:
        return [link.name for link in read_links(include_loopback=True)]

    assert "lo" in asyncio.run(main())


def test_link_reads_leave_no_socket_open() -> None:
    read_links()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        read_links()
    assert len(os.listdir("/proc/self/fd")) <= before


# -- NVIDIA GPUs through nvidia-smi ---------------------------------------------------------------
def test_nvidia_smi_h100() -> None:
    (gpu,) = parse_nvidia_smi((FIXTURES / "nvidia-smi/h100.csv").read_text())
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.source == "nvidia-smi"
    assert gpu.utilization_percent == 0 and gpu.temperature_c == 31 and gpu.power_w == pytest.approx(69.56)
    assert gpu.memory_total_bytes == 81559 * MIB and gpu.memory_used_bytes == MIB
    assert gpu.clock_mhz == 345 and not gpu.memory_shared


def test_nvidia_smi_unknown_fields_are_absent_not_zero() -> None:
    t4, rtx = parse_nvidia_smi((FIXTURES / "nvidia-smi/two_gpus.csv").read_text())
    assert (t4.index, t4.utilization_percent, t4.power_w) == (0, 37.0, 31.2)
    assert (rtx.index, rtx.utilization_percent, rtx.power_w) == (1, None, None)
    assert rtx.memory_used_bytes == 512 * MIB
    (orin,) = parse_nvidia_smi((FIXTURES / "nvidia-smi/jetson_jp6.csv").read_text())
    assert (
        orin.name == "Orin (nvgpu)" and orin.utilization_percent is None and orin.memory_total_bytes is None
    )


def test_nvidia_smi_rows_that_do_not_parse_are_skipped() -> None:
    text = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    text += "x, name, 1, 2, 3, 4, 5, 6\n0, Tesla T4, 101, 1, 2, 3, 4, 5\n1, Tesla T4, 5, 1, 2, 3, 4, 5\n"
    gpus = parse_nvidia_smi(text)
    assert [(g.index, g.utilization_percent) for g in gpus] == [(0, 100.0), (1, 5.0)]


def test_nvidia_smi_binary_output_failure_and_hang(tmp_path: Path) -> None:
    recorded = FIXTURES / "nvidia-smi/two_gpus.csv"
    works = tool(
        tmp_path,
        "nvidia-smi",
        "import sys\nassert '--format=csv,noheader,nounits' in sys.argv, sys.argv\n"
        f"print(open({str(recorded)!r}).read(), end='')\n",
    )
    gpus = read_nvidia_gpus(works)
    assert gpus is not None and [g.name for g in gpus] == ["Tesla T4", "NVIDIA GeForce RTX 3060"]
    fails = tool(tmp_path, "nvidia-smi-fails", "import sys\nprint('No devices were found')\nsys.exit(6)\n")
    assert read_nvidia_gpus(fails) is None
    hangs = tool(tmp_path, "nvidia-smi-hangs", "import time\ntime.sleep(60)\n")
    started = time.monotonic()
    assert read_nvidia_gpus(hangs, timeout_s=0.5) is None
    assert time.monotonic() - started < 5
    assert read_nvidia_gpus(str(tmp_path / "not-installed")) is None


# -- Jetson: tegrastats ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("board", "ram_used_mb", "ram_total_mb", "gpu_percent", "gpu_mhz", "gpu_c", "rails"),
    [
        ("nano_jp4", 1766, 3964, 0, None, 23.5, {"POM_5V_IN": 2545, "POM_5V_GPU": 0, "POM_5V_CPU": 549}),
        (
            "agx_xavier_jp4",
            1964,
            31928,
            0,
            318,
            31.0,
            {"GPU": 0, "CPU": 154, "SOC": 1075, "CV": 0, "VDDRQ": 153, "SYS5V": 1650},
        ),
        ("xavier_nx_jp5", 2690, 6854, 0, 510, 37.5, {"VDD_IN": 5079, "VDD_CPU_GPU_CV": 696, "VDD_SOC": 1104}),
        (
            "agx_orin_jp5",
            7421,
            30536,
            61,
            1300,
            50.531,
            {"VDD_GPU_SOC": 9640, "VDD_CPU_CV": 3210, "VIN_SYS_5V0": 4230, "VDDQ_VDD2_1V8AO": 1108},
        ),
        (
            "orin_nano_jp6",
            3252,
            7620,
            48,
            624,
            47.468,
            {"VDD_IN": 7103, "VDD_CPU_GPU_CV": 2240, "VDD_SOC": 1841},
        ),
        (
            "agx_orin_newer",
            20642,
            62817,
            12,
            1300,
            47.625,
            {"VDD_GPU_SOC": 5139, "VDD_CPU_CV": 3268, "VIN_SYS_5V0": 5500},
        ),
    ],
)
def test_tegrastats_lines(
    board: str,
    ram_used_mb: int,
    ram_total_mb: int,
    gpu_percent: float,
    gpu_mhz: float | None,
    gpu_c: float,
    rails: dict[str, float],
) -> None:
    sample = parse_tegrastats((FIXTURES / "tegrastats" / f"{board}.txt").read_text())
    assert sample.ram_used_bytes == ram_used_mb * MIB and sample.ram_total_bytes == ram_total_mb * MIB
    assert sample.gpu_percent == gpu_percent and sample.gpu_clock_mhz == gpu_mhz
    assert sample.gpu_temperature() == pytest.approx(gpu_c)
    assert {r.name: r.milliwatts for r in sample.rails} == rails
    assert all(t > -60 for t in sample.temperatures.values()), "-256C placeholders are dropped"
    gpu = gpu_from_sample(sample, "Jetson iGPU")
    assert gpu is not None and gpu.memory_shared and gpu.source == "tegrastats"


def test_tegrastats_averages_and_sensors_of_the_orin_line() -> None:
    sample = parse_tegrastats((FIXTURES / "tegrastats/agx_orin_jp5.txt").read_text())
    assert [r.average_milliwatts for r in sample.rails] == [9125, 3050, 4198, 1090]
    assert set(sample.temperatures) == {"CPU", "Tboard", "SOC2", "Tdiode", "SOC1", "GPU", "tj", "SOC0"}


def test_tegrastats_garbage_gives_an_empty_sample() -> None:
    sample = parse_tegrastats("tegrastats: cannot open /sys/kernel/debug/...: Permission denied")
    assert sample.gpu_percent is None and sample.rails == [] and sample.ram_used_bytes is None
    assert gpu_from_sample(sample) is None


def test_tegrastats_one_sample_then_the_tool_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    binary = streaming_tegrastats(tmp_path, FIXTURES / "tegrastats/orin_nano_jp6.txt", pid_file)
    sample = read_tegrastats(binary, timeout_s=10)
    assert sample is not None and sample.gpu_percent == 48
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists(), "tegrastats must not outlive its one sample"


def test_silent_tegrastats_times_out(tmp_path: Path) -> None:
    silent = tool(tmp_path, "tegrastats", "import time\ntime.sleep(60)\n")
    started = time.monotonic()
    assert read_tegrastats(silent, timeout_s=0.5) is None
    assert time.monotonic() - started < 5


# -- engine counters ------------------------------------------------------------------------------
def test_model_counters_and_latency_quantiles_from_a_real_session(engine: Engine, zoo: Path) -> None:
    engine.serve(engine.prepare(zoo / "v1", load_manifest(zoo / "v1")))
    for _ in range(20):
        engine.run("surface-defect", {"image": np.zeros((1, 3, 64, 64), np.float32)})
    (model,) = model_health(engine, {"surface-defect": "a"})
    assert (model.name, model.slot, model.backend, model.inferences) == (
        "surface-defect",
        "a",
        "onnxruntime-cpu",
        20,
    )
    assert model.latency_ms_p50 is not None and model.latency_ms_p95 is not None
    assert model.latency_ms_p99 is not None
    assert 0 < model.latency_ms_p50 <= model.latency_ms_p95 <= model.latency_ms_p99


# -- the whole report -----------------------------------------------------------------------------
def test_collect_on_a_recorded_jetson(tmp_path: Path) -> None:
    binary = streaming_tegrastats(tmp_path, FIXTURES / "tegrastats/agx_orin_jp5.txt", tmp_path / "pid")
    model = ModelHealth(name="surface", version=2, slot="b", backend="onnxruntime-cpu", inferences=10)
    # Positional arguments exactly as device/agent.py passes them.
    health = collect(
        "dev-1",
        7,
        time.time() - 60,
        tmp_path,
        [model],
        UpdateState.IDLE,
        3,
        {"metric": 1},
        sysinfo=SysinfoConfig(root=ORIN, tegrastats=binary, nvidia_smi=""),
    )
    assert health.load is not None and health.load.load1 == 1.10
    assert {t.sensor for t in health.temperatures} >= {"CPU-therm", "GPU-therm", "tmp451/temp1"}
    (gpu,) = health.gpus
    assert gpu.name == "NVIDIA Jetson AGX Orin Developer Kit iGPU" and gpu.utilization_percent == 61
    assert gpu.memory_total_bytes == 30536 * MIB and gpu.temperature_c == pytest.approx(50.531)
    assert [r.name for r in health.power_rails][:2] == ["VDD_GPU_SOC", "VDD_CPU_CV"]
    assert health.links, "this machine's real links"
    assert decode(Health, encode(health)) == health
    assert decode(Health, encode(health.broker_view())).links[0].addresses == []


def test_collect_on_a_recorded_x86_box_with_an_nvidia_gpu(tmp_path: Path) -> None:
    recorded = FIXTURES / "nvidia-smi/h100.csv"
    smi = tool(tmp_path, "nvidia-smi", f"print(open({str(recorded)!r}).read(), end='')\n")
    config = SysinfoConfig(root=X86, tegrastats="", nvidia_smi=smi, include_loopback=True)
    health = collect("dev-2", 0, time.time(), tmp_path, [], UpdateState.IDLE, sysinfo=config)
    assert [g.name for g in health.gpus] == ["NVIDIA H100 80GB HBM3"] and health.power_rails == []
    assert "lo" in [link.name for link in health.links]
    assert len(health.temperatures) == 11


def test_every_source_fails_soft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def netlink_down(**_: object) -> list[object]:
        raise OSError(97, "Address family not supported by protocol")  # a netns without netlink

    monkeypatch.setattr("device.sysinfo.read_links", netlink_down)
    broken = tool(tmp_path, "tegrastats", "print('\\x00\\xff not a sample')\n")
    config = SysinfoConfig(root=tmp_path / "no-such-root", tegrastats=broken, nvidia_smi="")
    system = read_system(config)
    assert system.links == [] and "links" in system.failed and "Address family" in system.failed["links"]
    assert (system.load, system.temperatures, system.gpus, system.power_rails) == (None, [], [], [])
    health = collect("dev-3", 1, time.time(), tmp_path, [], UpdateState.IDLE, system=system)
    assert health.links == [] and health.cpu_percent >= 0


def test_collect_takes_milliseconds_without_vendor_tools(tmp_path: Path) -> None:
    config = SysinfoConfig(tegrastats="", nvidia_smi="")
    collect("d", 0, time.time(), tmp_path, [], UpdateState.IDLE, sysinfo=config)  # imports, caches
    timings = []
    for _ in range(10):
        started = time.perf_counter()
        collect("d", 0, time.time(), tmp_path, [], UpdateState.IDLE, sysinfo=config)
        timings.append(time.perf_counter() - started)
    assert sorted(timings)[len(timings) // 2] < 0.25


def test_collect_from_worker_threads_like_the_agent(tmp_path: Path) -> None:
    results: list[Health] = []

    def work() -> None:
        results.append(collect("d", 0, time.time(), tmp_path, [], UpdateState.IDLE))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4 and all(h.links or h.load for h in results)
