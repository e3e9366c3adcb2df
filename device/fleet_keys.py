"""The device's copy of the fleet's keys document: whom to seal telemetry to, whose field tokens to
accept, which tokens are revoked.

The document arrives as a TUF target (`KEYS_TARGET`), so it is believed only when the fleet's
targets role signed it; it is kept in the data dir so that a device that reboots while offline
still knows the keys (field engineers come exactly when the network is down). Until the first
document arrives, telemetry is sealed to the key given at enrollment and field tokens are refused.
A document with a lower serial than the one held is refused (TUF already stops rollbacks of the
metadata; this also covers a stale copy on disk).

Only TUF-verified documents are adopted, never one handed over at enrollment: the enrollment
answer's pins do not cover the field-token keys, so a document taken from it could let whoever
stood between device and fleet at enrollment mint tokens. Field tokens therefore work from the
device's first connection to the fleet on (then offline too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from device.atomic import write_atomic
from device.errors import ConfigError
from device.tuf_client import TargetRejected, TufClient
from protocol.field_token import FieldTrust
from protocol.keys_document import KeysDocument, KeysDocumentError, parse, public_key_from_text
from protocol.sealed import TelemetryPublicKey, fleet_key_id
from protocol.targets import KEYS_TARGET

log = logging.getLogger(__name__)


class FleetKeys:
    def __init__(self, path: Path, enrollment_telemetry_key: Path | None = None) -> None:
        self.path = path
        self.enrollment_telemetry_key = enrollment_telemetry_key
        self._lock = threading.Lock()
        self._document: KeysDocument | None = None
        self._listeners: list[Callable[[KeysDocument], None]] = []
        if path.exists():
            try:
                self._document = parse(path.read_bytes())
            except KeysDocumentError as e:  # TUF-verified when written: a damaged file, not an attack
                log.error("ignoring %s (%s); the next refresh replaces it", path, e)

    @property
    def document(self) -> KeysDocument | None:
        return self._document

    def serial(self) -> int:
        return self._document.serial if self._document else 0

    def on_change(self, listener: Callable[[KeysDocument], None]) -> None:
        self._listeners.append(listener)

    def telemetry_key(self) -> tuple[str, TelemetryPublicKey]:
        """The key id and public key to seal telemetry to now."""
        document = self._document
        if document is not None:
            return document.telemetry_key_id, document.telemetry_public
        if self.enrollment_telemetry_key is None:
            raise ConfigError("no fleet telemetry key known yet: enroll the device")
        public = load_enrollment_telemetry_key(self.enrollment_telemetry_key)
        return fleet_key_id(public), public

    def field_trust(self) -> FieldTrust | None:
        """The field-token keys and revocations, or None before the first document arrived."""
        document = self._document
        return document.field_trust if document else None

    def apply(self, data: bytes) -> bool:
        """Adopt a (TUF-verified) document; True if it changed what the device trusts."""
        document = parse(data)
        with self._lock:
            held = self.serial()
            if document.serial < held:
                raise KeysDocumentError(f"keys document serial {document.serial} is older than {held}")
            if document.serial == held:
                return False
            write_atomic(self.path, data)
            self._document = document
        log.info(
            "fleet keys serial %d: telemetry key %s, %d field-token key(s), %d revoked token(s)",
            document.serial,
            document.telemetry_key_id,
            len(document.field_trust.keys),
            len(document.revoked_until),
        )
        for listener in self._listeners:
            listener(document)
        return True

    def refresh(self, tuf: TufClient) -> bool:
        """Refresh TUF metadata and adopt the keys document it lists (blocking: call off the loop)."""
        tuf.refresh()
        info = tuf.target_info(KEYS_TARGET)
        if info is None:
            return False  # a fleet from before key documents
        document = info.custom.get("document") if isinstance(info.custom, dict) else None
        if not isinstance(document, str):
            raise TargetRejected(f"{KEYS_TARGET} carries no document in its signed custom field")
        data = document.encode()
        try:
            info.verify_length_and_hashes(data)
        except Exception as e:  # python-tuf's LengthOrHashMismatchError
            raise TargetRejected(f"{KEYS_TARGET}: the carried document is not the signed one: {e}") from e
        return self.apply(data)


def load_enrollment_telemetry_key(path: Path) -> TelemetryPublicKey:
    try:
        return public_key_from_text(path.read_text())
    except (OSError, ValueError, KeysDocumentError) as e:
        raise ConfigError(f"cannot read the fleet's telemetry key {path}: {e}; provision again") from e
