"""The fleet CA: what it signs, what it refuses, and its CRL."""

import datetime as dt
import os
import ssl
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.broker_auth import FLEET_USER
from fleet.ca import CertificateRefused, FleetCA, certificate_sha256
from fleet.errors import FleetError
from tests.conftest import make_csr


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    return FleetCA(tmp_path / "ca")


def test_the_ca_is_made_once_with_private_files(tmp_path: Path) -> None:
    first = FleetCA(tmp_path / "ca")
    assert stat.S_IMODE(os.stat(tmp_path / "ca").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(first.key_path).st_mode) == 0o600
    again = FleetCA(tmp_path / "ca")
    assert again.fingerprint == first.fingerprint == certificate_sha256(first.certificate_pem)
    constraints = first.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert isinstance(first.certificate.public_key(), ec.EllipticCurvePublicKey)


def test_a_device_certificate_names_the_device_and_nothing_the_csr_asked_for(ca: FleetCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, FLEET_USER)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    issued = ca.issue_device("cam-1", greedy)
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cam-1"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # Client at the broker, server of its local API; named for host-name checks of that API.
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["cam-1"]
    assert cert.public_key() == key.public_key()
    assert cert.serial_number == issued.serial
    cert.verify_directly_issued_by(ca.certificate)
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=89) < lifetime <= dt.timedelta(days=90)


def _tampered(csr_pem: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def _rsa_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("device_id", "csr", "message"),
    [
        (FLEET_USER, None, "the fleet's own"),
        ("edgefleet-anything", None, "the fleet's own"),
        ("Bad/Id", None, "invalid device id"),
        ("cam-1", "not a csr", "not a PEM certificate signing request"),
        ("cam-1", "tampered", "signature does not verify"),
        ("cam-1", "rsa", "RSAPublicKey keys are not accepted"),
        ("cam-1", "x" * 20_000, "at most"),
    ],
)
def test_bad_requests_are_refused(ca: FleetCA, device_id: str, csr: str | None, message: str) -> None:
    pem = make_csr()[1]
    pem = {None: pem, "tampered": _tampered(pem), "rsa": _rsa_csr()}.get(csr, csr)  # type: ignore[arg-type]
    with pytest.raises(CertificateRefused, match=message):
        ca.issue_device(device_id, pem)  # type: ignore[arg-type]


def test_check_accepts_only_live_certificates_of_this_ca(ca: FleetCA, tmp_path: Path) -> None:
    good = ca.issue_device("cam-1", make_csr()[1])
    assert ca.check(good.pem).serial_number == good.serial
    other = FleetCA(tmp_path / "other").issue_device("cam-1", make_csr()[1])
    with pytest.raises(CertificateRefused, match="not issued by this fleet's CA"):
        ca.check(other.pem)
    old = ca.issue_device(
        "cam-1",
        make_csr()[1],
        lifetime=dt.timedelta(days=1),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3),
    )
    with pytest.raises(CertificateRefused, match="valid from"):
        ca.check(old.pem)
    assert ca.revoke(good.serial)
    with pytest.raises(CertificateRefused, match="revoked"):
        ca.check(good.pem)


def test_revocations_accumulate_in_a_signed_crl(ca: FleetCA) -> None:
    serials = [ca.issue_device(f"cam-{i}", make_csr()[1]).serial for i in range(3)]
    assert ca.revoke(serials[0]) and ca.revoke(serials[2])
    assert not ca.revoke(serials[0])
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert {entry.serial_number for entry in crl} == {serials[0], serials[2]}
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.UTC)
    # Reopened, the CA reads its revocations back from the CRL.
    assert FleetCA(ca.folder).revoked_serials() == {serials[0], serials[2]}


def test_a_crl_not_signed_by_the_ca_is_not_trusted(ca: FleetCA, tmp_path: Path) -> None:
    other = FleetCA(tmp_path / "other")
    ca.crl_path.write_bytes(other.crl_path.read_bytes())
    with pytest.raises(FleetError, match="not signed by the fleet CA"):
        ca.revoked_serials()


def test_the_broker_certificate_names_its_hosts_and_is_kept_until_they_change(ca: FleetCA) -> None:
    tls = ca.broker_tls(["fleet.plant.example", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(tls.certfile.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.5"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fleet.plant.example"}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert stat.S_IMODE(os.stat(tls.keyfile).st_mode) == 0o600
    pem = tls.certfile.read_bytes()
    assert ca.broker_tls(["10.0.0.5", "fleet.plant.example"]).certfile.read_bytes() == pem
    assert ca.broker_tls().certfile.read_bytes() != pem


def test_the_fleet_workers_certificate_names_the_fleet_user(ca: FleetCA) -> None:
    cert_path, key_path = ca.fleet_client_files()
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == FLEET_USER
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert ca.fleet_client_files()[0].read_bytes() == cert_path.read_bytes()


def test_workers_starting_together_share_one_client_certificate(ca: FleetCA) -> None:
    # A worker's two sessions (and --ingest-workers processes) ask for the client context at the same
    # moment, each with its own FleetCA of the same folder. Unlocked, two issued at once and one read
    # the other's certificate with its own key: ssl.SSLError "key values mismatch".
    barrier = threading.Barrier(8)

    def context() -> ssl.SSLContext:
        barrier.wait()
        return FleetCA(ca.folder).fleet_client_context()

    for _ in range(5):
        for name in ("fleet-client.pem", "fleet-client-key.pem"):
            (ca.folder / name).unlink(missing_ok=True)
        with ThreadPoolExecutor(8) as pool:
            contexts = list(pool.map(lambda _: context(), range(8)))
        assert len(contexts) == 8
        issued = x509.load_pem_x509_certificate((ca.folder / "fleet-client.pem").read_bytes())
        key = serialization.load_pem_private_key((ca.folder / "fleet-client-key.pem").read_bytes(), None)
        assert issued.public_key() == key.public_key()
