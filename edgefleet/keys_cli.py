"""`edgefleet fleet keys ...` and `edgefleet fleet field-token ...`: key rotation and field-engineer
tokens from the terminal (through the fleet API, so the running fleet publishes and notifies)."""

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.rollout_cli import FleetDirOpt, ServerOpt, TokenOpt, _client, _echo_json

keys_app = typer.Typer(no_args_is_help=True, help="The fleet's keys: show and rotate.")
token_app = typer.Typer(no_args_is_help=True, help="Field-engineer tokens for devices' local APIs.")
SERVER = "http://127.0.0.1:8080"


@keys_app.command("show")
def keys_show(server: ServerOpt = SERVER, token: TokenOpt = None, data_dir: FleetDirOpt = None) -> None:
    """The keys document devices get, and which keys are current or retiring."""
    with _client(server, token, data_dir) as client:
        _echo_json(client.keys())


@keys_app.command("rotate")
def keys_rotate(
    telemetry: Annotated[bool, typer.Option("--telemetry", help="new telemetry (HPKE) key")] = False,
    signing: Annotated[
        bool, typer.Option("--signing", help="new TUF targets/snapshot/timestamp keys")
    ] = False,
    field_tokens: Annotated[bool, typer.Option("--field-tokens", help="new field-token signing key")] = False,
    root: Annotated[bool, typer.Option("--root", help="new TUF root keys")] = False,
    all_keys: Annotated[bool, typer.Option("--all", help="telemetry, signing and field tokens")] = False,
    kem: Annotated[str, typer.Option("--kem", help="x25519 or mlkem768-x25519 (PQ hybrid)")] = "x25519",
    drop_old: Annotated[
        bool, typer.Option("--drop-old", help="distrust the old field-token key and its tokens now")
    ] = False,
    server: ServerOpt = SERVER,
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Rotate keys while devices keep running: they pick the new ones up at once (online) or when
    they reconnect; the old telemetry key keeps opening what was sealed to it for 30 days."""
    if all_keys:
        telemetry = signing = field_tokens = True
    with _client(server, token, data_dir) as client:
        _echo_json(
            client.rotate_keys(
                telemetry=telemetry,
                signing=signing,
                field_tokens=field_tokens,
                root=root,
                kem=kem,
                drop_old_field_key=drop_old,
            )
        )


@token_app.command("issue")
def token_issue(
    engineer: Annotated[str, typer.Option("--engineer", help="who it is for")],
    role: Annotated[str, typer.Option("--role", help="viewer or technician")],
    device: Annotated[list[str], typer.Option("--device", help="a device id (repeat), or '*'")],
    hours: Annotated[float, typer.Option("--hours", help="lifetime, at most 8")] = 8.0,
    out: Annotated[Path | None, typer.Option("--out", help="write the token to this file (0600)")] = None,
    server: ServerOpt = SERVER,
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Issue a signed token for a field engineer; devices check it offline with the fleet's key."""
    with _client(server, token, data_dir) as client:
        issued = client.issue_field_token(engineer, role, device, hours)
    secret = issued.pop("token")
    expires = dt.datetime.fromtimestamp(issued["expires"], dt.UTC).isoformat()
    if out is not None:
        from models.fsutil import write_private

        write_private(out, secret.encode(), replace=True)
        typer.echo(f"token {issued['jti']} for {engineer} ({role}) until {expires} written to {out}")
    else:
        typer.echo(secret)
        typer.echo(f"# token {issued['jti']} for {engineer} ({role}) until {expires}", err=True)


@token_app.command("list")
def token_list(
    include_expired: Annotated[bool, typer.Option("--all", help="expired tokens too")] = False,
    server: ServerOpt = SERVER,
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    with _client(server, token, data_dir) as client:
        _echo_json(client.field_tokens(include_expired))


@token_app.command("revoke")
def token_revoke(
    jti: Annotated[str, typer.Argument(help="the token id (`field-token list`)")],
    server: ServerOpt = SERVER,
    token: TokenOpt = None,
    data_dir: FleetDirOpt = None,
) -> None:
    """Revoke a token: devices refuse it once they refreshed the keys document (online: at once)."""
    with _client(server, token, data_dir) as client:
        _echo_json(client.revoke_field_token(jti))


def register(fleet_app: typer.Typer) -> None:
    fleet_app.add_typer(keys_app, name="keys")
    fleet_app.add_typer(token_app, name="field-token")
