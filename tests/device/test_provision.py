import asyncio
import base64
import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device.config import DataDir
from device.errors import ConfigError
from device.link import DeviceLink
from device.provision import (
    _enroll_once,
    load_enrollment,
    provision,
    renew_certificate,
    renew_forever,
    renewal_due,
)
from device.telemetry.outbox import Kind, Outbox
from edgefleet.procs import free_port
from fleet.broker import ManagedBroker
from fleet.ca import FleetCA
from fleet.db import Device, open_database
from fleet.enrollment import enrollment_of
from fleet.mqtt_worker import FleetWorker
from fleet.service import FleetService
from fleet.store import FleetDataDir
from fleet.tuf_repository import TufRepository
from models.signing import generate_private_key, load_private_key, public_key_pem
from protocol.messages import UpdateOffer
from tests.fleet.test_enrollment import serve_fleet_api


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


# -- enrollment with a token, against the fleet's real API and its real TLS broker -----------------
@pytest.fixture
def tls_fleet(tmp_path: Path) -> Iterator[tuple[FleetService, ManagedBroker]]:
    """A fleet service whose managed Mosquitto runs TLS with the fleet CA (as `fleet serve` does)."""
    data = FleetDataDir(tmp_path / "fleet")
    data.make_dirs()
    broker = ManagedBroker(data.broker, "127.0.0.1", free_port(), None, data.acl_file, data.ca().broker_tls())
    service = FleetService(data, open_database(data.database), broker.url)
    service.write_broker_auth()
    broker.start()
    service.on_credentials_changed = broker.reload
    try:
        yield service, broker
    finally:
        broker.stop()


def _private_numbers(path: Path) -> list[bytes]:
    """Ways a private key could show up in a request: its PEM body, its raw secret as bytes, hex, base64."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | Ed25519PrivateKey)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raw = key.private_numbers().private_value.to_bytes(32, "big")
    else:
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
    body = b"".join(path.read_bytes().splitlines()[1:-1])
    return [body, raw, raw.hex().encode(), base64.b64encode(raw)]


def test_a_device_enrolls_with_its_own_key_and_connects_over_mutual_tls(
    tls_fleet: tuple[FleetService, ManagedBroker], tmp_path: Path, archives: dict[int, Path]
) -> None:
    service, broker = tls_fleet
    ticket = service.add_device("cam-1")
    requests: list[bytes] = []
    with serve_fleet_api(service, requests) as url:
        provision(tmp_path / "d", ticket, archives[1], fleet_api=url)
    data = DataDir(tmp_path / "d")
    config = data.load_config()
    assert config.fleet_url == broker.url and config.fleet_api == url
    for secret in (data.tls_key, data.device_key, data.secrets / "api-token"):
        assert os.stat(secret).st_mode & 0o777 == 0o600
    assert os.stat(data.secrets).st_mode & 0o777 == 0o700
    assert not (data.secrets / "mqtt-password").exists()
    assert not data.enrollment_answer.exists()
    # The device's keys never left it: the fleet saw a CSR and a public key, nothing else.
    assert requests and all(b'"csr"' in body for body in requests)
    for leak in _private_numbers(data.tls_key) + _private_numbers(data.device_key):
        assert not any(leak in body for body in requests)
        assert not any(leak in path.read_bytes() for path in service.data.root.rglob("*") if path.is_file())
    cert = x509.load_pem_x509_certificate(data.device_cert.read_bytes())
    assert (
        cert.public_key() == serialization.load_pem_private_key(data.tls_key.read_bytes(), None).public_key()
    )
    with service.sessions() as s:  # its telemetry key pinned at enrollment, before any message
        assert s.get(Device, "cam-1").public_key == public_key_pem(load_private_key(data.device_key))  # type: ignore[union-attr]

    async def connect() -> None:
        async def no_offer(_: UpdateOffer) -> None:
            return None

        link = DeviceLink(
            "cam-1",
            config.fleet_url,
            data.optional_secret("mqtt-password"),
            no_offer,
            "t",
            tls=data.link_tls(),
        )
        worker = FleetWorker(service, "127.0.0.1", broker.port)
        tasks = [asyncio.create_task(link.run()), asyncio.create_task(worker.run())]
        try:
            await asyncio.wait_for(link.connected.wait(), 15)
            await asyncio.wait_for(worker.connected.wait(), 15)
            while not service.get_device("cam-1")["online"]:
                await asyncio.sleep(0.05)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(asyncio.wait_for(connect(), 30))


def test_a_ticket_from_another_fleet_is_refused_before_anything_is_written(
    tls_fleet: tuple[FleetService, ManagedBroker], tmp_path: Path, archives: dict[int, Path]
) -> None:
    service, _ = tls_fleet
    ticket = service.add_device("cam-1")
    other = FleetCA(tmp_path / "other-fleet")
    forged = {
        **ticket,
        "ca_certificate": other.certificate_pem,
        "pins": {**ticket["pins"], "ca_sha256": other.fingerprint},
    }
    with serve_fleet_api(service) as url, pytest.raises(ConfigError, match="not the fleet that issued"):
        provision(tmp_path / "d", forged, archives[1], fleet_api=url)
    assert not (tmp_path / "d" / "device.json").exists()
    assert not (tmp_path / "d" / "device-cert.pem").exists()


def test_over_https_the_device_checks_the_fleet_api_against_the_tickets_ca(
    tls_fleet: tuple[FleetService, ManagedBroker], tmp_path: Path, archives: dict[int, Path]
) -> None:
    service, _ = tls_fleet
    ticket = service.add_device("cam-1")
    impostor_ca = FleetCA(tmp_path / "impostor").certificate_pem
    with serve_fleet_api(service, https=True) as url:
        assert url.startswith("https://")
        tampered = {**ticket, "ca_certificate": impostor_ca}
        with pytest.raises(ConfigError, match="does not match its own fingerprint"):
            provision(tmp_path / "d0", tampered, archives[1], fleet_api=url)
        unpinned = {**tampered, "pins": {}}  # a device that trusts another CA does not talk to this API
        with pytest.raises(ConfigError, match=r"cannot reach the fleet.*CERTIFICATE_VERIFY_FAILED"):
            provision(tmp_path / "d1", unpinned, archives[1], fleet_api=url)
        provision(tmp_path / "d2", ticket, archives[1], fleet_api=url)  # the token was not spent above
        data = DataDir(tmp_path / "d2")
        assert data.load_config().fleet_api == url
        renew_certificate(data)  # renewal checks the API against the CA it stored


def test_an_interrupted_provisioning_reuses_the_spent_token(
    tls_fleet: tuple[FleetService, ManagedBroker], tmp_path: Path, archives: dict[int, Path]
) -> None:
    service, _ = tls_fleet
    ticket = service.add_device("cam-1")
    data = DataDir(tmp_path / "d")
    data.make_dirs()
    generate_private_key(data.device_key)
    with serve_fleet_api(service) as url:
        _enroll_once(data, "cam-1", ticket, url)  # ...and the power goes out here
        provision(tmp_path / "d", ticket, archives[1], fleet_api=url)  # the token is spent by now
    assert data.load_config().device_id == "cam-1"
    assert len(enrollment_of(service).certificates("cam-1")) == 1


def test_a_used_or_unknown_token_says_what_to_do(
    tls_fleet: tuple[FleetService, ManagedBroker], tmp_path: Path, archives: dict[int, Path]
) -> None:
    service, _ = tls_fleet
    ticket = service.add_device("cam-1")
    with serve_fleet_api(service) as url:
        provision(tmp_path / "d1", ticket, archives[1], fleet_api=url)
        with pytest.raises(ConfigError, match=r"HTTP 403.*ask the operator for a new one"):
            provision(tmp_path / "d2", ticket, archives[1], fleet_api=url)
    with pytest.raises(ConfigError, match="cannot reach the fleet"):
        provision(tmp_path / "d3", ticket, archives[1], fleet_api=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="no fleet API"):
        provision(tmp_path / "d4", ticket, archives[1])


def test_renewal_gets_a_new_certificate_for_the_same_key(
    tls_fleet: tuple[FleetService, ManagedBroker], tmp_path: Path, archives: dict[int, Path]
) -> None:
    service, _ = tls_fleet
    with serve_fleet_api(service) as url:
        provision(tmp_path / "d", service.add_device("cam-1"), archives[1], fleet_api=url)
        data = DataDir(tmp_path / "d")
        before = x509.load_pem_x509_certificate(data.device_cert.read_bytes())
        assert not renewal_due(data)
        assert renewal_due(data, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=61))
        expires = renew_certificate(data)
        after = x509.load_pem_x509_certificate(data.device_cert.read_bytes())
        assert after.serial_number != before.serial_number and after.public_key() == before.public_key()
        assert expires == after.not_valid_after_utc
        enrollment_of(service).revoke_device("cam-1")
        with pytest.raises(ConfigError, match=r"HTTP 403.*revoked"):
            renew_certificate(data)


def test_the_agents_renewal_task_renews_a_certificate_that_is_due(
    tls_fleet: tuple[FleetService, ManagedBroker], tmp_path: Path, archives: dict[int, Path]
) -> None:
    service, _ = tls_fleet
    # Short-lived certificates, so the first one is due at once (a third of its lifetime is left).
    enrollment_of(service).ca.device_lifetime = dt.timedelta(seconds=30)
    with serve_fleet_api(service) as url:
        provision(tmp_path / "d", service.add_device("cam-1"), archives[1], fleet_api=url)
        data = DataDir(tmp_path / "d")
        first = data.device_cert.read_bytes()
        assert renewal_due(data)

        async def until_renewed() -> None:
            task = asyncio.create_task(renew_forever(data, every_s=0.2))
            try:
                while data.device_cert.read_bytes() == first:
                    await asyncio.sleep(0.05)
            finally:
                task.cancel()

        asyncio.run(asyncio.wait_for(until_renewed(), 20))
    assert [c["how"] for c in enrollment_of(service).certificates("cam-1")][:2] == ["enroll", "renew"]


def test_a_break_glass_credential_from_a_file_becomes_the_api_secret(
    tmp_path: Path, archives: dict[int, Path], tuf_root: str
) -> None:
    secret_file = tmp_path / "break-glass.txt"
    secret_file.write_text("  Plant7-service-credential-2026  \nsecond line is ignored\n")
    provision(tmp_path / "d", enrollment(tuf_root), archives[1], break_glass_file=secret_file)
    data = DataDir(tmp_path / "d")
    assert data.secret("api-token") == "Plant7-service-credential-2026"
    assert os.stat(data.secrets / "api-token").st_mode & 0o777 == 0o600
    assert data.ensure_api_token() == "Plant7-service-credential-2026", "kept, not replaced"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("short-secret-15\n", "has 15 characters; use at least 16"),
        ("", "has 0 characters"),
        ("sixteen or more but spaced\n", "without spaces"),
        ("eft1.looks-like-a-field-token\n", "must not start with 'eft1.'"),
        (None, "cannot read the break-glass file"),
    ],
)
def test_a_weak_or_unreadable_break_glass_credential_is_refused_before_anything_is_written(
    tmp_path: Path, archives: dict[int, Path], tuf_root: str, content: str | None, message: str
) -> None:
    secret_file = tmp_path / "break-glass.txt"
    if content is not None:
        secret_file.write_text(content)
    with pytest.raises(ConfigError, match=message):
        provision(tmp_path / "d", enrollment(tuf_root), archives[1], break_glass_file=secret_file)
    assert not (tmp_path / "d").exists()


def test_a_re_provisioned_device_continues_the_fleets_telemetry_seqs(
    tmp_path: Path, archives: dict[int, Path], tuf_root: str
) -> None:
    """The fleet drops a (device, seq) it holds as a duplicate: a new outbox starting at 1 again
    would lose its first records, so enrollment says where to continue."""
    answer = {**enrollment(tuf_root), "telemetry_seq_start": 41}
    provision(tmp_path / "d", answer, archives[1])
    with Outbox(DataDir(tmp_path / "d").outbox, 64 * 1024) as outbox:
        assert outbox.put(Kind.METRIC, b"{}") == 41
