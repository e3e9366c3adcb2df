"""Provisioning: turn an empty folder into a device data dir from the fleet's enrollment and a model."""

import json
from pathlib import Path
from typing import Any

from device.atomic import write_json_atomic
from device.config import DataDir, DeviceConfig, validate_device_id
from device.errors import ConfigError
from device.slots import install_initial
from device.tuf_client import bootstrap
from models.manifest import Manifest
from models.signing import generate_private_key


def provision(data_dir: Path, enrollment: dict[str, Any], model_archive: Path, **settings: Any) -> Manifest:
    """Write config, secrets and the fleet's TUF root, and install the first model into slot `a`."""
    data = DataDir(data_dir)
    if data.config.exists():
        raise ConfigError(f"{data.config} exists: this data dir is already provisioned")
    try:
        device_id = validate_device_id(str(enrollment["device_id"]))
        fleet_url = str(enrollment["fleet_url"])
        password = str(enrollment["mqtt_password"])
        tuf_root = str(enrollment["tuf_root"]).encode()
        telemetry_key = str(enrollment["fleet_telemetry_key"])
    except KeyError as e:
        raise ConfigError(f"enrollment lacks {e.args[0]!r}: use the JSON the fleet returned") from e
    config = DeviceConfig(device_id=device_id, fleet_url=fleet_url, **settings)
    data.make_dirs()
    bootstrap(data.root, tuf_root)  # the root of trust for every update this device will take
    data.write_secret("mqtt-password", password)
    data.fleet_telemetry_key.write_text(telemetry_key)
    if not data.device_key.exists():
        generate_private_key(data.device_key)  # the device's own identity; never leaves the device
    data.ensure_api_token()
    manifest = install_initial(data.models, model_archive)
    write_json_atomic(data.config, config.model_dump())
    return manifest


def load_enrollment(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read enrollment {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"enrollment {path} is not a JSON object")
    return data
