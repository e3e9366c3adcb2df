"""Enrollment tokens, certificate issue, renewal and revocation: the fleet's logic on a real SQLite
file, and its routes on a real HTTP server."""

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.api import create_app
from fleet.db import Device, TelemetryRecordRow, open_database
from fleet.enrollment import DeviceCertificate, EnrollmentRefused, TooManyFailures, enrollment_of
from fleet.errors import Conflict, InvalidRequest, NotFound
from fleet.service import FleetService
from fleet.store import FleetDataDir
from models.signing import public_key_pem
from tests.asgi_server import serving
from tests.conftest import make_csr

OPERATOR = "operator-token-for-tests"


def make_service(root: Path, broker_url: str = "mqtts://127.0.0.1:8883") -> FleetService:
    data = FleetDataDir(root)
    data.make_dirs()
    return FleetService(data, open_database(data.database), broker_url)


@pytest.fixture
def service(tmp_path: Path) -> FleetService:
    return make_service(tmp_path / "fleet")


@contextlib.contextmanager
def serve_fleet_api(
    service: FleetService, requests: list[bytes] | None = None, https: bool = False
) -> Iterator[str]:
    """The fleet's real API app on a real port, in a thread; yields its base URL. Every request body
    the fleet receives is appended to `requests` when given. `https`: with the CA's API certificate."""
    app = create_app(service, OPERATOR)

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        async def receive_and_record() -> Any:
            message = await receive()
            if requests is not None and message.get("type") == "http.request":
                requests.append(message.get("body", b""))
            return message

        await app(scope, receive_and_record, send)

    cert, key = service.data.ca().api_tls() if https else (None, None)
    tls = (str(cert), str(key)) if https else None
    with serving(recording, https=tls, lifespan="off") as url:
        yield url


def enroll(service: FleetService, token: str, client: str = "10.0.0.1", **kw: Any) -> dict[str, Any]:
    return enrollment_of(service).enroll(token, kw.pop("csr", None) or make_csr()[1], client=client, **kw)


def test_a_ticket_holds_a_token_and_fingerprints_but_no_credential(service: FleetService) -> None:
    ticket = service.add_device("cam-1")
    assert set(ticket) == {"device_id", "enrollment_token", "token_expires", "pins", "ca_certificate"}
    assert ticket["ca_certificate"] == service.data.ca().certificate_pem
    assert ticket["token_expires"] > time.time() + 24 * 3600
    assert ticket["pins"]["ca_sha256"] == service.data.ca().fingerprint
    # Stored hashed only: the token's text is nowhere in the database.
    token = ticket["enrollment_token"]
    assert token.encode() not in service.data.database.read_bytes()
    for wal in service.data.root.glob("fleet.sqlite*"):
        assert token.encode() not in wal.read_bytes()
    with pytest.raises(Conflict):
        service.add_device("cam-1")
    with pytest.raises(InvalidRequest, match="the fleet's own"):
        service.add_device("edgefleet-fleet")


def test_a_token_works_once(service: FleetService) -> None:
    token = service.add_device("cam-1")["enrollment_token"]
    key, csr = make_csr()
    answer = enroll(service, token, csr=csr)
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert cert.public_key() == key.public_key()
    assert answer["fleet_url"] == "mqtts://127.0.0.1:8883" and "mqtt_password" not in answer
    assert answer["ca_certificate"] == service.data.ca().certificate_pem
    with pytest.raises(EnrollmentRefused, match="unknown, used or expired"):
        enroll(service, token)
    (row,) = enrollment_of(service).certificates("cam-1")
    assert row["serial"] == f"{cert.serial_number:x}" and row["how"] == "enroll"


def test_a_token_expires(service: FleetService) -> None:
    enrollment_of(service).token_ttl_s = 0.2
    token = service.add_device("cam-1")["enrollment_token"]
    time.sleep(0.3)
    with pytest.raises(EnrollmentRefused):
        enroll(service, token)


def test_two_devices_racing_with_one_token_get_one_certificate(service: FleetService) -> None:
    token = service.add_device("cam-1")["enrollment_token"]
    outcomes: list[str] = []

    def attempt(i: int) -> None:
        try:
            enroll(service, token, client=f"10.0.0.{i}")
            outcomes.append("ok")
        except EnrollmentRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["refused"] * 5
    assert len(enrollment_of(service).certificates("cam-1")) == 1


def test_a_bad_csr_does_not_spend_the_token(service: FleetService) -> None:
    token = service.add_device("cam-1")["enrollment_token"]
    with pytest.raises(InvalidRequest, match="certificate signing request"):
        enroll(service, token, csr="garbage")
    assert enroll(service, token)["device_id"] == "cam-1"


def test_enrollment_pins_the_devices_signing_key(service: FleetService) -> None:
    signing = Ed25519PrivateKey.generate()
    token = service.add_device("cam-1")["enrollment_token"]
    enroll(service, token, device_key_pem=public_key_pem(signing))
    with service.sessions() as s:
        device = s.get(Device, "cam-1")
        assert device is not None and device.public_key == public_key_pem(signing)


def test_re_enrolling_revokes_the_old_certificates_and_repins(service: FleetService) -> None:
    first = enroll(service, service.add_device("cam-1")["enrollment_token"])
    old_serial = x509.load_pem_x509_certificate(first["certificate"].encode()).serial_number
    stale = enrollment_of(service).new_token("cam-1")["enrollment_token"]
    ticket = enrollment_of(service).new_token("cam-1")
    with pytest.raises(EnrollmentRefused):  # a newer ticket voids the older unused one
        enroll(service, stale)
    new_key = Ed25519PrivateKey.generate()
    enroll(service, ticket["enrollment_token"], device_key_pem=public_key_pem(new_key))
    assert old_serial in service.data.ca().revoked_serials()
    rows = enrollment_of(service).certificates("cam-1")
    assert [r["revoked_at"] is not None for r in rows] == [True, False]
    with service.sessions() as s:
        assert s.get(Device, "cam-1").public_key == public_key_pem(new_key)  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        enrollment_of(service).new_token("nobody")


def test_renewal_needs_a_live_certificate_and_the_same_key(service: FleetService) -> None:
    key, csr = make_csr()
    cert = enroll(service, service.add_device("cam-1")["enrollment_token"], csr=csr)["certificate"]
    same_key_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    renewed = enrollment_of(service).renew(cert, same_key_csr)
    new_cert = x509.load_pem_x509_certificate(renewed["certificate"].encode())
    assert new_cert.public_key() == key.public_key()
    assert new_cert.serial_number != x509.load_pem_x509_certificate(cert.encode()).serial_number
    with pytest.raises(EnrollmentRefused, match="not for the certificate's key"):
        enrollment_of(service).renew(cert, make_csr()[1])
    enrollment_of(service).revoke_device("cam-1")
    with pytest.raises(EnrollmentRefused, match="revoked"):
        enrollment_of(service).renew(renewed["certificate"], same_key_csr)


def test_revoking_a_device_revokes_all_its_certificates(service: FleetService) -> None:
    enroll(service, service.add_device("cam-1")["enrollment_token"])
    enroll(service, service.add_device("cam-2")["enrollment_token"])
    changed: list[str] = []
    service.on_credentials_changed = lambda: changed.append("reload")
    revoked = enrollment_of(service).revoke_device("cam-1")
    assert len(revoked) == 1 and changed == ["reload"]
    with service.sessions() as s:
        live = s.query(DeviceCertificate).filter(DeviceCertificate.revoked_at.is_(None)).all()
        assert [row.device_id for row in live] == ["cam-2"]
    assert {int(serial, 16) for serial in revoked} <= service.data.ca().revoked_serials()


def test_plain_mode_keeps_passwords(tmp_path: Path) -> None:
    """A broker URL without TLS: the ticket also carries a password, and enrolling issues a new one."""
    service = make_service(tmp_path / "fleet", "mqtt://127.0.0.1:1883")
    ticket = service.add_device("cam-1")
    assert ticket["mqtt_password"] and ticket["fleet_url"] == "mqtt://127.0.0.1:1883"
    answer = enroll(service, ticket["enrollment_token"])
    assert answer["mqtt_password"] != ticket["mqtt_password"]
    passwd = service.data.password_file.read_text()
    assert passwd.startswith("cam-1:$7$") and answer["mqtt_password"] not in passwd
    enrollment_of(service).revoke_device("cam-1")
    assert "cam-1:" not in service.data.password_file.read_text()


def test_refused_attempts_are_rate_limited_per_address(service: FleetService) -> None:
    token = service.add_device("cam-1")["enrollment_token"]
    for _ in range(10):
        with pytest.raises(EnrollmentRefused):
            enroll(service, "eft1_guess", client="10.9.9.9")
    with pytest.raises(TooManyFailures):
        enroll(service, token, client="10.9.9.9")  # even a good token, from that address, for now
    assert enroll(service, token, client="10.0.0.2")["device_id"] == "cam-1"


def test_the_routes_over_http(service: FleetService) -> None:
    ticket = service.add_device("cam-1")
    with serve_fleet_api(service) as url, httpx.Client(base_url=url, timeout=10) as http:
        body = {"token": ticket["enrollment_token"], "csr": make_csr()[1]}
        first = http.post("/api/enroll", json=body)  # no operator token: the enrollment token is it
        assert first.status_code == 200, first.text
        assert http.post("/api/enroll", json=body).status_code == 403
        assert http.post("/api/enroll", json={**body, "extra": 1}).status_code == 422
        renew = {"certificate": first.json()["certificate"], "csr": make_csr()[1]}
        assert http.post("/api/enroll/renew", json=renew).status_code == 403  # another key
        for path in ("/api/devices/cam-1/token", "/api/devices/cam-1/revoke"):
            assert http.post(path).status_code == 401
        assert http.get("/api/devices/cam-1/certificates").status_code == 401
        operator = {"Authorization": f"Bearer {OPERATOR}"}
        fresh = http.post("/api/devices/cam-1/token", headers=operator)
        assert fresh.status_code == 201 and fresh.json()["enrollment_token"] != ticket["enrollment_token"]
        revoked = http.post("/api/devices/cam-1/revoke", headers=operator).json()["revoked"]
        certs = http.get("/api/devices/cam-1/certificates", headers=operator).json()
        assert [c["serial"] for c in certs] == revoked
        for _ in range(10):
            http.post("/api/enroll", json={**body, "token": "eft1_wrong"})
        limited = http.post("/api/enroll", json=body)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1


def test_fingerprints_in_the_ticket_match_what_enrollment_returns(service: FleetService) -> None:
    ticket = service.add_device("cam-1")
    answer = enroll(service, ticket["enrollment_token"])
    pins = ticket["pins"]
    cert = x509.load_pem_x509_certificate(answer["ca_certificate"].encode())
    assert pins["ca_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    assert pins["tuf_root_sha256"] == hashlib.sha256(answer["tuf_root"].encode()).hexdigest()
    assert pins["telemetry_key_sha256"] == hashlib.sha256(answer["fleet_telemetry_key"].encode()).hexdigest()


def test_re_enrolling_tells_the_device_where_its_telemetry_seqs_continue(service: FleetService) -> None:
    first = enroll(service, service.add_device("cam-1")["enrollment_token"])
    assert first["telemetry_seq_start"] == 1
    with service.sessions.begin() as s:
        s.add_all(
            TelemetryRecordRow(device_id="cam-1", seq=seq, kind="metric", ts=0.0, received=0.0, body={})
            for seq in (5, 40)
        )
    again = enroll(service, enrollment_of(service).new_token("cam-1")["enrollment_token"])
    assert again["telemetry_seq_start"] == 41
