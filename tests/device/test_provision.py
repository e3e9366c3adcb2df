import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device.config import DataDir
from device.errors import ConfigError
from device.provision import load_enrollment, provision
from fleet.tuf_repository import TufRepository


@pytest.fixture(scope="module")
def tuf_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("fleet-tuf")
    repo = TufRepository(folder / "tuf", folder / "keys")
    repo.init()
    return repo.trusted_root().decode()


def enrollment(tuf_root: str, device_id: str = "cam-1") -> dict[str, object]:
    return {
        "device_id": device_id,
        "fleet_url": "mqtt://127.0.0.1:1883",
        "mqtt_password": "s3cret",
        "tuf_root": tuf_root,
        "fleet_telemetry_key": X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    }


def test_provision_writes_config_secrets_keys_and_slot_a(
    tmp_path: Path, archives: dict[int, Path], tuf_root: str
) -> None:
    manifest = provision(tmp_path / "d", enrollment(tuf_root), archives[1], api_port=9999)
    data = DataDir(tmp_path / "d")
    assert manifest.version == 1 and data.load_config().api_port == 9999
    assert (data.models / "surface-defect" / "current").readlink().name == "a"
    assert os.stat(data.secrets / "mqtt-password").st_mode & 0o777 == 0o600
    assert os.stat(data.secrets / "api-token").st_mode & 0o777 == 0o600
    assert os.stat(data.device_key).st_mode & 0o777 == 0o600
    assert data.fleet_telemetry_key.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert (data.root / "tuf" / "trusted-root.json").read_text() == tuf_root
    with pytest.raises(ConfigError, match="already provisioned"):
        provision(tmp_path / "d", enrollment(tuf_root), archives[1])


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"device_id": "Bad/Id"}, "invalid device id"),
        ({"mqtt_password": None}, "lacks"),
        ({"tuf_root": '{"signed": {}}'}, "not a valid self-signed root"),
    ],
)
def test_bad_enrollment_is_refused(
    tmp_path: Path, archives: dict[int, Path], broken: dict[str, object], message: str, tuf_root: str
) -> None:
    data = {k: v for k, v in {**enrollment(tuf_root), **broken}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        provision(tmp_path / "d", data, archives[1])
    assert not (tmp_path / "d" / "device.json").exists()


def test_enrollment_file_must_be_a_json_object(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="not a JSON object"):
        load_enrollment(path)
