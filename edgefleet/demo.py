"""`edgefleet demo`: a broker, a fleet server and devices as real processes; a real update pushed.

The same building blocks (`FleetProcess`, `DeviceProcess`) drive the end-to-end tests.
"""

import json
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from device.api.client import for_data_dir
from device.provision import provision
from edgefleet.procs import Child, free_port, wait_for
from fleet.client import FleetClient
from models.package import pack

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo"
SAMPLE_MODEL = ZOO / "surface_defect"


class DemoFailed(RuntimeError):
    pass


@dataclass
class FleetProcess:
    root: Path
    http_port: int = field(default_factory=free_port)
    broker_port: int = field(default_factory=free_port)
    broker_tls: bool = True  # False: plain TCP with passwords (the update benchmark's simulator)
    ingest_workers: int = 0  # `fleet serve --ingest-workers`
    child: Child | None = None
    client: FleetClient | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30) -> FleetClient:
        self.child = Child(
            "fleet",
            [
                "fleet",
                "serve",
                "--data-dir",
                str(self.root),
                "--http-port",
                str(self.http_port),
                "--broker-port",
                str(self.broker_port),
                "--chunk-size",
                str(64 * 1024),
                "--broker-tls" if self.broker_tls else "--no-broker-tls",
                "--ingest-workers",
                str(self.ingest_workers),
            ],
            self.root.parent / "logs" / "fleet.log",
        )
        wait_for("the fleet API", lambda: self._healthy(), timeout)
        token = (self.root / "secrets" / "operator-token").read_text().strip()
        self.client = FleetClient(self.url, token)
        return self.client

    def _healthy(self) -> bool:
        assert self.child is not None
        if not self.child.alive():
            raise DemoFailed(f"the fleet server exited:\n{self.child.log_tail()}")
        return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200

    def stop(self) -> None:
        if self.client:
            self.client.close()
        if self.child:
            self.child.stop()


@dataclass
class DeviceProcess:
    device_id: str
    root: Path
    api_port: int = field(default_factory=free_port)
    child: Child | None = None

    def provision(self, client: FleetClient, model_archive: Path, probation_s: float = 3.0) -> None:
        """As in the field: a ticket from the fleet, spent by the device on a certificate for its key
        at the fleet's enrollment endpoint."""
        ticket = client.add_device(self.device_id)
        provision(
            self.root,
            ticket,
            model_archive,
            fleet_api=str(client._http.base_url),  # FleetClient has no public base_url yet
            api_port=self.api_port,
            probation_s=probation_s,
            health_interval_s=1.0,
            pipeline_poll_s=0.1,
        )

    def start(self) -> None:
        self.child = Child(
            self.device_id,
            ["device", "run", "--data-dir", str(self.root)],
            self.root.parent / "logs" / f"{self.device_id}.log",
        )

    def api(self, path: str, method: str = "GET", token: str | None = None, **kwargs: Any) -> httpx.Response:
        """Call the device's local API as a field engineer's laptop would (HTTPS, checked against the
        fleet CA and the device id); with the break-glass credential unless `token` is given."""
        with for_data_dir(self.root, token) as api:
            return api.request(method, path, **kwargs)

    def status(self) -> dict[str, Any]:
        if self.child and not self.child.alive():
            raise DemoFailed(f"{self.device_id} exited:\n{self.child.log_tail()}")
        response = self.api("/api/status")
        response.raise_for_status()
        return dict(response.json())

    def inferred(self, version: int) -> int:
        return int(self.status()["pipeline"]["inferred_by_version"].get(str(version), 0))

    def stop(self) -> None:
        if self.child:
            self.child.stop()


def package_archives(out: Path) -> dict[int, Path]:
    """Pack the committed sample model versions into archives."""
    out.mkdir(parents=True, exist_ok=True)
    archives = {}
    for folder in sorted(p for p in SAMPLE_MODEL.iterdir() if p.is_dir() and p.name.startswith("v")):
        archive = out / f"surface-defect-{folder.name}.tar"
        archives[pack(folder, archive).version] = archive
    return archives


def drop_images(device: DeviceProcess, count: int, seed: int) -> None:
    """Write images to a staging folder, then move them in, so the pipeline never reads a half file."""
    from models.zoo.surface_data import write_images

    staging = device.root / "staging"
    for path, _ in write_images(staging, count, seed):
        path.rename(device.root / "inbox" / path.name)


def run_demo(workdir: Path, device_count: int = 3, images: int = 40) -> dict[str, Any]:
    started = time.monotonic()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    say(f"edgefleet demo in {workdir}/ (logs in {workdir}/logs/)")
    archives = package_archives(workdir / "packages")
    fleet = FleetProcess(workdir / "fleet")
    devices = [DeviceProcess(f"line{i + 1}-cam", workdir / f"line{i + 1}-cam") for i in range(device_count)]
    try:
        client = fleet.start()
        scheme = "mqtts" if fleet.broker_tls else "mqtt"
        say(f"fleet server on {fleet.url}, managed Mosquitto on {scheme}://127.0.0.1:{fleet.broker_port}")
        for version in sorted(archives):
            model = client.push_model(archives[version])
            say(f"registered {model['name']} v{model['version']} ({model['size'] / 1e6:.2f} MB)")
        for i, device in enumerate(devices):
            device.provision(client, archives[1])
            drop_images(device, images, seed=1000 + i)
            device.start()
        say(f"started {device_count} device agents on v1, each with {images} images in its inbox")
        for device in devices:
            wait_for(f"{device.device_id} to infer on v1", partial(_has_inferred, device, 1, images), 90)
            wait_for(f"{device.device_id} to report", partial(_reported, client, device.device_id), 30)
        say("all devices inferred their images on v1; pushing v2 to all of them")
        updates = client.start_update("surface-defect", 2, [d.device_id for d in devices])
        for update in updates:
            wait_for(f"{update['device_id']} to commit v2", partial(_final, client, update["update_id"]), 120)
        final = {u["device_id"]: client.update(u["update_id"]) for u in updates}
        failed = {d: u for d, u in final.items() if u["state"] != "committed"}
        if failed:
            raise DemoFailed(f"updates did not commit: {json.dumps(failed, indent=2)}")
        for i, device in enumerate(devices):
            drop_images(device, images, seed=2000 + i)
        for device in devices:
            wait_for(f"{device.device_id} to infer on v2", partial(_has_inferred, device, 2, images), 90)
        for device in devices:
            wait_for(
                f"{device.device_id}'s sealed metrics at the fleet",
                partial(_metrics_at_fleet, client, device.device_id, 2 * images),
                60,
            )
        # As a field engineer would: a short-lived token from the fleet, checked by the device itself.
        field = client.issue_field_token("demo-engineer", "technician", [devices[0].device_id], 1)
        infer = _sample_infer(devices[0], field["token"])
        rows = [_summary_row(d, final[d.device_id], client) for d in devices]
        wall_s = time.monotonic() - started
        _print_summary(rows, infer, wall_s)
        return {"wall_s": wall_s, "devices": rows}
    except (TimeoutError, httpx.HTTPError, OSError) as e:
        raise DemoFailed(f"{e}\n{_tails(fleet, devices)}") from e
    except DemoFailed as e:
        raise DemoFailed(f"{e}\n{_tails(fleet, devices)}") from e
    finally:
        for device in devices:
            device.stop()
        fleet.stop()


def _has_inferred(device: DeviceProcess, version: int, count: int) -> bool:
    return device.inferred(version) >= count


def _metrics_at_fleet(client: FleetClient, device_id: str, count: int) -> bool:
    return int(client.telemetry(device_id, limit=1)["counts"].get("metric", 0)) >= count


def _reported(client: FleetClient, device_id: str) -> bool:
    view = client.device(device_id)
    return bool(view["online"] and view["health"])


def _final(client: FleetClient, update_id: str) -> bool:
    return client.update(update_id)["state"] in ("committed", "failed", "rolled_back")


def _sample_infer(device: DeviceProcess, token: str) -> dict[str, Any]:
    """Ask one device's local API (Open Inference Protocol v2, HTTPS) about one fresh image."""
    import numpy as np
    from PIL import Image

    from device.engine.preprocess import image_to_tensor
    from models.manifest import load_manifest
    from models.zoo.surface_data import CLASSES, make_image

    manifest = load_manifest(SAMPLE_MODEL / "v2")
    assert manifest.preprocessing is not None
    label = 3
    tensor = image_to_tensor(
        Image.fromarray(make_image(label, np.random.default_rng(7))), manifest.preprocessing
    )
    body = {
        "inputs": [
            {
                "name": manifest.inputs[0].name,
                "shape": list(tensor.shape),
                "datatype": "FP32",
                "data": tensor.ravel().tolist(),
            }
        ]
    }
    response = device.api(f"/v2/models/{manifest.name}/infer", "POST", token=token, json=body)
    response.raise_for_status()
    result = response.json()
    scores = result["outputs"][0]["data"]
    return {
        "device": device.device_id,
        "truth": CLASSES[label],
        "predicted": CLASSES[int(np.argmax(scores))],
        "model_version": result["model_version"],
    }


def _summary_row(device: DeviceProcess, update: dict[str, Any], client: FleetClient) -> dict[str, Any]:
    status = device.status()
    counts = client.telemetry(device.device_id, limit=1)["counts"]
    model = status["models"][0]
    at = {e["state"]: e["ts"] for e in update["events"]}
    downloaded: dict[str, Any] = next(
        (e["detail"] for e in update["events"] if e["state"] == "verifying"), {}
    )
    return {
        "device": device.device_id,
        "model": f"{model['name']} v{model['version']}",
        "slot": model["slot"],
        "backend": model["backend"],
        "inferred v1": status["pipeline"]["inferred_by_version"].get("1", 0),
        "inferred v2": status["pipeline"]["inferred_by_version"].get("2", 0),
        "payload": f"{downloaded.get('payload', '?')} {downloaded.get('bytes', 0) / 1e3:.0f} kB",
        "switched s": f"{at['probation'] - at['offered']:.2f}",
        "committed s": f"{at['committed'] - at['offered']:.2f}",
        "sealed at fleet": f"{counts.get('metric', 0)} metrics, {counts.get('health', 0)} health",
        "defects found": sum(n for label, n in status["pipeline"]["labels"].items() if label != "ok"),
    }


def _print_summary(rows: list[dict[str, Any]], infer: dict[str, Any], wall_s: float) -> None:
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    print()
    print("  ".join(h.ljust(widths[h]) for h in headers))
    print("  ".join("-" * widths[h] for h in headers))
    for row in rows:
        print("  ".join(str(row[h]).ljust(widths[h]) for h in headers))
    print()
    print(
        f"local API of {infer['device']} (HTTPS, device certificate; a 1 h technician token from "
        f"`fleet field-token issue`): POST /v2/models/surface-defect/infer on a '{infer['truth']}' image "
        f"-> '{infer['predicted']}' (model v{infer['model_version']})"
    )
    print(f"demo wall time: {wall_s:.1f} s. Update times count from the device's 'offered': 'switched' once")
    print("the new model passed its golden vectors and serves, 'committed' after the 3 s probation window.")
    print("DEMO OK")


def _tails(fleet: FleetProcess, devices: list[DeviceProcess]) -> str:
    parts = []
    for name, child in [("fleet", fleet.child), *((d.device_id, d.child) for d in devices)]:
        if child is not None:
            parts.append(f"--- {name} log (last lines) ---\n{child.log_tail()}")
    return "\n".join(parts)


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)
