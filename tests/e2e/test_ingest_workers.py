"""`fleet serve --ingest-workers N`: extra telemetry ingest processes, supervised by the fleet.

That such a process ingests its share (and stores each record once) is tested in
tests/integration/test_telemetry_link.py; here: the fleet starts it on its TLS broker, starts it
again when it dies, and takes it down when it stops."""

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from edgefleet.demo import FleetProcess

pytestmark = pytest.mark.e2e


def ingest_processes(fleet_pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(fleet_pid).children(recursive=True):
        try:
            if "fleet.ingest_process" in child.cmdline():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_fleet_runs_restarts_and_stops_its_ingest_workers(tmp_path: Path) -> None:
    fleet = FleetProcess(tmp_path / "fleet", ingest_workers=2)
    fleet.start()
    broker_log = tmp_path / "fleet" / "broker" / "mosquitto.log"
    try:
        assert fleet.child is not None
        pid = fleet.child.process.pid
        wait_for("two ingest processes", lambda: len(ingest_processes(pid)) == 2)
        wait_for(
            "both on the broker over TLS",
            lambda: (
                broker_log.exists()
                and all(f"edgefleet-fleet-ingest-{i}-telemetry" in broker_log.read_text() for i in (1, 2))
            ),
        )
        first = {p.pid for p in ingest_processes(pid)}
        os.kill(min(first), signal.SIGKILL)
        wait_for(
            "the killed one started again",
            lambda: len(ingest_processes(pid)) == 2 and {p.pid for p in ingest_processes(pid)} != first,
            60,
        )
        survivors = ingest_processes(pid)
    finally:
        fleet.stop()
    _, alive = psutil.wait_procs(survivors, timeout=15)
    assert not alive, "stopping the fleet stops its ingest workers"
