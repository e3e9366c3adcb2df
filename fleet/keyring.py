"""The fleet's rotating keys: telemetry (HPKE) keys and field-token signing keys, and the keys
document that tells devices which ones to use.

Telemetry: devices seal to the *current* key; the fleet keeps opening envelopes sealed to a key it
rotated away from for `telemetry_grace_s` (a device learns of the new key at its next refresh, and
a record sealed to a key the fleet no longer holds is sent back for re-sealing, not lost: see
fleet/ingest.py's "rekey" receipts). Field tokens: new tokens are signed with the current key; a
key rotated away from stays trusted by devices until every token it signed has expired
(protocol/field_token.py: at most 8 h), unless the operator rotates with `drop_old` because the key
leaked. Revoked tokens are listed until they expire.

The keys document is plain JSON (`document()`); the fleet publishes it as a TUF target
(protocol/targets.py `KEYS_TARGET`), so devices accept it only as signed by the fleet's targets
role, and rotating these keys never needs a device to be re-enrolled or taken offline.

On disk, under the fleet's secrets: `keys/keyring.json` (which key is current, when others were
retired, the revocation list; no private material) and one 0600 file per private key. Several
processes may share the folder (a fleet server and bench workers): changes hold an flock and
replace keyring.json by rename; readers notice a change by its mtime.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fleet.errors import InvalidRequest, NotFound
from models.fsutil import exclusive_lock, replace_private, write_private
from protocol.field_token import CLOCK_SKEW_S, MAX_TTL_S
from protocol.field_token import key_id as field_key_id
from protocol.keys_document import KEYS_FORMAT, canonical
from protocol.sealed import (
    KEMS,
    TelemetryPrivateKey,
    fleet_key_id,
    generate_telemetry_key,
    kem_of,
    private_from_bytes,
    private_to_bytes,
    public_raw,
)

DEFAULT_TELEMETRY_GRACE_S = 30 * 24 * 3600
FIELD_KEY_GRACE_S = MAX_TTL_S + CLOCK_SKEW_S  # a retired key outlives every token it signed


@dataclass(frozen=True)
class KeyringState:
    """keyring.json: which keys exist, which are current, when the others were retired."""

    serial: int
    telemetry_current: str
    telemetry: Mapping[str, Mapping[str, Any]]  # kid -> {"kem", "created", "retired"}
    field_current: str
    field: Mapping[str, Mapping[str, Any]]  # kid -> {"created", "retired"}
    revoked: Mapping[str, int]  # jti -> the token's exp

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "telemetry": {"current": self.telemetry_current, "keys": dict(self.telemetry)},
            "field_tokens": {"current": self.field_current, "keys": dict(self.field)},
            "revoked": dict(self.revoked),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyringState:
        return cls(
            serial=int(data["serial"]),
            telemetry_current=str(data["telemetry"]["current"]),
            telemetry=dict(data["telemetry"]["keys"]),
            field_current=str(data["field_tokens"]["current"]),
            field=dict(data["field_tokens"]["keys"]),
            revoked={str(k): int(v) for k, v in data["revoked"].items()},
        )


class FleetKeyring:
    def __init__(
        self,
        folder: Path,
        *,
        legacy_telemetry_key: Path | None = None,
        telemetry_grace_s: float = DEFAULT_TELEMETRY_GRACE_S,
        clock: Any = time.time,
    ) -> None:
        self.folder = folder
        self.state_path = folder / "keyring.json"
        self.telemetry_grace_s = telemetry_grace_s
        self.clock = clock
        self._thread_lock = threading.Lock()
        self._cache: tuple[int, KeyringState, dict[str, TelemetryPrivateKey]] | None = None
        with self._locked():
            if not self.state_path.exists():
                self._create(legacy_telemetry_key)

    # -- reading ------------------------------------------------------------------------------
    def state(self) -> KeyringState:
        return self._load()[0]

    def telemetry_keys(self) -> dict[str, TelemetryPrivateKey]:
        """Every telemetry key the fleet opens envelopes with: the current one and those in grace."""
        return dict(self._load()[1])

    def telemetry_generation(self) -> int:
        """Changes whenever the set of telemetry keys may have (the state file's mtime_ns)."""
        return self._mtime()

    def current_telemetry_key(self) -> tuple[str, TelemetryPrivateKey]:
        state, keys = self._load()
        return state.telemetry_current, keys[state.telemetry_current]

    def field_signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        state = self.state()
        return state.field_current, self._read_field_key(state.field_current)

    def document(self) -> dict[str, Any]:
        """What devices are told (no private material): the telemetry key to seal to, the field-token
        keys to trust, and the tokens revoked before they expire."""
        state, keys = self._load()
        current = keys[state.telemetry_current]
        field = {}
        for kid in sorted(state.field):
            public = self._read_field_key(kid).public_key()
            field[kid] = _b64(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        return {
            "format": KEYS_FORMAT,
            "serial": state.serial,
            "telemetry": {
                "key_id": state.telemetry_current,
                "kem": kem_of(current),
                "public": _b64(public_raw(current.public_key())),
            },
            "field_tokens": {"keys": field, "revoked": dict(sorted(state.revoked.items()))},
        }

    def document_bytes(self) -> bytes:
        return canonical(self.document())

    # -- changing -----------------------------------------------------------------------------
    def rotate_telemetry(self, kem: str = "x25519") -> str:
        """Make a new current telemetry key; the old one is still opened for the grace period."""
        if kem not in KEMS:
            raise InvalidRequest(f"unknown telemetry KEM {kem!r}; use one of {', '.join(KEMS)}")
        with self._locked():
            state = self._read_state()
            key = generate_telemetry_key(kem)
            kid = fleet_key_id(key.public_key())
            write_private(self._telemetry_path(kid), private_to_bytes(key))
            now = int(self.clock())
            telemetry = {k: dict(v) for k, v in state.telemetry.items()}
            telemetry[state.telemetry_current]["retired"] = now
            telemetry[kid] = {"kem": kem, "created": now, "retired": None}
            self._write_state(
                KeyringState(
                    state.serial + 1, kid, telemetry, state.field_current, state.field, state.revoked
                )
            )
            return kid

    def rotate_field_signing(self, drop_old: bool = False) -> str:
        """Sign new field tokens with a new key. `drop_old`: distrust the old key (and every token it
        signed) at once, for a key that leaked; otherwise it stays trusted until its tokens expire."""
        with self._locked():
            state = self._read_state()
            kid = self._new_field_key()
            now = int(self.clock())
            field = {k: dict(v) for k, v in state.field.items()}
            if drop_old:
                for old in field:
                    self._field_path(old).unlink(missing_ok=True)
                field = {}
            else:
                field[state.field_current]["retired"] = now
            field[kid] = {"created": now, "retired": None}
            self._write_state(
                KeyringState(
                    state.serial + 1, state.telemetry_current, state.telemetry, kid, field, state.revoked
                )
            )
            return kid

    def revoke(self, jti: str, expires: int) -> bool:
        """List token `jti` as revoked until it `expires`; False if it was listed already or expired."""
        if int(expires) <= self.clock():
            return False
        with self._locked():
            state = self._read_state()
            if jti in state.revoked:
                return False
            revoked = {**state.revoked, jti: int(expires)}
            self._write_state(
                KeyringState(
                    state.serial + 1,
                    state.telemetry_current,
                    state.telemetry,
                    state.field_current,
                    state.field,
                    revoked,
                )
            )
            return True

    def prune(self) -> list[str]:
        """Forget what has served its time: telemetry keys past their grace (the private key file is
        deleted), field keys past every token they signed, revocations of expired tokens. Returns
        what was dropped, e.g. ["telemetry:<kid>", "field:<kid>", "revoked:3"]."""
        now = self.clock()
        with self._locked():
            state = self._read_state()
            telemetry = {
                k: v
                for k, v in state.telemetry.items()
                if v.get("retired") is None or now - v["retired"] < self.telemetry_grace_s
            }
            field = {
                k: v
                for k, v in state.field.items()
                if v.get("retired") is None or now - v["retired"] < FIELD_KEY_GRACE_S
            }
            revoked = {j: exp for j, exp in state.revoked.items() if exp > now}
            dropped = [f"telemetry:{k}" for k in state.telemetry if k not in telemetry]
            dropped += [f"field:{k}" for k in state.field if k not in field]
            if len(revoked) < len(state.revoked):
                dropped.append(f"revoked:{len(state.revoked) - len(revoked)}")
            if not dropped:
                return []
            self._write_state(
                KeyringState(
                    state.serial + 1, state.telemetry_current, telemetry, state.field_current, field, revoked
                )
            )
            for kid in state.telemetry.keys() - telemetry.keys():
                self._telemetry_path(kid).unlink(missing_ok=True)
            for kid in state.field.keys() - field.keys():
                self._field_path(kid).unlink(missing_ok=True)
            return dropped

    # -- internals ----------------------------------------------------------------------------
    def _create(self, legacy: Path | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.folder / "telemetry").mkdir(exist_ok=True, mode=0o700)
        (self.folder / "field").mkdir(exist_ok=True, mode=0o700)
        now = int(self.clock())
        if legacy is not None and legacy.exists():  # a fleet from before rotation: keep its key
            key = private_from_bytes("x25519", legacy.read_bytes())
        else:
            key = generate_telemetry_key("x25519")
        kid = fleet_key_id(key.public_key())
        write_private(self._telemetry_path(kid), private_to_bytes(key), replace=True)
        field_kid = self._new_field_key()
        self._write_state(
            KeyringState(
                1,
                kid,
                {kid: {"kem": kem_of(key), "created": now, "retired": None}},
                field_kid,
                {field_kid: {"created": now, "retired": None}},
                {},
            )
        )

    def _new_field_key(self) -> str:
        key = Ed25519PrivateKey.generate()
        kid = field_key_id(key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_private(self._field_path(kid), pem, replace=True)
        return kid

    def _telemetry_path(self, kid: str) -> Path:
        return self.folder / "telemetry" / f"{kid}.key"

    def _field_path(self, kid: str) -> Path:
        return self.folder / "field" / f"{kid}.pem"

    def _read_field_key(self, kid: str) -> Ed25519PrivateKey:
        try:
            key = serialization.load_pem_private_key(self._field_path(kid).read_bytes(), password=None)
        except FileNotFoundError:
            raise NotFound(
                f"field-token key {kid} is listed in {self.state_path} but its file is missing; "
                "rotate the field-token key (`edgefleet fleet keys rotate --field-tokens --drop-old`)"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidRequest(f"{self._field_path(kid)} is not an Ed25519 key")
        return key

    def _mtime(self) -> int:
        """The state file's identity: it is replaced by rename, so a new inode means a new state
        (mtime alone can repeat within the file system's timestamp granularity)."""
        try:
            st = os.stat(self.state_path)
        except FileNotFoundError:
            return 0
        return hash((st.st_ino, st.st_mtime_ns, st.st_size))

    def _load(self) -> tuple[KeyringState, dict[str, TelemetryPrivateKey]]:
        mtime = self._mtime()
        with self._thread_lock:
            if self._cache is not None and self._cache[0] == mtime:
                return self._cache[1], self._cache[2]
        state = self._read_state()
        keys = {}
        for kid, info in state.telemetry.items():
            path = self._telemetry_path(kid)
            try:
                keys[kid] = private_from_bytes(str(info["kem"]), path.read_bytes())
            except FileNotFoundError:
                if kid == state.telemetry_current:
                    raise NotFound(
                        f"the current telemetry key's file {path} is missing; rotate the telemetry key "
                        "(`edgefleet fleet keys rotate --telemetry`) so devices seal to a new one"
                    ) from None
        with self._thread_lock:
            self._cache = (mtime, state, keys)
        return state, keys

    def _read_state(self) -> KeyringState:
        try:
            return KeyringState.from_json(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            raise NotFound(f"{self.state_path} is missing; restore it from the fleet's backup") from None
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidRequest(f"{self.state_path} is not a valid keyring ({e}); restore it") from e

    def _write_state(self, state: KeyringState) -> None:
        replace_private(self.state_path, json.dumps(state.to_json(), indent=1, sort_keys=True).encode())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with exclusive_lock(self.folder / ".lock"):
            yield


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
