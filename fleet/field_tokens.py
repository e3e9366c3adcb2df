"""Field-engineer tokens: issued by the fleet, verified by devices offline (protocol/field_token.py).

The fleet keeps a record of every token it issued (never the token itself: it is a bearer
credential, shown once to the operator who asked for it), so operators can list who may touch
which device until when, and revoke one. A revocation reaches devices through the keys document
(fleet/keyring.py), the next time each device refreshes it; a device that stays offline learns of
it only when it reconnects, which is why tokens live at most 8 hours.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from fleet.db import Base
from fleet.errors import InvalidRequest, NotFound
from fleet.keyring import FleetKeyring
from protocol.field_token import ANY_DEVICE, MAX_TTL_S, ROLES, FieldTokenError, issue
from protocol.topics import is_valid_device_id


class FieldTokenRow(Base):
    __tablename__ = "field_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    devices: Mapped[list[str]] = mapped_column(JSON)
    key_id: Mapped[str] = mapped_column(String(64))
    issued: Mapped[int]
    expires: Mapped[int]
    issued_by: Mapped[str] = mapped_column(String(64), default="operator")
    revoked: Mapped[float | None] = mapped_column(default=None)


class FieldTokens:
    def __init__(self, sessions: sessionmaker[Session], keyring: FleetKeyring) -> None:
        self.sessions = sessions
        self.keyring = keyring

    def issue(self, subject: str, role: str, devices: list[str], ttl_s: int) -> dict[str, Any]:
        """A new token (returned once, in `token`) and its record."""
        if role not in ROLES:
            raise InvalidRequest(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not 0 < ttl_s <= MAX_TTL_S:
            raise InvalidRequest(f"a field token lives 1 s to {MAX_TTL_S // 3600} h, not {ttl_s} s")
        for device in devices:
            if device != ANY_DEVICE and not is_valid_device_id(device):
                raise InvalidRequest(f"{device!r} is not a device id (or '*' for every device)")
        key_id, key = self.keyring.field_signing_key()
        try:
            token, claims = issue(key, key_id, subject, role, devices, ttl_s)
        except FieldTokenError as e:
            raise InvalidRequest(str(e)) from e
        row = FieldTokenRow(
            jti=claims.jti,
            subject=claims.sub,
            role=claims.role,
            devices=list(claims.devices),
            key_id=key_id,
            issued=claims.iat,
            expires=claims.exp,
        )
        with self.sessions.begin() as s:
            s.add(row)
        return {"token": token, **_view(row)}

    def list(self, include_expired: bool = False) -> list[dict[str, Any]]:
        with self.sessions() as s:
            query = select(FieldTokenRow).order_by(FieldTokenRow.issued.desc())
            if not include_expired:
                query = query.where(FieldTokenRow.expires > int(time.time()))
            return [_view(r) for r in s.scalars(query.limit(1000))]

    def revoke(self, jti: str) -> dict[str, Any]:
        """Mark the token revoked and list it in the keys document (the caller publishes that)."""
        with self.sessions.begin() as s:
            row = s.get(FieldTokenRow, jti)
            if row is None:
                raise NotFound(f"no field token {jti!r} was issued by this fleet")
            if row.revoked is None:
                row.revoked = time.time()
            view = _view(row)
        self.keyring.revoke(jti, view["expires"])
        return view


def _view(row: FieldTokenRow) -> dict[str, Any]:
    return {
        "jti": row.jti,
        "subject": row.subject,
        "role": row.role,
        "devices": list(row.devices),
        "key_id": row.key_id,
        "issued": row.issued,
        "expires": row.expires,
        "revoked": row.revoked,
        "expired": row.expires <= time.time(),
    }
