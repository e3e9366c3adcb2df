"""The device's configuration, kept as `device.json` in its data dir; secrets live beside it in files."""

import json
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device.errors import ConfigError
from models.fsutil import write_private
from protocol.topics import require_device_id

CONFIG_FILE = "device.json"


class DeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(description="this device's id; also its MQTT user name")
    fleet_url: str = Field(description="the fleet's broker, mqtt://host:port")
    api_host: str = Field(default="127.0.0.1", description="address the local API listens on")
    api_port: int = Field(default=8081, ge=0, le=65535, description="port of the local API")
    health_interval_s: float = Field(default=5.0, gt=0, description="seconds between health reports")
    probation_s: float = Field(default=30.0, ge=0, description="seconds a new model is watched before commit")
    pipeline_poll_s: float = Field(default=0.2, gt=0, description="how often the inbox folder is scanned")
    backend: str | None = Field(default=None, description="pin one backend by name instead of choosing")
    telemetry_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=64 * 1024, description="disk bound of the telemetry outbox"
    )


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
        self.device_key = self.secrets / "device-key.pem"
        self.fleet_telemetry_key = root / "fleet-telemetry-key.pem"
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

    def write_secret(self, name: str, value: str) -> None:
        self.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.secrets / name
        write_private(path, value.encode(), replace=True)

    def ensure_api_token(self) -> str:
        if not (self.secrets / "api-token").exists():
            self.write_secret("api-token", secrets.token_urlsafe(32))
        return self.secret("api-token")

    def make_dirs(self) -> None:
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


def validate_device_id(device_id: str) -> str:
    try:
        return require_device_id(device_id)
    except ValueError as e:
        raise ConfigError(str(e)) from e
