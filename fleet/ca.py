"""The fleet's certificate authority: device client certificates, the broker's server certificate,
the fleet workers' client certificate, and the revocation list Mosquitto checks.

ECDSA P-256 throughout: OpenSSL (Mosquitto's TLS), Python's `ssl` and every Jetson L4T release take
it for client and server certificates in TLS 1.2 and 1.3, which is not true of Ed25519 everywhere.
The CA keeps all of its state in one folder (0700) of the fleet's data dir; the private keys are
0600 and never leave it. The CRL is the record of revocations: it is signed, so it is read back
and checked against the CA's key before each re-write.
"""

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.broker import BrokerTls
from fleet.broker_auth import FLEET_USER, require_device_name
from fleet.errors import FleetError, InvalidRequest
from models.fsutil import exclusive_lock, write_private

log = logging.getLogger(__name__)

DEVICE_LIFETIME = dt.timedelta(days=90)
SERVICE_LIFETIME = dt.timedelta(days=397)  # the broker's and the fleet workers' own certificates
CA_LIFETIME = dt.timedelta(days=20 * 365)
RENEW_BEFORE = dt.timedelta(days=30)  # service certificates are re-issued at start inside this window
CLOCK_SKEW = dt.timedelta(minutes=5)  # a device whose clock runs a little behind still accepts a new cert
MAX_CSR_BYTES = 16 * 1024
BROKER_NAME = "edgefleet-broker"
_DEFAULT_BROKER_NAMES = ("127.0.0.1", "localhost")


class CertificateRefused(InvalidRequest):
    """A certificate or CSR the fleet will not accept; the message says why."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_sha256(key: CertificatePublicKeyTypes) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def certificate_sha256(pem: str | bytes) -> str:
    """The fingerprint a device pins from its enrollment file (sha256 of the DER)."""
    cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class IssuedCertificate:
    common_name: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    public_key_sha256: str
    pem: str


def load_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """A CSR whose self-signature holds, over a key type every TLS stack of the fleet takes."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise CertificateRefused(f"the CSR is {len(data)} bytes; at most {MAX_CSR_BYTES} are accepted")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CertificateRefused(f"not a PEM certificate signing request: {e}") from e
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise CertificateRefused(f"EC curve {key.curve.name} is not accepted: use P-256")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CertificateRefused(f"{type(key).__name__} keys are not accepted: use ECDSA P-256")
    if not csr.is_signature_valid:
        raise CertificateRefused("the CSR's signature does not verify: it was not made with its own key")
    return csr


class FleetCA:
    """One folder: `ca-key.pem` (0600), `ca.pem`, `crl.pem`, and the fleet's own service certificates."""

    def __init__(self, folder: Path, device_lifetime: dt.timedelta = DEVICE_LIFETIME) -> None:
        self.folder = folder
        self.device_lifetime = device_lifetime
        self.key_path = folder / "ca-key.pem"
        self.cert_path = folder / "ca.pem"
        self.crl_path = folder / "crl.pem"
        if not self.key_path.exists():
            self._create()
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FleetError(f"{self.key_path} is not an EC private key; restore the fleet CA's key")
        self._key = key
        self._crl_lock = threading.Lock()  # revocations come from the API's threads
        self.certificate = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        if not self.crl_path.exists():
            self._write_crl([])

    def _create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
                # Fleets are told apart by their CA's name as well as by its key.
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"edgefleet fleet CA {public_key_sha256(key.public_key())[:12]}"
                ),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # The certificate is written before the key: a crash in between leaves no key without its
        # certificate, and the next start makes a new CA (nothing was issued by the lost one).
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private(self.key_path, _key_pem(key))
        log.info("created the fleet CA in %s", self.folder)

    # -- what devices are told ------------------------------------------------------------------
    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    # -- issuing --------------------------------------------------------------------------------
    def issue_device(
        self,
        device_id: str,
        csr_pem: str | bytes,
        *,
        lifetime: dt.timedelta | None = None,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """A certificate naming `device_id` (CN, and a DNS SAN) for the key in the CSR.

        It is the device's client certificate at the broker and the server certificate of its
        local API: a field engineer's tool checks it against the fleet CA with `device_id` as the
        expected host name (TLS SNI), whatever address the device has on the plant network.
        Only the CSR's public key is used; its subject and extensions are ignored, so a device
        cannot ask for another name or a CA flag.
        """
        try:
            require_device_name(device_id)
        except ValueError as e:
            raise CertificateRefused(str(e)) from e
        csr = load_csr(csr_pem)
        key = csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)  # load_csr checked
        return self._issue(
            device_id,
            key,
            lifetime or self.device_lifetime,
            client=True,
            server=True,
            names=(device_id,),
            now=now,
        )

    def _issue(
        self,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        lifetime: dt.timedelta,
        *,
        client: bool,
        server: bool = False,
        names: tuple[str, ...] = (),
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        now = now or _now()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server or not client:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_general_names(names)), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            common_name=common_name,
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            public_key_sha256=public_key_sha256(public_key),
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        )

    @contextmanager
    def _service_certificates(self) -> Iterator[None]:
        """Held while one of the fleet's own certificates is checked, (re-)issued or read with its key.

        A fleet worker opens two broker sessions at once (its aiomqtt one and its telemetry link,
        each from a thread), and `--ingest-workers` processes start together: without this, two of
        them found the client certificate missing, each wrote a key and a certificate, and one read
        the other's certificate with its own key ("key values mismatch") and retried with backoff.
        """
        with exclusive_lock(self.folder / ".service-certificates.lock"):
            yield

    def _ensure_service_certificate(
        self, cert_path: Path, key_path: Path, common_name: str, client: bool, names: tuple[str, ...] = ()
    ) -> None:
        """(Re-)issue one of the fleet's own certificates when missing, expiring, from another CA, or
        naming other hosts; its key is made here and stays here. Callers hold `_service_certificates`."""
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            fresh = cert.not_valid_after_utc - _now() > RENEW_BEFORE and self._issued_here(cert)
            if fresh and set(_names_of(cert)) == set(names):
                return
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._issue(common_name, key.public_key(), SERVICE_LIFETIME, client=client, names=names)
        write_private(key_path, _key_pem(key), replace=True)
        cert_path.write_text(issued.pem)
        log.info("issued %s's certificate (valid to %s)", common_name, issued.not_after.date())

    def _issued_here(self, cert: x509.Certificate) -> bool:
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def broker_tls(self, names: tuple[str, ...] | list[str] = ()) -> BrokerTls:
        """The files the broker's TLS listener needs; its certificate names 127.0.0.1, localhost and
        `names` (the host names and addresses devices use to reach it)."""
        all_names = tuple(dict.fromkeys((*_DEFAULT_BROKER_NAMES, *names)))
        cert, key = self.folder / "broker.pem", self.folder / "broker-key.pem"
        with self._service_certificates():
            self._ensure_service_certificate(cert, key, BROKER_NAME, client=False, names=all_names)
        return BrokerTls(cafile=self.cert_path, certfile=cert, keyfile=key, crlfile=self.crl_path)

    def api_tls(self, names: tuple[str, ...] | list[str] = ()) -> tuple[Path, Path]:
        """Certificate and key for serving the fleet API over HTTPS (uvicorn's ssl_certfile and
        ssl_keyfile): devices check it against the CA certificate their ticket carries, so the
        enrollment token never crosses the network in clear."""
        all_names = tuple(dict.fromkeys((*_DEFAULT_BROKER_NAMES, *names)))
        cert, key = self.folder / "api.pem", self.folder / "api-key.pem"
        with self._service_certificates():
            self._ensure_service_certificate(cert, key, "edgefleet-api", client=False, names=all_names)
        return cert, key

    def fleet_client_files(self) -> tuple[Path, Path]:
        """The fleet workers' client certificate and key (CN = the fleet's broker user)."""
        cert, key = self.folder / "fleet-client.pem", self.folder / "fleet-client-key.pem"
        with self._service_certificates():
            self._ensure_service_certificate(cert, key, FLEET_USER, client=True)
        return cert, key

    def fleet_client_context(self) -> ssl.SSLContext:
        """A TLS context with the fleet workers' client certificate, checked, issued and read as one
        step (another thread or process may be renewing it)."""
        cert, key = self.folder / "fleet-client.pem", self.folder / "fleet-client-key.pem"
        with self._service_certificates():
            self._ensure_service_certificate(cert, key, FLEET_USER, client=True)
            return client_tls_context(self.cert_path, cert, key)

    # -- checking and revoking ------------------------------------------------------------------
    def check(self, cert_pem: str | bytes, now: dt.datetime | None = None) -> x509.Certificate:
        """A certificate this CA issued, inside its validity, not revoked; else CertificateRefused."""
        try:
            cert = x509.load_pem_x509_certificate(
                cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
            )
        except ValueError as e:
            raise CertificateRefused(f"not a PEM certificate: {e}") from e
        if not self._issued_here(cert):
            raise CertificateRefused("the certificate was not issued by this fleet's CA")
        now = now or _now()
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertificateRefused(
                f"the certificate is valid from {cert.not_valid_before_utc} to {cert.not_valid_after_utc}"
                " only: enroll the device again with a new token"
            )
        if cert.serial_number in self.revoked_serials():
            raise CertificateRefused(f"certificate {cert.serial_number:x} is revoked")
        return cert

    def _read_crl(self) -> x509.CertificateRevocationList:
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        if not crl.is_signature_valid(self._key.public_key()):
            raise FleetError(f"{self.crl_path} is not signed by the fleet CA; restore it from a backup")
        return crl

    def revoked_serials(self) -> set[int]:
        return {entry.serial_number for entry in self._read_crl()}

    def revoke(self, serial: int, now: dt.datetime | None = None) -> bool:
        """Add `serial` to the CRL (re-signed, replaced atomically); False if it was revoked already.

        Mosquitto 2.0.11 re-reads its `crlfile` on SIGHUP for new handshakes but keeps the sessions
        already open, so `ManagedBroker.reload` restarts the broker when the CRL changed.
        """
        with self._crl_lock:
            crl = self._read_crl()
            if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                return False
            entries = [(entry.serial_number, entry.revocation_date_utc) for entry in crl]
            self._write_crl([*entries, (serial, now or _now())])
            return True

    def _write_crl(self, entries: list[tuple[int, dt.datetime]]) -> None:
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            # The CRL is read by the local broker only, from the fleet's own disk, so there is no
            # distribution to keep fresh; a near nextUpdate would only make OpenSSL refuse every
            # device once it passed while the broker kept the old CRL loaded.
            .next_update(self.certificate.not_valid_after_utc)
        )
        for serial, when in entries:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        tmp = self.crl_path.with_suffix(".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, self.crl_path)


def _general_names(names: tuple[str, ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def client_tls_context(cafile: Path, certfile: Path, keyfile: Path) -> ssl.SSLContext:
    """TLS for an MQTT client of the fleet's broker: its certificate checked against the fleet CA
    (host name included), ours presented."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cafile))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certfile), str(keyfile))
    return context
