"""`edgefleet fleet rollout ...` and `edgefleet fleet window ...`: phased rollouts from the terminal."""

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

rollout_app = typer.Typer(
    no_args_is_help=True, help="Phased rollouts: start, watch, pause, abort, roll back."
)
window_app = typer.Typer(no_args_is_help=True, help="Maintenance windows per device group.")

ServerOpt = Annotated[str, typer.Option("--server", help="fleet API URL")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="operator token (or EDGEFLEET_TOKEN)")]
FleetDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="the fleet's data dir, to read its operator token")
]
FINAL = ("completed", "aborted", "rolled_back")
BAR = 30


@contextmanager
def _client(server: str, token: str | None, data_dir: Path | None) -> Iterator[Any]:
    from fleet.client import FleetApiError, FleetClient

    token = token or os.environ.get("EDGEFLEET_TOKEN")
    if token is None and data_dir is not None and (data_dir / "secrets" / "operator-token").exists():
        token = (data_dir / "secrets" / "operator-token").read_text().strip()
    if token is None:
        typer.echo("error: no operator token: pass --token, set EDGEFLEET_TOKEN, or --data-dir", err=True)
        raise typer.Exit(2)
    client = FleetClient(server, token)
    try:
        yield client
    except FleetApiError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def render(view: dict[str, Any]) -> str:
    """A campaign as a few lines: a progress bar, then one line per phase."""
    done = round(view["progress"] * BAR)
    lines = [
        f"rollout {view['campaign_id']}  {view['model_name']} v{view['version']}  {view['state']}"
        + (f": {view['reason']}" if view.get("reason") else ""),
        f"[{'#' * done}{'.' * (BAR - done)}] {view['progress']:.0%}",
    ]
    for phase in view["phases"]:
        counts = ", ".join(
            f"{phase[k]} {k.replace('_', ' ')}"
            for k in ("committed", "failed", "rolled_back", "in_progress")
            if phase.get(k)
        )
        lines.append(
            f"  {phase['name']:<10} {phase['state']:<12} {phase['offered']}/{phase['devices']} offered"
            + (f"; {counts}" if counts else "")
        )
    if view.get("skipped"):
        lines.append(f"  skipped (already on v{view['version']} or newer): {len(view['skipped'])}")
    return "\n".join(lines)


@rollout_app.command("start")
def rollout_start(
    model_name: str,
    version: Annotated[int, typer.Argument(help="the registered version to roll out")],
    device: Annotated[list[str] | None, typer.Option("--device", help="a device id; repeat")] = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="a device group; repeat")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="a device tag; repeat")] = None,
    phases: Annotated[
        str | None,
        typer.Option(help='JSON list, e.g. [{"name":"canary","count":1,"abort":{"max_failures":0}}, ...]'),
    ] = None,
    seed: Annotated[str | None, typer.Option(help="orders the devices (which is the canary)")] = None,
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Start a phased rollout (default phases: 1 canary, then 10%, then all)."""
    target = {"devices": device or [], "groups": group or [], "tags": tag or []}
    try:
        phase_list = json.loads(phases) if phases else None
    except json.JSONDecodeError as e:
        typer.echo(f"error: --phases is not JSON: {e}", err=True)
        raise typer.Exit(2) from None
    with _client(server, token, data_dir) as client:
        view = client.start_rollout(model_name, version, target, phase_list, seed)
    typer.echo(render(view))


@rollout_app.command("status")
def rollout_status(
    campaign_id: str,
    watch: Annotated[bool, typer.Option("--watch", help="redraw until the rollout ends")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the whole view, devices and timelines")] = False,
    every: Annotated[float, typer.Option(help="seconds between redraws")] = 1.0,
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Show a rollout: progress, phases, and with --json each device's timeline."""
    with _client(server, token, data_dir) as client:
        view = client.rollout(campaign_id)
        if as_json:
            _echo_json(view)
            return
        shown = 0
        while True:
            text = render(view)
            if shown and sys.stdout.isatty():
                typer.echo(f"\x1b[{shown}F\x1b[J", nl=False)  # redraw in place
            typer.echo(text)
            shown = text.count("\n") + 1
            if not watch or view["state"] in FINAL:
                return
            time.sleep(every)
            view = client.rollout(campaign_id)


@rollout_app.command("list")
def rollout_list(
    server: ServerOpt = "http://127.0.0.1:8080", token: TokenOpt = None, data_dir: FleetDirOpt = None
) -> None:
    """List rollouts."""
    with _client(server, token, data_dir) as client:
        _echo_json(client.rollouts())


def _action(name: str, help_text: str) -> None:
    def command(
        campaign_id: str,
        reason: Annotated[str, typer.Option(help="recorded with the action")] = "",
        server: ServerOpt = "http://127.0.0.1:8080",
        token: TokenOpt = None,
        data_dir: FleetDirOpt = None,
    ) -> None:
        with _client(server, token, data_dir) as client:
            typer.echo(render(client.rollout_action(campaign_id, name, reason)))

    command.__doc__ = help_text
    rollout_app.command(name)(command)


_action("pause", "Stop offering to new devices; reports still count.")
_action("resume", "Go on offering where the rollout paused.")
_action("abort", "Stop for good; offers not yet acted on are withdrawn.")
_action("rollback", "Stop, and have every device already updated serve its previous version again.")


@window_app.command("add")
def window_add(
    group: str,
    cron: Annotated[str, typer.Argument(help="when each window opens, 5 fields, e.g. '0 2 * * *'")],
    minutes: Annotated[int, typer.Argument(help="how long it stays open")],
    tz: Annotated[str, typer.Option(help="IANA time zone")] = "UTC",
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Add a maintenance window to a device group: outside it, its devices download but do not switch."""
    with _client(server, token, data_dir) as client:
        _echo_json(client.add_window(group, cron, minutes, tz))


@window_app.command("list")
def window_list(
    server: ServerOpt = "http://127.0.0.1:8080", token: TokenOpt = None, data_dir: FleetDirOpt = None
) -> None:
    """List maintenance windows."""
    with _client(server, token, data_dir) as client:
        _echo_json(client.windows())


@window_app.command("rm")
def window_rm(
    window_id: int,
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Remove a maintenance window."""
    with _client(server, token, data_dir) as client:
        client.remove_window(window_id)
    typer.echo(f"removed window {window_id}")


def device_label(
    device_id: str,
    group: Annotated[list[str] | None, typer.Option("--group", help="a group; repeat")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="a tag; repeat")] = None,
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Set a device's groups and tags (replacing the old ones); rollouts target them."""
    with _client(server, token, data_dir) as client:
        _echo_json(client.set_labels(device_id, group or [], tag or []))


def device_rollback(
    device_id: str,
    model_name: str,
    to_version: Annotated[int, typer.Argument(help="the version the device's other slot holds")],
    reason: Annotated[str, typer.Option(help="recorded with the rollback")] = "",
    server: ServerOpt = "http://127.0.0.1:8080",
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Have one device serve its previous version again, from its other slot."""
    with _client(server, token, data_dir) as client:
        _echo_json(client.roll_back(device_id, model_name, to_version, reason))


def register(fleet_app: typer.Typer) -> None:
    """Hang these commands under `edgefleet fleet`."""
    fleet_app.add_typer(rollout_app, name="rollout")
    fleet_app.add_typer(window_app, name="window")
    fleet_app.command("device-label")(device_label)
    fleet_app.command("rollback")(device_rollback)
