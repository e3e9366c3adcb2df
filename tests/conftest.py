"""Fixtures shared by every test folder: sample packages, keys, and a real Mosquitto."""

import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.procs import free_port
from fleet import broker_auth
from fleet.broker import ManagedBroker, find_mosquitto
from fleet.ca import FleetCA, IssuedCertificate, client_tls_context
from models.fsutil import write_private
from models.package import pack

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo" / "surface_defect"


@pytest.fixture(scope="session")
def zoo() -> Path:
    return ZOO


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The sample model's v1 and v2 as package archives."""
    out = tmp_path_factory.mktemp("archives")
    return {v: out / f"v{v}.tar" for v in (1, 2) if pack(ZOO / f"v{v}", out / f"v{v}.tar")}


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A writable copy of the v1 package folder."""
    return Path(shutil.copytree(ZOO / "v1", tmp_path / "pkg"))


@dataclass
class Broker:
    port: int
    passwords: dict[str, str]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto with the fleet's generated auth: the fleet user and devices dev-a, dev-b."""
    find_mosquitto()
    folder = tmp_path / "broker"
    folder.mkdir()
    passwords = {user: broker_auth.new_password() for user in (broker_auth.FLEET_USER, "dev-a", "dev-b")}
    (folder / "passwd").write_text(
        broker_auth.password_file({u: broker_auth.hash_password(p) for u, p in passwords.items()})
    )
    (folder / "acl").write_text(broker_auth.acl_file())
    broker = ManagedBroker(folder, "127.0.0.1", free_port(), folder / "passwd", folder / "acl")
    broker.start()
    try:
        yield Broker(broker.port, passwords)
    finally:
        broker.stop()


def make_csr(common_name: str = "ignored") -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh P-256 key and a CSR for it, as a device makes them."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class TlsBroker:
    """A running Mosquitto with the fleet's TLS listener; `client_files` issues client certificates."""

    broker: ManagedBroker
    ca: FleetCA
    folder: Path
    issued: dict[str, IssuedCertificate] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url

    def client_files(self, name: str, ca: FleetCA | None = None, **issue: object) -> tuple[Path, Path]:
        """Key and certificate files for `name`, issued by `ca` (default: the broker's own CA)."""
        key, csr = make_csr(name)
        ca = ca or self.ca
        if name == broker_auth.FLEET_USER:
            cert_path, key_path = ca.fleet_client_files()
            return cert_path, key_path
        issued = ca.issue_device(name, csr, **issue)  # type: ignore[arg-type]
        self.issued[name] = issued
        folder = self.folder / "clients" / f"{name}-{issued.serial:x}"
        folder.mkdir(parents=True)
        write_private(
            folder / "key.pem",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        (folder / "cert.pem").write_text(issued.pem)
        return folder / "cert.pem", folder / "key.pem"

    def context(self, name: str, ca: FleetCA | None = None, **issue: object) -> ssl.SSLContext:
        cert, key = self.client_files(name, ca, **issue)
        return client_tls_context(self.ca.cert_path, cert, key)


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[TlsBroker]:
    """A real Mosquitto as `fleet serve` runs it by default: TLS only, client certificates from the
    fleet CA, the certificate's CN as the user name, the fleet's ACL and CRL."""
    find_mosquitto()
    folder = tmp_path / "broker-tls"  # beside the plain fixture's, so a test can have both
    folder.mkdir()
    ca = FleetCA(tmp_path / "ca")
    (folder / "acl").write_text(broker_auth.acl_file())
    broker = ManagedBroker(folder, "127.0.0.1", free_port(), None, folder / "acl", tls=ca.broker_tls())
    broker.start()
    try:
        yield TlsBroker(broker, ca, tmp_path)
    finally:
        broker.stop()


# Hypothesis profiles. `make fuzz` sets HYPOTHESIS_PROFILE=fuzz: no deadline, and FUZZ_SCALE times the
# cases each property test asks for (tests that pin max_examples multiply it by FUZZ_SCALE).
import os  # noqa: E402 - kept with the profile lines: the rest of this file is another owner's

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "fuzz", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
FUZZ_SCALE = 20 if FUZZ else 1
if FUZZ:
    settings.load_profile("fuzz")
