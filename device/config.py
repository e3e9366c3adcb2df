"""The device's configuration, kept as `device.json` in its data dir; secrets live beside it in files."""

import json
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device.errors import ConfigError
from models.fsutil import write_private
from protocol.topics import require_device_id

CONFIG_FILE = "device.json"


class ModelBatching(BaseModel):
    """The micro-batcher of one model (device/engine/batcher.py BatchConfig)."""

    model_config = ConfigDict(extra="forbid")
    # 16 with no wait groups only requests already waiting: +26-32% items/s under 16 clients, no
    # added latency when idle (bench/engine/RESULTS.md). Only a model whose inputs all have a
    # dynamic first dimension is stacked; others run one request at a time whatever this says.
    max_batch: int = Field(default=16, ge=1, le=1024, description="rows grouped per run (1: off)")
    max_wait_ms: float = Field(default=0.0, ge=0, le=100, description="how long a batch may wait to fill")
    max_queue: int = Field(default=32, ge=1, le=100_000, description="requests waiting before 503")
    workers: int = Field(default=1, ge=1, le=64, description="engine calls in flight (ONNX Runtime only)")


class PlantSignal(BaseModel):
    """A plant topic that marks the line busy or idle (device/line_mqtt.py)."""

    model_config = ConfigDict(extra="forbid")
    broker_url: str = Field(description="the plant broker: mqtt://host:port or mqtts://host:port")
    topic: str = Field(min_length=1, description="the topic the PLC gateway publishes the line state on")
    credentials_file: Path | None = Field(default=None, description="user (line 1) and password (line 2)")
    ca_file: Path | None = Field(default=None, description="mqtts: the plant broker's CA")
    busy_field: str = Field(default="busy", description="dotted path of the busy value in a JSON payload")
    by_field: str | None = Field(default="by", description="dotted path of who set it")
    busy_values: list[str] = Field(default=["busy", "1", "true"], description="words meaning busy")
    idle_values: list[str] = Field(default=["idle", "0", "false"], description="words meaning idle")
    stale_after_s: float | None = Field(
        default=60.0, gt=0, description="silence after which the line counts as busy (null: never)"
    )
    client_id: str | None = Field(default=None, description="MQTT client id, when the plant's ACL needs one")


class DeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(description="this device's id; the CN of its certificate, its MQTT user name")
    fleet_url: str = Field(description="the fleet's broker: mqtts://host:port (TLS) or mqtt://host:port")
    fleet_api: str | None = Field(
        default=None, description="the fleet's HTTP API, where the device enrolled and renews its certificate"
    )
    api_host: str = Field(default="127.0.0.1", description="address the local API listens on")
    api_port: int = Field(default=8081, ge=0, le=65535, description="port of the local API")
    api_tls: bool = Field(
        default=True,
        description="serve the local API over HTTPS with the device's certificate, when it has one",
    )
    batching: dict[str, ModelBatching] = Field(
        default_factory=dict,
        description=(
            "per model name: how local API requests are queued and grouped (default: no grouping, "
            "2 calls in flight on ONNX Runtime's CPU provider, else 1)"
        ),
    )
    plant_signal: PlantSignal | None = Field(
        default=None, description="a plant MQTT topic for the line state, besides PUT /api/line"
    )
    keys_refresh_s: float = Field(
        default=3600.0, gt=0, description="seconds between refreshes of the fleet's signed keys document"
    )
    health_interval_s: float = Field(default=5.0, gt=0, description="seconds between health reports")
    probation_s: float = Field(default=30.0, ge=0, description="seconds a new model is watched before commit")
    pipeline_poll_s: float = Field(default=0.2, gt=0, description="how often the inbox folder is scanned")
    backend: str | None = Field(default=None, description="pin one backend by name instead of choosing")
    precision: Literal["auto", "fp32"] = Field(
        default="auto",
        description="auto: serve a package's int8/fp16 variant where it passes its check here; fp32: never",
    )
    telemetry_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=64 * 1024, description="disk bound of the telemetry outbox"
    )
    probation_max_error_rate: float = Field(
        default=0.2, ge=0, le=1, description="inference errors during probation that roll a model back"
    )
    # The shadow gate: during probation the previous model runs beside the new one on sampled inputs.
    shadow_sample_rate: float = Field(default=0.25, ge=0, le=1, description="share of live inputs")
    shadow_cpu_budget: float = Field(default=0.1, gt=0, le=1, description="shadow CPU seconds per second")
    shadow_min_samples: int = Field(default=50, ge=1, description="below this the gate decides nothing")
    # 0.9, not 0.97: a real fine-tune changes some labels (the sample v1 -> v2 agrees on 96.5% of
    # images, being right more often); a rollout phase can demand more through its abort rule.
    shadow_min_agreement: float = Field(default=0.9, ge=0, le=1, description="least top-1 agreement")
    shadow_max_p95_increase: float = Field(default=0.2, ge=0, description="0.2: new p95 at most +20%")


@dataclass(frozen=True)
class LinkTls:
    """The files of the device's TLS link to the broker: the fleet CA, its certificate and its key."""

    cafile: Path
    certfile: Path
    keyfile: Path

    def context(self) -> ssl.SSLContext:
        """Checks the broker's certificate (and host name) against the fleet CA; shows ours."""
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.cafile))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self.certfile), str(self.keyfile))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the device's TLS files ({e}): provision the device again") from e
        return context


class DataDir:
    """The layout of a device's data dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / CONFIG_FILE
        self.secrets = root / "secrets"
        self.models = root / "models"
        self.inbox = root / "inbox"
        self.processed = root / "processed"
        self.rejected = root / "rejected"
        self.results = root / "results"
        self.logs = root / "logs"
        self.device_key = self.secrets / "device-key.pem"  # Ed25519: signs telemetry
        self.tls_key = self.secrets / "tls-key.pem"  # P-256: the key of its broker certificate
        self.device_cert = root / "device-cert.pem"
        self.fleet_ca = root / "fleet-ca.pem"
        # What the fleet answered at enrollment, kept until provisioning finished, so that a power cut
        # in between does not waste the one-time token.
        self.enrollment_answer = self.secrets / "enrollment-answer.json"
        self.fleet_telemetry_key = root / "fleet-telemetry-key.pem"  # from enrollment, until keys.json
        self.fleet_keys = root / "fleet-keys.json"  # the fleet's signed keys document (device/fleet_keys.py)
        self.outbox = root / "telemetry" / "outbox.sqlite"

    def load_config(self) -> DeviceConfig:
        try:
            return DeviceConfig.model_validate(json.loads(self.config.read_text()))
        except FileNotFoundError as e:
            raise ConfigError(f"{self.config} not found: run `edgefleet device provision` first") from e
        except (json.JSONDecodeError, ValidationError) as e:
            raise ConfigError(f"{self.config} is invalid: {e}") from e

    def secret(self, name: str) -> str:
        path = self.secrets / name
        try:
            return path.read_text().strip()
        except FileNotFoundError as e:
            raise ConfigError(f"secret {path} is missing: provision the device again") from e

    def optional_secret(self, name: str) -> str | None:
        """A secret that only some setups have (the broker password exists in plain mode only)."""
        path = self.secrets / name
        return path.read_text().strip() if path.exists() else None

    def link_tls(self) -> LinkTls | None:
        """The TLS files, or None for a device enrolled before certificates (plain mode)."""
        if not self.device_cert.exists():
            return None
        return LinkTls(self.fleet_ca, self.device_cert, self.tls_key)

    def write_secret(self, name: str, value: str) -> None:
        self.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.secrets / name
        write_private(path, value.encode(), replace=True)

    def ensure_api_token(self, break_glass: str | None = None) -> str:
        """The break-glass credential of the local API (`secrets/api-token`): `break_glass` when
        given (checked, replaces the one kept), else the one kept, else a new random one."""
        if break_glass is not None:
            self.write_secret("api-token", check_break_glass(break_glass))
        elif not (self.secrets / "api-token").exists():
            self.write_secret("api-token", secrets.token_urlsafe(32))
        return self.secret("api-token")

    def make_dirs(self) -> None:
        self.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
        for folder in (
            self.models,
            self.inbox,
            self.processed,
            self.rejected,
            self.results,
            self.logs,
            self.outbox.parent,
        ):
            folder.mkdir(parents=True, exist_ok=True)


MIN_BREAK_GLASS_CHARS = 16
_BREAK_GLASS = re.compile(r"[!-~]+")  # printable ASCII, no spaces: it travels in an HTTP header


def check_break_glass(value: str) -> str:
    """`value` if it can serve as the break-glass credential, else a ConfigError saying what to fix."""
    if len(value) < MIN_BREAK_GLASS_CHARS:
        raise ConfigError(
            f"the break-glass credential has {len(value)} characters; use at least "
            f"{MIN_BREAK_GLASS_CHARS} (e.g. `openssl rand -base64 24`)"
        )
    if not _BREAK_GLASS.fullmatch(value):
        raise ConfigError(
            "the break-glass credential must be printable ASCII without spaces (it is sent as "
            "`Authorization: Bearer <credential>`)"
        )
    if value.startswith("eft1."):
        raise ConfigError("the break-glass credential must not start with 'eft1.' (that marks field tokens)")
    return value


def read_break_glass(path: Path) -> str:
    """The break-glass credential kept in the first line of `path` (surrounding blanks dropped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the break-glass file {path}: {e}") from e
    return check_break_glass(lines[0].strip() if lines else "")


def validate_device_id(device_id: str) -> str:
    try:
        return require_device_id(device_id)
    except ValueError as e:
        raise ConfigError(str(e)) from e
