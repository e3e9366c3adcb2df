"""Field-engineer tokens: signed by the fleet, checked by a device offline with the fleet's public key.

Compact form: `eft1.<b64url(payload)>.<b64url(sig)>` (base64url without padding). The signature is
Ed25519 over the ASCII bytes `eft1.<b64url(payload)>`; the payload is canonical JSON (sorted keys,
no spaces) with `kid`, `sub`, `role`, `devices`, `iat`, `exp` and `jti`.

A device knows the fleet's token keys and the revoked token ids through a `FieldTrust` (the fleet
distributes both in a signed document); nothing here touches the network or the clock but `now`.
Every refusal is a `FieldTokenError` whose `reason` says exactly why, so the device can answer it.
"""

import base64
import binascii
import hashlib
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.errors import ProtocolError
from protocol.topics import is_valid_device_id

PREFIX = "eft1"
MAX_TTL_S = 8 * 3600
MAX_TOKEN_BYTES = 4096  # checked before anything is decoded: a token is a few hundred bytes
CLOCK_SKEW_S = 120  # a device's clock may run behind the fleet's by this much
ROLES = ("viewer", "technician")
ANY_DEVICE = "*"
MAX_DEVICES = 1000
MAX_SUBJECT_CHARS = 64
MAX_KEY_ID_CHARS = 64
_FIELDS = frozenset({"kid", "sub", "role", "devices", "iat", "exp", "jti"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_JTI = re.compile(r"[0-9a-f]{32}")
_MAX_UNIX_S = 2**40  # far past any real expiry; keeps the arithmetic on sane numbers


class FieldTokenError(ProtocolError):
    """A field token that cannot be issued or is refused; `reason` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.args = (f"field token: {reason}",)  # not ProtocolError's "malformed message": often it is not


@dataclass(frozen=True)
class FieldToken:
    """What a verified (or just issued) token says."""

    kid: str
    sub: str
    role: str
    devices: tuple[str, ...]
    iat: int
    exp: int
    jti: str

    def covers(self, device_id: str) -> bool:
        return self.devices == (ANY_DEVICE,) or device_id in self.devices

    def payload(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "sub": self.sub,
            "role": self.role,
            "devices": list(self.devices),
            "iat": self.iat,
            "exp": self.exp,
            "jti": self.jti,
        }


@dataclass(frozen=True)
class FieldTrust:
    """The fleet's token keys by key id, and the ids (`jti`) of tokens revoked before their expiry."""

    keys: Mapping[str, Ed25519PublicKey]
    revoked: frozenset[str] = field(default_factory=frozenset)


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a token key: `ft-` + the first 16 hex digits of its raw bytes' sha256."""
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "ft-" + hashlib.sha256(raw).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    # urlsafe_b64decode skips characters outside the alphabet; a token must not carry any, and
    # only one spelling of each value is accepted (no padding, no stray bits).
    if not _B64URL.fullmatch(text):
        raise FieldTokenError(f"malformed: the {what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise FieldTokenError(f"malformed: the {what} is not base64url ({e})") from e
    if _b64(data) != text:
        raise FieldTokenError(f"malformed: the {what} is not canonical base64url")
    return data


def _canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise FieldTokenError("malformed: the payload repeats a field")
    return dict(pairs)


def _check_subject(sub: object) -> str:
    if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUBJECT_CHARS or not sub.isprintable():
        raise FieldTokenError(f"malformed: sub must be 1-{MAX_SUBJECT_CHARS} printable characters")
    return sub


def _check_devices(devices: object) -> tuple[str, ...]:
    if not isinstance(devices, list) or not 1 <= len(devices) <= MAX_DEVICES:
        raise FieldTokenError(f"malformed: devices must be a list of 1-{MAX_DEVICES} device ids")
    if devices == [ANY_DEVICE]:
        return (ANY_DEVICE,)
    for device in devices:
        if not isinstance(device, str) or not is_valid_device_id(device):
            raise FieldTokenError(
                f"malformed: devices holds {device!r}, which is not a device id "
                f"({ANY_DEVICE!r} must be the only entry to mean any device)"
            )
    return tuple(devices)


def _check_key_id(kid: object) -> str:
    if not isinstance(kid, str) or not 1 <= len(kid) <= MAX_KEY_ID_CHARS or not kid.isprintable():
        raise FieldTokenError(f"malformed: kid must be 1-{MAX_KEY_ID_CHARS} printable characters")
    return kid


def _check_time(value: object, name: str) -> int:
    if type(value) is not int or not 0 <= value < _MAX_UNIX_S:  # bool is an int: refused too
        raise FieldTokenError(f"malformed: {name} must be whole unix seconds")
    return value


def _parse(payload: bytes) -> FieldToken:
    """The payload's fields, each of the right type and shape; says nothing yet of trust or time."""
    try:
        data = json.loads(payload, object_pairs_hook=_no_duplicates)
    except FieldTokenError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FieldTokenError(f"malformed: the payload is not JSON ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise FieldTokenError("malformed: the payload is not a JSON object")
    if data.keys() != _FIELDS:
        missing, extra = sorted(_FIELDS - data.keys()), sorted(data.keys() - _FIELDS)
        raise FieldTokenError(f"malformed: payload fields missing {missing}, unexpected {extra[:5]}")
    role, jti = data["role"], data["jti"]
    if not isinstance(role, str) or len(role) > 32:
        raise FieldTokenError("malformed: role must be a short string")
    if not isinstance(jti, str) or not _JTI.fullmatch(jti):
        raise FieldTokenError("malformed: jti must be 32 lowercase hex digits")
    return FieldToken(
        kid=_check_key_id(data["kid"]),
        sub=_check_subject(data["sub"]),
        role=role,
        devices=_check_devices(data["devices"]),
        iat=_check_time(data["iat"], "iat"),
        exp=_check_time(data["exp"], "exp"),
        jti=jti,
    )


def issue(
    private_key: Ed25519PrivateKey,
    key_id: str,
    subject: str,
    role: str,
    devices: list[str],
    ttl_s: int,
    now: float | None = None,
) -> tuple[str, FieldToken]:
    """A new token for `subject` with `role` on `devices` (["*"]: any device), valid `ttl_s` from now."""
    if role not in ROLES:
        raise FieldTokenError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 0 < ttl_s <= MAX_TTL_S:
        raise FieldTokenError(f"ttl_s must be whole seconds in 1..{MAX_TTL_S} (8 h), not {ttl_s!r}")
    iat = int(time.time() if now is None else now)
    token = FieldToken(
        kid=_check_key_id(key_id),
        sub=_check_subject(subject),
        role=role,
        devices=_check_devices(list(devices)),
        iat=_check_time(iat, "iat"),
        exp=iat + ttl_s,
        jti=secrets.token_hex(16),
    )
    signed = f"{PREFIX}.{_b64(_canonical(token.payload()))}"
    compact = f"{signed}.{_b64(private_key.sign(signed.encode('ascii')))}"
    if len(compact) > MAX_TOKEN_BYTES:
        raise FieldTokenError(
            f"the token would be {len(compact)} bytes, over the {MAX_TOKEN_BYTES} a device accepts: "
            "name fewer devices, or use a group token ('*')"
        )
    return compact, token


def verify(token: str, trust: FieldTrust, device_id: str, now: float | None = None) -> FieldToken:
    """The token's claims if it is well formed, signed by a key of `trust`, within its lifetime,
    not revoked and good for `device_id`; else a FieldTokenError saying which of these failed."""
    if not isinstance(token, str):
        raise FieldTokenError("malformed: a token is a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise FieldTokenError(f"malformed: longer than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise FieldTokenError(f"malformed: not of the form {PREFIX}.<payload>.<signature>")
    payload = _unb64(parts[1], "payload")
    signature = _unb64(parts[2], "signature")
    claims = _parse(payload)
    public = trust.keys.get(claims.kid)
    if public is None:
        raise FieldTokenError(
            f"unknown key id {claims.kid!r}: this device does not know that fleet key (yet)"
        )
    if len(signature) != 64:
        raise FieldTokenError("bad signature: an Ed25519 signature is 64 bytes")
    try:
        public.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature as e:
        raise FieldTokenError("bad signature: not signed by the fleet key it names") from e
    # Signed by the fleet from here on: what is left is whether it applies, here and now.
    if claims.role not in ROLES:
        raise FieldTokenError(f"unknown role {claims.role!r}: this device knows {', '.join(ROLES)}")
    if claims.exp <= claims.iat:
        raise FieldTokenError("malformed: exp is not after iat")
    if claims.exp - claims.iat > MAX_TTL_S:
        raise FieldTokenError(
            f"lifetime over 8 h: {claims.exp - claims.iat} s between iat and exp (at most {MAX_TTL_S})"
        )
    at = time.time() if now is None else now
    if claims.iat > at + CLOCK_SKEW_S:
        raise FieldTokenError(
            f"not yet valid: issued {claims.iat - at:.0f} s in this device's future (check its clock)"
        )
    if at >= claims.exp:
        raise FieldTokenError(f"expired {at - claims.exp:.0f} s ago: ask the fleet for a new token")
    if claims.jti in trust.revoked:
        raise FieldTokenError(f"revoked: token {claims.jti} was revoked by the fleet")
    if not claims.covers(device_id):
        raise FieldTokenError(f"not for this device: the token names other devices than {device_id!r}")
    return claims
