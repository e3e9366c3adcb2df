"""Prometheus text exposition of fleet-level numbers, read from the service at scrape time."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleet.service import FleetService


class FleetCollector:
    def __init__(self, service: FleetService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        snapshot = self.service.metrics_snapshot()
        devices = GaugeMetricFamily("edgefleet_fleet_devices", "Registered devices", labels=["online"])
        devices.add_metric(["true"], snapshot["devices_online"])
        devices.add_metric(["false"], snapshot["devices_offline"])
        updates = GaugeMetricFamily("edgefleet_fleet_updates", "Updates by state", labels=["state"])
        for state, count in snapshot["updates"].items():
            updates.add_metric([state], count)
        telemetry = CounterMetricFamily(
            "edgefleet_fleet_telemetry", "Sealed records by outcome", labels=["outcome"]
        )
        for outcome, count in snapshot["telemetry"].items():
            telemetry.add_metric([outcome], count)
        rejected = CounterMetricFamily("edgefleet_fleet_rejected_messages", "MQTT messages refused")
        rejected.add_metric([], snapshot["rejected_messages"])
        pruned = CounterMetricFamily(
            "edgefleet_fleet_telemetry_pruned", "Telemetry rows deleted by retention", labels=["kind"]
        )
        for kind, count in snapshot["pruned"].items():
            pruned.add_metric([kind], count)
        yield from (devices, updates, telemetry, rejected, pruned)


def render(service: FleetService) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(service))
    return generate_latest(registry)
