"""Enrollment: one-time tokens, certificates issued for a device's own key, renewal and revocation.

`fleet device-add` registers a device and returns a ticket with a one-time token that expires. On
first boot the device makes its key pair, sends the token and a CSR to `POST /api/enroll`, and gets
back its certificate, the CA, the broker's URL, the TUF root and the telemetry key. Its private key
never leaves it; the fleet keeps only each token's SHA-256 and each certificate's serial.

Tokens carry 256 random bits, so a plain SHA-256 is enough to store them (no password stretching),
and a token is found by its hash. Its use is one conditional UPDATE, so two devices racing with one
token cannot both win.
"""

import hashlib
import logging
import secrets
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import ForeignKey, Index, String, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from fleet import broker_auth
from fleet.ca import CertificateRefused, FleetCA, IssuedCertificate, load_csr, public_key_sha256
from fleet.db import Base, Device, TelemetryRecordRow
from fleet.errors import FleetError, InvalidRequest, NotFound
from models.errors import ModelError
from models.signing import load_public_key
from protocol.keys_document import public_key_text

if TYPE_CHECKING:
    from fleet.service import FleetService

log = logging.getLogger(__name__)

TOKEN_PREFIX = "eft1_"
TOKEN_TTL_S = 7 * 24 * 3600.0  # long enough to ship a box to a plant; `device-token` makes a new one


class EnrollmentRefused(FleetError):
    """A token or certificate that does not entitle its holder to what it asked for (HTTP 403)."""


class TooManyFailures(FleetError):
    """Too many refused attempts from one address in a short time (HTTP 429)."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"too many refused enrollment attempts; try again in {retry_after_s:.0f} s")


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    __table_args__ = (Index("ix_enrollment_tokens_device", "device_id"),)

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    created: Mapped[float] = mapped_column(default=time.time)
    expires: Mapped[float]
    used_at: Mapped[float | None] = mapped_column(default=None)
    used_from: Mapped[str] = mapped_column(String(64), default="")


class DeviceCertificate(Base):
    """Every certificate the CA issued to a device; revocation also lands in the CRL."""

    __tablename__ = "device_certificates"
    __table_args__ = (Index("ix_device_certificates_device", "device_id"),)

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # hex: serials exceed 64 bits
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    not_before: Mapped[float]
    not_after: Mapped[float]
    public_key_sha256: Mapped[str] = mapped_column(String(64))
    issued: Mapped[float] = mapped_column(default=time.time)
    how: Mapped[str] = mapped_column(String(16))  # enroll | renew
    revoked_at: Mapped[float | None] = mapped_column(default=None)


TABLES = [Base.metadata.tables[t] for t in (EnrollmentToken.__tablename__, DeviceCertificate.__tablename__)]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class FailureLimiter:
    """At most `max_failures` refused attempts per client address in `window_s`; successes are free."""

    max_failures: int = 10
    window_s: float = 60.0
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            recent = self._failures.get(client)
            if recent is None:
                return
            while recent and recent[0] <= now - self.window_s:
                recent.popleft()
            if not recent:
                del self._failures[client]
            elif len(recent) >= self.max_failures:
                raise TooManyFailures(recent[0] + self.window_s - now)

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) > 100_000:  # a flood of addresses must not grow this without end
                self._failures.clear()
            self._failures.setdefault(client, deque(maxlen=self.max_failures)).append(time.monotonic())


def _certificate_row(device_id: str, issued: IssuedCertificate, how: str) -> DeviceCertificate:
    return DeviceCertificate(
        serial=f"{issued.serial:x}",
        device_id=device_id,
        not_before=issued.not_before.timestamp(),
        not_after=issued.not_after.timestamp(),
        public_key_sha256=issued.public_key_sha256,
        how=how,
    )


class Enrollment:
    """The fleet's side of device identity, over its database, its CA and its broker."""

    def __init__(self, service: "FleetService", ca: FleetCA, token_ttl_s: float = TOKEN_TTL_S) -> None:
        self.service = service
        self.ca = ca
        self.token_ttl_s = token_ttl_s
        self.limiter = FailureLimiter()
        engine = service.sessions.kw["bind"]
        # The tables live on fleet.db's Base; created here too, so no caller has to import this first.
        Base.metadata.create_all(engine, tables=TABLES)

    @property
    def plain(self) -> bool:
        """Plain mode: the broker takes passwords on plain TCP (no TLS); devices get a password too."""
        return not self.service.broker_url.startswith("mqtts://")

    # -- tokens -------------------------------------------------------------------------------
    def add_token(self, s: Session, device_id: str) -> tuple[str, float]:
        """A new one-time token for `device_id`, stored hashed in the caller's transaction."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires = time.time() + self.token_ttl_s
        s.add(EnrollmentToken(token_sha256=token_hash(token), device_id=device_id, expires=expires))
        return token, expires

    def ticket(self, device_id: str, token: str, expires: float) -> dict[str, Any]:
        """What the operator hands to the device: the token, fingerprints of what enrollment will
        return, and the CA certificate, so the device can tell its own fleet from a man in the middle."""
        return {
            "device_id": device_id,
            "enrollment_token": token,
            "token_expires": expires,
            "pins": self.pins(),
            # To check the fleet API's certificate when it is served over HTTPS (`api_tls`).
            "ca_certificate": self.ca.certificate_pem,
        }

    def pins(self) -> dict[str, str]:
        return {
            "ca_sha256": self.ca.fingerprint,
            "tuf_root_sha256": hashlib.sha256(self.service.tuf.trusted_root()).hexdigest(),
            "telemetry_key_sha256": hashlib.sha256(self._telemetry_key_pem().encode()).hexdigest(),
        }

    def new_token(self, device_id: str) -> dict[str, Any]:
        """Another ticket for a registered device (its token expired, or it is being replaced). Earlier
        unused tokens of the device stop working."""
        with self.service.sessions.begin() as s:
            if s.get(Device, device_id) is None:
                raise NotFound(f"no device {device_id!r}; add it with `fleet device-add`")
            s.execute(
                update(EnrollmentToken)
                .where(EnrollmentToken.device_id == device_id, EnrollmentToken.used_at.is_(None))
                .values(expires=0.0)
            )
            token, expires = self.add_token(s, device_id)
        return self.ticket(device_id, token, expires)

    # -- enrolling ----------------------------------------------------------------------------
    def enroll(
        self, token: str, csr_pem: str, device_key_pem: str | None = None, client: str = "?"
    ) -> dict[str, Any]:
        """Spend `token` on a certificate for the CSR's key. Re-enrolling a device (a new token for a
        registered one) revokes the certificates it had and pins its new signing key."""
        self.limiter.check(client)
        try:
            return self._enroll(token, csr_pem, device_key_pem, client)
        except (EnrollmentRefused, InvalidRequest):
            self.limiter.failed(client)
            raise

    def _enroll(self, token: str, csr_pem: str, device_key_pem: str | None, client: str) -> dict[str, Any]:
        load_csr(csr_pem)  # a malformed CSR must not spend the token
        if device_key_pem is not None:
            try:
                load_public_key(device_key_pem)
            except ModelError as e:
                raise InvalidRequest(f"device_key is not an Ed25519 public key: {e}") from e
        now = time.time()
        password = broker_auth.new_password() if self.plain else None
        with self.service.sessions.begin() as s:
            row = s.get(EnrollmentToken, token_hash(token))
            spent = s.execute(
                update(EnrollmentToken)
                .where(
                    EnrollmentToken.token_sha256 == token_hash(token),
                    EnrollmentToken.used_at.is_(None),
                    EnrollmentToken.expires > now,
                )
                .values(used_at=now, used_from=client[:64])
            )
            if row is None or spent.rowcount != 1:  # type: ignore[attr-defined]
                why = "unknown" if row is None else ("used" if row.used_at else "expired")
                log.warning("enrollment from %s refused: token %s", client, why)
                raise EnrollmentRefused(
                    "the enrollment token is unknown, used or expired: ask the operator for a new one"
                    " (`edgefleet fleet device-token <id>`)"
                )
            device_id = row.device_id
            device = s.get(Device, device_id)
            assert device is not None  # tokens reference devices
            issued = self.ca.issue_device(device_id, csr_pem)
            earlier = list(
                s.scalars(
                    select(DeviceCertificate).where(
                        DeviceCertificate.device_id == device_id, DeviceCertificate.revoked_at.is_(None)
                    )
                )
            )
            s.add(_certificate_row(device_id, issued, "enroll"))
            if device_key_pem is not None and device_key_pem != device.public_key:
                # The operator's token vouches for this key: a replaced device starts a new identity.
                device.public_key = device_key_pem
                self.service._device_keys.pop(device_id, None)  # the ingest's cache of pinned keys
            if password is not None:
                device.mqtt_password_hash = broker_auth.hash_password(password)
            revoked = self._revoke_rows(earlier, now)
            # A re-provisioned device starts a new outbox: its seqs continue after the highest this
            # fleet stored for the id, or its first records would be taken for duplicates and dropped.
            highest = s.scalar(
                select(func.max(TelemetryRecordRow.seq)).where(TelemetryRecordRow.device_id == device_id)
            )
        if password is not None:
            self.service.write_broker_auth()
        if password is not None or revoked:
            self.service.on_credentials_changed()
        log.info(
            "enrolled %s from %s: certificate %x to %s", device_id, client, issued.serial, issued.not_after
        )
        answer = {
            "device_id": device_id,
            "certificate": issued.pem,
            "certificate_not_after": issued.not_after.timestamp(),
            "ca_certificate": self.ca.certificate_pem,
            "fleet_url": self.service.broker_url,
            "tuf_root": self.service.tuf.trusted_root().decode(),
            "fleet_telemetry_key": self._telemetry_key_pem(),
            "telemetry_seq_start": int(highest or 0) + 1,
        }
        if password is not None:
            answer["mqtt_password"] = password
        return answer

    def _telemetry_key_pem(self) -> str:
        return public_key_text(self.service.telemetry_key.public_key())

    # -- renewing -----------------------------------------------------------------------------
    def renew(self, certificate_pem: str, csr_pem: str, client: str = "?") -> dict[str, Any]:
        """A new certificate for the same key, for a device that shows a valid certificate of its own
        and a CSR signed by that certificate's key (so only the key's holder can renew)."""
        self.limiter.check(client)
        try:
            return self._renew(certificate_pem, csr_pem)
        except (EnrollmentRefused, InvalidRequest):
            self.limiter.failed(client)
            raise

    def _renew(self, certificate_pem: str, csr_pem: str) -> dict[str, Any]:
        try:
            current = self.ca.check(certificate_pem)
        except CertificateRefused as e:
            raise EnrollmentRefused(f"cannot renew: {e}") from e
        key = load_csr(csr_pem).public_key()
        if public_key_sha256(key) != public_key_sha256(current.public_key()):
            raise EnrollmentRefused("cannot renew: the CSR is not for the certificate's key")
        serial = f"{current.serial_number:x}"
        with self.service.sessions.begin() as s:
            row = s.get(DeviceCertificate, serial)
            if row is None or row.revoked_at is not None:
                raise EnrollmentRefused(f"cannot renew: certificate {serial} is not a live one of this fleet")
            issued = self.ca.issue_device(row.device_id, csr_pem)
            s.add(_certificate_row(row.device_id, issued, "renew"))
        log.info("renewed %s's certificate: %x to %s", row.device_id, issued.serial, issued.not_after)
        return {
            "device_id": row.device_id,
            "certificate": issued.pem,
            "certificate_not_after": issued.not_after.timestamp(),
            "ca_certificate": self.ca.certificate_pem,
        }

    # -- revoking -----------------------------------------------------------------------------
    def revoke_device(self, device_id: str) -> list[str]:
        """Revoke every live certificate of a device (and, in plain mode, its password); the broker
        then drops it. Returns the serials revoked. It can come back only with a new token."""
        now = time.time()
        with self.service.sessions.begin() as s:
            device = s.get(Device, device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r}")
            rows = list(
                s.scalars(
                    select(DeviceCertificate).where(
                        DeviceCertificate.device_id == device_id, DeviceCertificate.revoked_at.is_(None)
                    )
                )
            )
            revoked = self._revoke_rows(rows, now)
            had_password = bool(device.mqtt_password_hash)
            device.mqtt_password_hash = ""
        if had_password:
            self.service.write_broker_auth()
        self.service.on_credentials_changed()
        log.warning("revoked %s: certificates %s", device_id, ", ".join(revoked) or "(none)")
        return revoked

    def _revoke_rows(self, rows: list[DeviceCertificate], now: float) -> list[str]:
        for row in rows:
            row.revoked_at = now
            self.ca.revoke(int(row.serial, 16))
        return [row.serial for row in rows]

    def certificates(self, device_id: str) -> list[dict[str, Any]]:
        with self.service.sessions() as s:
            if s.get(Device, device_id) is None:
                raise NotFound(f"no device {device_id!r}")
            rows = s.scalars(
                select(DeviceCertificate)
                .where(DeviceCertificate.device_id == device_id)
                .order_by(DeviceCertificate.issued)
            )
            return [
                {
                    "serial": r.serial,
                    "not_before": r.not_before,
                    "not_after": r.not_after,
                    "public_key_sha256": r.public_key_sha256,
                    "how": r.how,
                    "revoked_at": r.revoked_at,
                }
                for r in rows
            ]


_ENROLLMENTS: "weakref.WeakKeyDictionary[FleetService, Enrollment]" = weakref.WeakKeyDictionary()
_ENROLLMENTS_LOCK = threading.Lock()


def enrollment_of(service: "FleetService") -> Enrollment:
    """The service's one `Enrollment` (one failure limiter, one CA object), made on first use."""
    with _ENROLLMENTS_LOCK:
        found = _ENROLLMENTS.get(service)
        if found is None:
            found = _ENROLLMENTS[service] = Enrollment(service, service.data.ca())
        return found
