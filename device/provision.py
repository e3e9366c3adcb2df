"""Provisioning: turn an empty folder into a device data dir from the fleet's enrollment and a model.

With an enrollment ticket (`fleet device-add`: device id, one-time token, fingerprints) the device
makes its own keys, sends the fleet only a CSR and its public signing key, and gets back its
certificate, the fleet CA, the broker URL, the TUF root and the telemetry key, each checked against
the ticket's fingerprints (the enrollment API is plain HTTP). Its private keys never leave it.

A ticket from a plain-mode fleet also carries a broker password and the rest; such a file without a
token still provisions as before certificates (the migration path for devices enrolled that way).
"""

import asyncio
import datetime as dt
import hashlib
import json
import logging
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device.atomic import write_atomic, write_json_atomic
from device.config import DataDir, DeviceConfig, read_break_glass, validate_device_id
from device.errors import ConfigError
from device.slots import install_initial
from device.telemetry.outbox import Outbox
from device.tuf_client import bootstrap
from models.fsutil import write_private
from models.manifest import Manifest
from models.package import read_archive_manifest
from models.signing import generate_private_key, load_private_key, public_key_pem

log = logging.getLogger(__name__)
HTTP_TIMEOUT_S = 30.0
RENEW_WHEN_LEFT = 1 / 3  # renew once a third of the certificate's lifetime is left


def provision(
    data_dir: Path,
    enrollment: dict[str, Any],
    model_archive: Path,
    *,
    break_glass_file: Path | None = None,
    **settings: Any,
) -> Manifest:
    """Write config, keys, certificate and the fleet's TUF root, and install the first model in slot `a`.

    With a token, `settings["fleet_api"]` (or the ticket's `fleet_api`) is where to enroll.
    `break_glass_file`: the local API's break-glass credential is its first line, not a random one.
    """
    data = DataDir(data_dir)
    if data.config.exists():
        raise ConfigError(f"{data.config} exists: this data dir is already provisioned")
    # Read before anything is written or the enrollment token spent: a bad file changes nothing.
    break_glass = read_break_glass(break_glass_file) if break_glass_file is not None else None
    try:
        device_id = validate_device_id(str(enrollment["device_id"]))
    except KeyError as e:
        raise ConfigError(f"enrollment lacks {e.args[0]!r}: use the JSON the fleet returned") from e
    read_archive_manifest(model_archive)  # a bad archive fails here, before the token is spent
    data.make_dirs()
    if not data.device_key.exists():
        generate_private_key(data.device_key)  # the device's own signing identity; never leaves it
    if "enrollment_token" in enrollment:
        fleet_api = settings.pop("fleet_api", None) or enrollment.get("fleet_api")
        if not fleet_api:
            raise ConfigError("no fleet API to enroll with: pass --fleet-api http://fleet-host:8080")
        answer = _enroll_once(data, device_id, enrollment, str(fleet_api))
        settings["fleet_api"] = str(fleet_api)
    else:
        answer = enrollment
    try:
        fleet_url = str(answer["fleet_url"])
        tuf_root = str(answer["tuf_root"]).encode()
        telemetry_key = str(answer["fleet_telemetry_key"])
        password = answer.get("mqtt_password")
        if password is None and "certificate" not in answer:
            raise KeyError("mqtt_password")
    except KeyError as e:
        raise ConfigError(f"enrollment lacks {e.args[0]!r}: use the JSON the fleet returned") from e
    config = DeviceConfig(device_id=device_id, fleet_url=fleet_url, **settings)
    bootstrap(data.root, tuf_root)  # the root of trust for every update this device will take
    if password is not None:
        data.write_secret("mqtt-password", str(password))
    data.fleet_telemetry_key.write_text(telemetry_key)
    data.ensure_api_token(break_glass)
    seq_start = answer.get("telemetry_seq_start")
    if isinstance(seq_start, int) and not isinstance(seq_start, bool) and seq_start > 1:
        with Outbox(data.outbox, DeviceConfig.model_fields["telemetry_max_bytes"].default) as outbox:
            outbox.start_after(seq_start - 1)
    manifest = install_initial(data.models, model_archive)
    write_json_atomic(data.config, config.model_dump())
    data.enrollment_answer.unlink(missing_ok=True)
    return manifest


def load_enrollment(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read enrollment {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"enrollment {path} is not a JSON object")
    return data


# -- keys and CSRs -----------------------------------------------------------------------------
def tls_key(data: DataDir) -> ec.EllipticCurvePrivateKey:
    """The key of the device's broker certificate: made here once (0600), never sent anywhere."""
    if not data.tls_key.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(data.tls_key, pem)
    loaded = serialization.load_pem_private_key(data.tls_key.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{data.tls_key} is not an EC private key; delete it and provision again")
    return loaded


def make_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# -- talking to the fleet ----------------------------------------------------------------------
def _post(url: str, body: dict[str, Any], ca_pem: str | None = None) -> dict[str, Any]:
    """One JSON POST with the standard library (the device has no HTTP client dependency). Over
    https the server must show a certificate of the fleet CA (`ca_pem`), not any public CA's."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    context = None
    if url.startswith("https:"):
        if not ca_pem:
            raise ConfigError(f"{url}: the ticket carries no fleet CA to check the fleet's certificate with")
        context = ssl.create_default_context(cadata=ca_pem)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=context) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error") or e.reason
        except (ValueError, AttributeError):
            detail = e.reason
        raise ConfigError(f"the fleet refused {url} (HTTP {e.code}): {detail}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConfigError(f"cannot reach the fleet at {url}: {e}; check the fleet API URL") from e
    if not isinstance(answer, dict):
        raise ConfigError(f"{url} answered with something other than a JSON object")
    return answer


def _enroll_once(data: DataDir, device_id: str, ticket: dict[str, Any], fleet_api: str) -> dict[str, Any]:
    """Spend the token, or reuse the answer a previous, interrupted provisioning already got."""
    key = tls_key(data)
    answer: dict[str, Any]
    if data.enrollment_answer.exists():
        answer = json.loads(data.enrollment_answer.read_text())
        log.info("reusing the enrollment answer of an interrupted provisioning")
    else:
        body = {
            "token": str(ticket["enrollment_token"]),
            "csr": make_csr(key, device_id),
            "device_key": public_key_pem(load_private_key(data.device_key)),
        }
        ca_pem = ticket.get("ca_certificate")
        pinned = (ticket.get("pins") or {}).get("ca_sha256")
        if ca_pem is not None and pinned is not None and _fingerprint(str(ca_pem)) != pinned:
            raise ConfigError("the ticket's CA certificate does not match its own fingerprint")
        answer = _post(fleet_api.rstrip("/") + "/api/enroll", body, ca_pem)
        # Kept before anything is checked or written: the token is spent now.
        write_private(data.enrollment_answer, json.dumps(answer).encode(), replace=True)
    try:
        _check_answer(answer, device_id, key, ticket.get("pins") or {})
    except ConfigError:
        data.enrollment_answer.unlink(missing_ok=True)
        raise
    write_atomic(data.fleet_ca, str(answer["ca_certificate"]).encode())
    write_atomic(data.device_cert, str(answer["certificate"]).encode())
    return answer


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _check_answer(
    answer: dict[str, Any], device_id: str, key: ec.EllipticCurvePrivateKey, pins: dict[str, str]
) -> None:
    """The answer is complete, from the fleet the ticket names, and for this device and this key."""
    try:
        ca_pem, cert_pem = str(answer["ca_certificate"]), str(answer["certificate"])
        actual = {
            "ca_sha256": _fingerprint(ca_pem),
            "tuf_root_sha256": _sha256(str(answer["tuf_root"])),
            "telemetry_key_sha256": _sha256(str(answer["fleet_telemetry_key"])),
        }
        if not str(answer["fleet_url"]).startswith(("mqtts://", "mqtt://")):
            raise ValueError(f"fleet_url {answer['fleet_url']!r} is not a broker URL")
    except (KeyError, ValueError) as e:
        raise ConfigError(f"the fleet's enrollment answer is incomplete or malformed: {e}") from e
    for name, value in pins.items():
        if name in actual and actual[name] != value:
            raise ConfigError(
                f"the enrollment answer does not match the ticket's {name}: this is not the fleet that "
                "issued the ticket (a wrong --fleet-api, or someone in between), or the fleet rotated "
                "that key since: ask for a new ticket (`edgefleet fleet device-token`)"
            )
    _check_certificate(ca_pem, cert_pem, device_id, key)


def _fingerprint(cert_pem: str) -> str:
    return x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA256()).hex()


def _check_certificate(ca_pem: str, cert_pem: str, device_id: str, key: ec.EllipticCurvePrivateKey) -> None:
    """`cert_pem` is signed by the fleet CA, names this device and holds this device's key."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ConfigError(f"the certificate the fleet sent is not one of its CA's: {e!r}") from e
    names = [n.value for n in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise ConfigError(f"the certificate the fleet sent names {names}, not {device_id!r}")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError("the certificate the fleet sent is not for this device's key")


# -- renewal -----------------------------------------------------------------------------------
def certificate_validity(data: DataDir) -> tuple[dt.datetime, dt.datetime]:
    cert = x509.load_pem_x509_certificate(data.device_cert.read_bytes())
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def renewal_due(data: DataDir, now: dt.datetime | None = None) -> bool:
    """True once a third (RENEW_WHEN_LEFT) of the certificate's lifetime is left; False without one."""
    if not data.device_cert.exists():
        return False
    start, end = certificate_validity(data)
    now = now or dt.datetime.now(dt.UTC)
    return end - now <= (end - start) * RENEW_WHEN_LEFT


def renew_certificate(data: DataDir, fleet_api: str | None = None) -> dt.datetime:
    """A new certificate for the same key, from the fleet API the device enrolled with. The CSR's
    signature proves possession of the key the current certificate names; the new certificate
    replaces the old one atomically and the next broker connection uses it. Returns its expiry."""
    config = data.load_config()
    fleet_api = fleet_api or config.fleet_api
    if not fleet_api or not data.device_cert.exists():
        raise ConfigError("this device has no certificate or no fleet API to renew it with: enroll it again")
    key = tls_key(data)
    body = {"certificate": data.device_cert.read_text(), "csr": make_csr(key, config.device_id)}
    answer = _post(fleet_api.rstrip("/") + "/api/enroll/renew", body, data.fleet_ca.read_text())
    # The CA this device already trusts, not the one in the answer.
    _check_certificate(data.fleet_ca.read_text(), str(answer.get("certificate")), config.device_id, key)
    write_atomic(data.device_cert, str(answer["certificate"]).encode())
    return certificate_validity(data)[1]


async def renew_forever(data: DataDir, every_s: float = 6 * 3600.0) -> None:
    """The agent's renewal task: renew once due (a third of the lifetime left), retry on failure.

    A device offline for longer than that third may see its certificate expire; it then needs a
    new enrollment token, as the broker refuses an expired certificate.
    """
    while True:
        try:
            if await asyncio.to_thread(renewal_due, data):
                expires = await asyncio.to_thread(renew_certificate, data)
                log.info("renewed the device certificate; it now expires %s", expires)
        except (ConfigError, OSError, ValueError) as e:
            log.warning("certificate renewal failed (%s); trying again in %.0f s", e, every_s)
        await asyncio.sleep(every_s)
