"""The `edgefleet` command. Sub-commands import their side lazily, so a device without the fleet's
dependencies can run `edgefleet device ...`."""

import json
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from edgefleet.keys_cli import register as register_keys_commands
from edgefleet.rollout_cli import register as register_rollout_commands
from models.delta.cli import app as delta_app

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Edge AI fleet: device agent and fleet server."
)
device_app = typer.Typer(no_args_is_help=True, help="The on-device agent.")
fleet_app = typer.Typer(no_args_is_help=True, help="The fleet server and its operator commands.")
models_app = typer.Typer(no_args_is_help=True, help="Model packages: pack, inspect, verify.")
app.add_typer(device_app, name="device")
app.add_typer(fleet_app, name="fleet")
app.add_typer(models_app, name="models")
app.add_typer(delta_app, name="delta", help="Tensor-aware model deltas: encode, apply, info.")
register_rollout_commands(fleet_app)
register_keys_commands(fleet_app)

DataDirOpt = Annotated[Path, typer.Option("--data-dir", help="the data dir")]


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"edgefleet {version('edgefleet')}")
        except PackageNotFoundError:
            typer.echo("edgefleet (not installed)")
        raise typer.Exit()


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.callback()
def main(
    _: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """edgefleet: signed model updates over MQTT to factory-floor edge devices."""


# -- device ---------------------------------------------------------------------------------------
@device_app.command("provision")
def device_provision(
    data_dir: DataDirOpt,
    enrollment: Annotated[Path, typer.Option(help="the ticket `fleet device-add` wrote for this device")],
    model: Annotated[Path, typer.Option(help="the first model package archive (.tar)")],
    fleet_api: Annotated[
        str | None, typer.Option(help="the fleet API to enroll with (default: the ticket's fleet_api)")
    ] = None,
    api_port: Annotated[int, typer.Option(help="local API port (0: any free port)")] = 8081,
    api_host: Annotated[str, typer.Option(help="local API address")] = "127.0.0.1",
    probation_s: Annotated[float, typer.Option(help="seconds a new model is watched before commit")] = 30.0,
    health_interval_s: Annotated[float, typer.Option(help="seconds between health reports")] = 5.0,
    break_glass_file: Annotated[
        Path | None,
        typer.Option(
            "--break-glass-file",
            help="the local API's break-glass credential: this file's first line (at least 16 "
            "characters) instead of a random one",
        ),
    ] = None,
) -> None:
    """Prepare a data dir: make the device's keys, enroll with the ticket's one-time token (the fleet
    signs a certificate for the device's key), and install the first model in slot a."""
    from device.errors import DeviceError
    from device.provision import load_enrollment, provision
    from models.errors import ModelError

    try:
        manifest = provision(
            data_dir,
            load_enrollment(enrollment),
            model,
            api_port=api_port,
            api_host=api_host,
            probation_s=probation_s,
            health_interval_s=health_interval_s,
            fleet_api=fleet_api,
            break_glass_file=break_glass_file,
        )
    except (DeviceError, ModelError) as e:
        _fail(str(e))
    typer.echo(f"provisioned {data_dir} with {manifest.name} v{manifest.version}")


@models_app.command("add-tvm-records")
def models_add_tvm_records(
    folder: Annotated[Path, typer.Argument(help="a model package folder")],
    records: Annotated[
        list[Path], typer.Option("--records", help="a records root or folder from `models.tvm_tuning tune`")
    ],
    model: Annotated[str | None, typer.Option(help="the package's ONNX file they are for")] = None,
) -> None:
    """Ship TVM tuning records in a package folder (copied in, hashed in the manifest), so devices
    of that CPU compile with tuned kernels and never tune on the floor."""
    from models.errors import ModelError
    from models.tvm_tuning import package_records

    try:
        manifest = package_records(folder, records, model_file=model)
    except ModelError as e:
        _fail(str(e))
    for entry in manifest.tvm_records:
        size = sum(manifest.files[name].size for name in entry.file_names)
        typer.echo(f"{entry.model} on {entry.target}: {size:,} bytes of records")


@device_app.command("run")
def device_run(
    data_dir: DataDirOpt,
    fleet: Annotated[str | None, typer.Option("--fleet", help="broker URL, overrides the config")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the agent until SIGINT/SIGTERM."""
    from device.agent import run_agent
    from device.errors import DeviceError

    _logging(verbose)
    try:
        run_agent(data_dir, fleet)
    except DeviceError as e:
        _fail(str(e))


@device_app.command("serve")
def device_serve(
    model: Annotated[Path, typer.Option(help="a model package folder or a bare .onnx file")],
    backend: Annotated[str | None, typer.Option(help="pin a backend, e.g. onnxruntime-cpu")] = None,
    precision: Annotated[
        str, typer.Option(help="auto: a package's int8 variant where it passes its check here; fp32: never")
    ] = "auto",
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8081,
    token_file: Annotated[Path | None, typer.Option(help="API token file (made, 0600, if missing)")] = None,
    max_batch: Annotated[int, typer.Option(help="rows the micro-batcher groups per run (1: off)")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="how long a batch may wait to fill")] = 0.0,
    max_queue: Annotated[int, typer.Option(help="requests waiting before new ones get 503")] = 32,
    workers: Annotated[
        int,
        typer.Option(help="engine calls in flight at once (ONNX Runtime only; >1 for unbatchable models)"),
    ] = 1,
) -> None:
    """Serve one model through the engine and the local API (Open Inference Protocol v2), no fleet."""
    import uvicorn

    from device.api import create_app
    from device.api.server import api_server_config
    from device.engine.batcher import BatchConfig
    from device.errors import DeviceError
    from device.standalone import api_token, load_for_serving
    from models.errors import ModelError

    try:
        engine, serving = load_for_serving(model, backend, precision)
        engine.configure_batching(
            serving.manifest.name, BatchConfig(max_batch, max_wait_ms, max_queue, workers)
        )
    except (DeviceError, ModelError, ValueError) as e:
        _fail(str(e))
    token = api_token(token_file)
    name = serving.manifest.name
    typer.echo(
        f"serving {name} v{serving.manifest.version} on {serving.backend} ({serving.served_precision}) "
        f"at http://{host}:{port}"
        f"/v2/models/{name}"
    )
    typer.echo(f"API token: {'in ' + str(token_file) if token_file else token}")
    app = create_app(engine, lambda: {"standalone": True, "models": [serving.describe()]}, token)
    uvicorn.Server(api_server_config(app, host, port)).run()


@device_app.command("probe")
def device_probe(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    explain: Annotated[
        Path | None, typer.Option(help="a model package or .onnx: which backend and why")
    ] = None,
) -> None:
    """Print this machine's hardware profile; with --explain, the backend a model gets here and why."""
    from device.engine.probe import format_profile, probe
    from device.engine.registry import backend_order

    hw = probe()
    order = backend_order(hw)
    if explain is None:
        if as_json:
            _print_json({**hw.to_dict(), "backend_order": order})
        else:
            typer.echo(format_profile(hw, order), nl=False)
        return
    from device.errors import DeviceError
    from device.standalone import load_for_serving
    from models.errors import ModelError

    try:
        _, serving = load_for_serving(explain, None)
    except (DeviceError, ModelError) as e:
        _fail(str(e))
    choice = {
        "model": serving.manifest.name,
        "chosen": serving.backend,
        "passed_over": serving.passed_over,
        "golden_p95_ms": serving.golden_p95_ms,
        "precision": serving.describe()["precision_decision"],
    }
    if as_json:
        _print_json({**choice, "profile": {**hw.to_dict(), "backend_order": order}})
        return
    typer.echo(f"{serving.manifest.name}: runs on {serving.backend}")
    for backend, reason in serving.passed_over.items():
        typer.echo(f"  passed over {backend}: {reason}")
    if serving.golden_p95_ms is not None:
        typer.echo(f"  golden vectors pass, p95 {serving.golden_p95_ms:.2f} ms")
    if serving.precision is not None:
        typer.echo(f"  serves {serving.served_precision}: {serving.precision.reason}")
    typer.echo(format_profile(hw, order), nl=False)


# -- fleet ----------------------------------------------------------------------------------------
def _client(server: str, token: str | None, data_dir: Path | None) -> Any:
    from fleet.client import FleetClient

    token = token or os.environ.get("EDGEFLEET_TOKEN")
    if token is None and data_dir is not None:
        path = data_dir / "secrets" / "operator-token"
        token = path.read_text().strip() if path.exists() else None
    if token is None:
        _fail("no operator token: pass --token, set EDGEFLEET_TOKEN, or --data-dir of the fleet")
    return FleetClient(server, token or "")


ServerOpt = Annotated[str, typer.Option("--server", help="fleet API URL")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="operator token (or EDGEFLEET_TOKEN)")]
FleetDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="fleet data dir, to read its token")]


@fleet_app.command("serve")
def fleet_serve(
    data_dir: DataDirOpt,
    http_host: Annotated[str, typer.Option(help="JSON API address")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="JSON API port")] = 8080,
    broker_url: Annotated[str | None, typer.Option(help="external broker; omit to run Mosquitto")] = None,
    broker_port: Annotated[int, typer.Option(help="port of the embedded Mosquitto")] = 8883,
    broker_tls: Annotated[
        bool,
        typer.Option(help="TLS with fleet-CA client certificates; --no-broker-tls: plain TCP, passwords"),
    ] = True,
    broker_name: Annotated[
        list[str] | None, typer.Option(help="a host name or address devices use for the broker; repeat")
    ] = None,
    api_tls: Annotated[
        bool, typer.Option(help="serve the JSON API over HTTPS (fleet-CA certificate)")
    ] = False,
    chunk_size: Annotated[int, typer.Option(help="bytes per update chunk")] = 256 * 1024,
    artifact_store: Annotated[
        str | None,
        typer.Option(
            help="keep model archives and deltas in s3://BUCKET[/PREFIX] (keys: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or DATA_DIR/secrets/s3-credentials); omit for DATA_DIR/artifacts/",
            envvar="EDGEFLEET_ARTIFACT_STORE",
        ),
    ] = None,
    s3_endpoint_url: Annotated[
        str | None,
        typer.Option(
            help="URL of an S3-compatible store (MinIO, Ceph...); omit for AWS",
            envvar="EDGEFLEET_S3_ENDPOINT_URL",
        ),
    ] = None,
    s3_region: Annotated[
        str | None, typer.Option(help="the bucket's region", envvar="EDGEFLEET_S3_REGION")
    ] = None,
    artifact_cache_mb: Annotated[
        int, typer.Option(help="local disk cache of S3 artifacts, in MiB (least recently used out first)")
    ] = 2048,
    ingest_workers: Annotated[
        int,
        typer.Option(
            min=0,
            max=64,
            help="extra telemetry ingest processes (one core each) beside the fleet's own worker; "
            "keep their number stable: each keeps a broker session",
        ),
    ] = 0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the fleet server (with its own Mosquitto unless --broker-url is given)."""
    from fleet.artifacts import StoreOptions
    from fleet.errors import FleetError
    from fleet.server import ServeOptions, run_server

    _logging(verbose)
    try:
        run_server(
            ServeOptions(
                data_dir,
                http_host,
                http_port,
                broker_url,
                "127.0.0.1",
                broker_port,
                chunk_size,
                broker_tls=broker_tls,
                broker_names=tuple(broker_name or ()),
                api_tls=api_tls,
                artifacts=StoreOptions(artifact_store, s3_endpoint_url, s3_region, artifact_cache_mb),
                ingest_workers=ingest_workers,
            )
        )
    except FleetError as e:
        _fail(str(e))


@fleet_app.command("device-add")
def fleet_device_add(
    device_id: str,
    out: Annotated[Path, typer.Option(help="where to write the enrollment JSON (0600)")],
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Register a device; its enrollment ticket (a one-time token that expires) is written to --out.

    Give the ticket to the device: `edgefleet device provision --enrollment TICKET` spends it."""
    import datetime as dt

    from fleet.client import FleetApiError
    from models.fsutil import write_private

    try:
        ticket = _client(server, token, data_dir).add_device(device_id)
    except FleetApiError as e:
        _fail(str(e))
    write_private(out, json.dumps({**ticket, "fleet_api": server}, indent=2).encode(), replace=True)
    expires = dt.datetime.fromtimestamp(ticket["token_expires"], dt.UTC).isoformat(timespec="minutes")
    typer.echo(f"registered {device_id}; enrollment ticket in {out} (one use, until {expires})")


@fleet_app.command("device-token")
def fleet_device_token(
    device_id: str,
    out: Annotated[Path, typer.Option(help="where to write the enrollment ticket (0600)")],
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """A new enrollment ticket for a registered device (its token expired, or the device is replaced:
    enrolling with it revokes the device's earlier certificates). Earlier unused tokens stop working."""
    from fleet.client import FleetApiError
    from models.fsutil import write_private

    try:
        ticket = _client(server, token, data_dir).new_token(device_id)
    except FleetApiError as e:
        _fail(str(e))
    write_private(out, json.dumps({**ticket, "fleet_api": server}, indent=2).encode(), replace=True)
    typer.echo(f"new enrollment ticket for {device_id} in {out}")


@fleet_app.command("device-revoke")
def fleet_device_revoke(
    device_id: str,
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Revoke every certificate of a device; the broker drops it now and refuses it from then on."""
    _print_json(_client(server, token, data_dir).revoke_device(device_id))


@fleet_app.command("device-certs")
def fleet_device_certs(
    device_id: str,
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """The certificates the fleet CA issued to a device, with their expiry and revocation."""
    _print_json(_client(server, token, data_dir).certificates(device_id))


@fleet_app.command("devices")
def fleet_devices(
    server: ServerOpt = "http://127.0.0.1:8080", token: TokenOpt = None, data_dir: FleetDirOpt = None
) -> None:
    """List devices with their state."""
    _print_json(_client(server, token, data_dir).devices())


model_app = typer.Typer(no_args_is_help=True, help="Model versions in the fleet's registry.")
fleet_app.add_typer(model_app, name="model")


@model_app.command("push")
def fleet_model_push(
    archive: Annotated[Path, typer.Argument(metavar="PATH", help="the package archive (.tar)")],
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Register a model package archive as a new version; prints the registered version as JSON.

    The upload's progress goes to stderr: a live bar on a terminal, one summary line otherwise."""
    from edgefleet.progress import ByteProgress
    from fleet.client import FleetApiError

    if not archive.is_file():
        _fail(f"{archive} is not a file: give a package archive (`edgefleet models pack FOLDER -o X.tar`)")
    client = _client(server, token, data_dir)
    try:
        with ByteProgress(
            f"pushing {archive.name}", archive.stat().st_size, waiting_note="the fleet verifies it"
        ) as bar:
            model = client.push_model(archive, progress=bar.update)
    except FleetApiError as e:
        _fail(str(e))
    finally:
        client.close()
    _print_json(model)


# The name before `fleet model push`; scripts use it.
fleet_app.command("model-push", help="Same as `fleet model push`.")(fleet_model_push)


@fleet_app.command("update")
def fleet_update(
    model_name: str,
    version_: Annotated[int, typer.Argument(metavar="VERSION")],
    device: Annotated[list[str], typer.Option("--device", help="a device id; repeat for more")],
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Offer a registered model version to devices."""
    _print_json(_client(server, token, data_dir).start_update(model_name, version_, device))


@fleet_app.command("updates")
def fleet_updates(
    device: Annotated[str | None, typer.Option(help="only this device")] = None,
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """List updates and their states."""
    _print_json(_client(server, token, data_dir).updates(device))


# -- models ---------------------------------------------------------------------------------------
@models_app.command("pack")
def models_pack(folder: Path, out: Annotated[Path, typer.Option("-o", "--out")]) -> None:
    """Verify a package folder and write its archive."""
    from models.errors import ModelError
    from models.package import pack

    try:
        manifest = pack(folder, out)
    except ModelError as e:
        _fail(str(e))
    typer.echo(f"packed {manifest.name} v{manifest.version} -> {out}")


@models_app.command("inspect")
def models_inspect(path: Path) -> None:
    """Print the manifest of a package folder or archive."""
    from models.errors import ModelError
    from models.manifest import load_manifest
    from models.package import read_archive_manifest

    try:
        manifest = load_manifest(path) if path.is_dir() else read_archive_manifest(path)
    except ModelError as e:
        _fail(str(e))
    typer.echo(manifest.to_json())


@models_app.command("schema")
def models_schema() -> None:
    """Print the manifest's JSON Schema."""
    from models.manifest import json_schema

    typer.echo(json_schema(), nl=False)


@models_app.command("verify")
def models_verify(path: Path) -> None:
    """Check every file of a package folder or archive against its manifest."""
    import tempfile

    from models.errors import ModelError
    from models.package import unpack, verify_package

    try:
        if path.is_dir():
            manifest = verify_package(path)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                manifest = unpack(path, Path(tmp) / "pkg")
    except ModelError as e:
        _fail(str(e))
    typer.echo(f"ok: {manifest.name} v{manifest.version}, {len(manifest.files)} files verified")


# -- demo -----------------------------------------------------------------------------------------
@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo keeps its data dirs")] = Path("demo-run"),
    devices: Annotated[int, typer.Option(help="number of device agents")] = 3,
) -> None:
    """Fleet server + Mosquitto + devices: infer on v1, push v2, watch it committed, print a summary."""
    from edgefleet.demo import DemoFailed, run_demo

    try:
        run_demo(workdir, devices)
    except DemoFailed as e:
        _fail(str(e))
