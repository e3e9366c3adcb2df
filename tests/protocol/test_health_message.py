"""The Health message: old agents still parse, every list is bounded, and the plain copy drops addresses."""

import json

import pytest

from protocol import ProtocolError, decode, encode
from protocol.messages import (
    HEALTH_MAX_ADDRESSES,
    HEALTH_MAX_GPUS,
    HEALTH_MAX_LINKS,
    HEALTH_MAX_MODELS,
    HEALTH_MAX_POWER_RAILS,
    HEALTH_MAX_TEMPERATURES,
    HEALTH_NAME_MAX,
    MAX_JSON_PAYLOAD,
    GpuHealth,
    Health,
    LinkHealth,
    LoadAverage,
    ModelHealth,
    PowerRail,
    Temperature,
)

# What an agent from before the sysinfo fields published (device/health.py at cd444c9).
OLD_AGENT = {
    "device_id": "line-3",
    "seq": 12,
    "ts": 1760000000.0,
    "uptime_s": 3600.0,
    "cpu_percent": 12.5,
    "memory_percent": 40.0,
    "disk_free_bytes": 10_000_000_000,
    "disk_percent": 35.0,
    "models": [
        {"name": "surface", "version": 1, "slot": "a", "backend": "onnxruntime-cpu", "latency_ms_p50": 3.1}
    ],
    "update_state": "idle",
    "telemetry_pending": 0,
    "telemetry_evicted": {},
}


def link(name: str = "eth0", addresses: int = 2) -> LinkHealth:
    return LinkHealth(
        name=name,
        operstate="UP",
        mac="02:fc:00:00:00:01",
        mtu=1500,
        rx_bytes=2**63,
        tx_bytes=1,
        addresses=[f"10.0.0.{i}/24" for i in range(addresses)],
    )


def test_an_old_agents_health_parses_with_empty_new_fields() -> None:
    health = decode(Health, json.dumps(OLD_AGENT).encode())
    assert health.load is None and health.temperatures == [] and health.links == []
    assert health.gpus == [] and health.power_rails == []
    assert health.models[0].latency_ms_p99 is None


def test_full_health_round_trips() -> None:
    health = Health.model_validate(
        OLD_AGENT
        | {
            "load": LoadAverage(load1=0.5, load5=0.4, load15=0.3, cpus=8),
            "temperatures": [Temperature(sensor="coretemp/Core 0", celsius=43.0, source="hwmon")],
            "links": [link()],
            "gpus": [GpuHealth(index=0, name="Orin", source="tegrastats", memory_shared=True)],
            "power_rails": [PowerRail(name="VDD_IN", milliwatts=5079, average_milliwatts=5001)],
        }
    )
    assert decode(Health, encode(health)) == health


def biggest_health() -> Health:
    name = "n" * HEALTH_NAME_MAX
    return Health.model_validate(
        OLD_AGENT
        | {
            "models": [
                ModelHealth(name=f"m{i}", version=2**31, slot="b", backend="onnxruntime-cuda")
                for i in range(HEALTH_MAX_MODELS)
            ],
            "load": LoadAverage(load1=1e6, load5=1e6, load15=1e6, cpus=1024),
            "temperatures": [Temperature(sensor=name, celsius=-12.345678, source="hwmon")]
            * HEALTH_MAX_TEMPERATURES,
            "links": [
                link("x" * 15, 0).model_copy(
                    update={
                        "mac": "ff:" * 19 + "ff",
                        "addresses": ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"] * HEALTH_MAX_ADDRESSES,
                    }
                )
            ]
            * HEALTH_MAX_LINKS,
            "gpus": [
                GpuHealth(
                    index=i,
                    name="g" * 96,
                    source="nvidia-smi",
                    utilization_percent=99.5,
                    memory_used_bytes=2**40,
                    memory_total_bytes=2**40,
                    temperature_c=85.5,
                    power_w=700.25,
                    clock_mhz=1980.0,
                )
                for i in range(HEALTH_MAX_GPUS)
            ],
            "power_rails": [PowerRail(name=name, milliwatts=1e6, average_milliwatts=1e6)]
            * HEALTH_MAX_POWER_RAILS,
        }
    )


def test_a_health_at_every_cap_fits_the_decoder_with_room_to_spare() -> None:
    payload = encode(biggest_health())
    assert len(payload) < MAX_JSON_PAYLOAD / 2, len(payload)
    assert decode(Health, payload) == biggest_health()


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("links", [link().model_dump()] * (HEALTH_MAX_LINKS + 1), "links"),
        ("temperatures", [{"sensor": "a", "celsius": 1, "source": "thermal"}] * 65, "temperatures"),
        ("gpus", [{"index": 0, "name": "g", "source": "nvidia-smi", "utilization_percent": 101}], "gpus.0"),
        ("links", [link().model_dump() | {"name": "sixteen-chars-xx"}], "links.0.name"),
        ("links", [link().model_dump() | {"addresses": ["1.2.3.4/32"] * 17}], "links.0.addresses"),
        ("power_rails", [{"name": "VDD_IN", "milliwatts": -1}], "power_rails.0.milliwatts"),
        ("temperatures", [{"sensor": "a", "celsius": 20, "source": "guess"}], "temperatures.0.source"),
        ("load", {"load1": -1, "load5": 0, "load15": 0}, "load.load1"),
    ],
)
def test_out_of_bounds_health_is_refused_by_name(field: str, value: object, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem.replace(".", r"\.")):
        decode(Health, json.dumps(OLD_AGENT | {field: value}).encode())


def test_broker_view_drops_addresses_and_mac_only() -> None:
    health = Health.model_validate(OLD_AGENT | {"links": [link(), link("wlan0", 1)]})
    plain = health.broker_view()
    assert [(x.addresses, x.mac) for x in plain.links] == [([], None), ([], None)]
    assert [x.rx_bytes for x in plain.links] == [x.rx_bytes for x in health.links]
    assert plain.model_dump(exclude={"links"}) == health.model_dump(exclude={"links"})
    assert health.links[0].addresses == ["10.0.0.0/24", "10.0.0.1/24"], "the sealed copy keeps them"
    assert "10.0.0" not in encode(plain).decode()
