"""A health snapshot of the device: machine load, disk, sensors, links, GPUs, and what each model does."""

import time
from pathlib import Path

import psutil

from device.engine.engine import Engine
from device.sysinfo import SysinfoConfig, SystemSnapshot, read_system
from protocol.messages import HEALTH_MAX_MODELS, Health, ModelHealth, UpdateState


def model_health(engine: Engine, slots_of: dict[str, str]) -> list[ModelHealth]:
    result = []
    for name in engine.names():
        serving = engine.get(name)
        result.append(
            ModelHealth(
                name=name,
                version=serving.manifest.version,
                slot=slots_of.get(name, ""),
                backend=serving.backend,
                inferences=serving.stats.inferences,
                errors=serving.stats.errors,
                latency_ms_p50=serving.stats.quantile(0.5),
                latency_ms_p95=serving.stats.quantile(0.95),
                latency_ms_p99=serving.stats.quantile(0.99),
            )
        )
    return result


def collect(
    device_id: str,
    seq: int,
    started: float,
    data_dir: Path,
    models: list[ModelHealth],
    update_state: UpdateState,
    telemetry_pending: int = 0,
    telemetry_evicted: dict[str, int] | None = None,
    *,
    system: SystemSnapshot | None = None,
    sysinfo: SysinfoConfig | None = None,
) -> Health:
    """One Health. Blocking (netlink, sysfs, and on a Jetson about 1 s of tegrastats): run it in a thread.

    `system` is read here unless given; `sysinfo` says where from (the defaults read this machine).
    """
    if system is None:
        system = read_system(sysinfo)
    disk = psutil.disk_usage(str(data_dir))
    return Health(
        device_id=device_id,
        seq=seq,
        ts=time.time(),
        uptime_s=time.time() - started,
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_percent=psutil.virtual_memory().percent,
        disk_free_bytes=disk.free,
        disk_percent=disk.percent,
        models=models[:HEALTH_MAX_MODELS],
        update_state=update_state,
        telemetry_pending=telemetry_pending,
        telemetry_evicted=telemetry_evicted or {},
        load=system.load,
        temperatures=system.temperatures,
        links=system.links,
        gpus=system.gpus,
        power_rails=system.power_rails,
    )
