"""A real update with the fleet's artifacts in an S3 bucket: s3rver, Mosquitto, the fleet server and a
device agent, each its own process (`fleet serve --artifact-store s3://... --s3-endpoint-url ...`)."""

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from edgefleet.demo import DeviceProcess, FleetProcess
from edgefleet.procs import Child, wait_for
from fleet.client import FleetClient
from tests.fleet.test_artifacts_s3server import ACCESS_KEY, SECRET_KEY, S3Server, running_s3_server

pytestmark = pytest.mark.e2e
MODEL = "surface-defect"


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """s3rver, and its keys in the standard variables the fleet's child process inherits."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    with running_s3_server(tmp_path / "s3rver") as server:
        yield server


@dataclass
class S3FleetProcess(FleetProcess):
    """The demo's fleet server, with the artifact-store options of `fleet serve` added."""

    store_args: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30) -> FleetClient:
        args = ["fleet", "serve", "--data-dir", str(self.root), "--http-port", str(self.http_port)]
        args += ["--broker-port", str(self.broker_port), "--chunk-size", str(64 * 1024), *self.store_args]
        self.child = Child("fleet", args, self.root.parent / "logs" / "fleet.log")
        wait_for("the fleet API", self._healthy, timeout)
        token = (self.root / "secrets" / "operator-token").read_text().strip()
        self.client = FleetClient(self.url, token)
        return self.client


def _final(client: FleetClient, update_id: str) -> str | None:
    state = client.update(update_id)["state"]
    return state if state in ("committed", "failed", "rolled_back") else None


def test_an_update_is_served_from_the_bucket_to_a_real_device(
    s3: S3Server, archives: dict[int, Path], tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    store = ["--artifact-store", f"s3://{bucket}/fleet-a", "--s3-endpoint-url", s3.endpoint]
    fleet = S3FleetProcess(tmp_path / "fleet", store_args=[*store, "--artifact-cache-mb", "64"])
    device = DeviceProcess("cam-1", tmp_path / "cam-1")
    try:
        client = fleet.start()
        for archive in archives.values():
            client.push_model(archive)
        assert s3.get(bucket, f"fleet-a/{MODEL}/2.tar") == archives[2].read_bytes()
        assert not (fleet.root / "artifacts" / MODEL).exists(), "nothing kept in the data dir's folder"

        device.provision(client, archives[1], probation_s=1.0)
        device.start()
        wait_for("the device to report what it runs", lambda: client.device("cam-1")["health"], 60)
        (update,) = client.start_update(MODEL, 2, ["cam-1"])
        assert wait_for("the update to end", partial(_final, client, update["update_id"]), 90) == "committed"

        events = client.update(update["update_id"])["events"]
        downloaded = next(e for e in events if e["state"] == "verifying")["detail"]
        assert downloaded["payload"] == "delta", "the v1 -> v2 delta, built by the fleet"
        assert f"fleet-a/{MODEL}/deltas/1-2.pdelta" in s3.objects(bucket), "kept in the bucket"
        assert device.status()["models"][0]["version"] == 2
    except Exception:
        for name, child in (("fleet", fleet.child), ("device", device.child)):
            if child:
                print(f"--- {name} log ---\n{child.log_tail(60)}")
        raise
    finally:
        device.stop()
        fleet.stop()


def test_fleet_serve_refuses_to_start_on_a_missing_bucket(s3: S3Server, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgefleet",
            "fleet",
            "serve",
            "--data-dir",
            str(tmp_path / "fleet"),
            "--artifact-store",
            "s3://no-such-bucket/fleet",
            "--s3-endpoint-url",
            s3.endpoint,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "bucket 'no-such-bucket' does not exist" in result.stderr + result.stdout
    assert SECRET_KEY not in result.stderr + result.stdout
