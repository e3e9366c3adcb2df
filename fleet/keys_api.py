"""The keys routes of the fleet API: the keys document, key rotation, field-engineer tokens.

All behind the operator token. A field token is returned once, when it is issued: the fleet keeps
its record (who, which role, which devices, until when), not the token.
"""

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field

from fleet import key_rotation
from fleet.service import FleetService
from protocol.field_token import MAX_DEVICES, MAX_SUBJECT_CHARS, MAX_TTL_S


class RotateKeys(BaseModel):
    model_config = ConfigDict(extra="forbid")
    telemetry: bool = Field(default=False, description="a new key for devices to seal telemetry to")
    signing: bool = Field(default=False, description="new TUF targets, snapshot and timestamp keys")
    field_tokens: bool = Field(default=False, description="a new key to sign field-engineer tokens")
    root: bool = Field(default=False, description="new TUF root keys (devices walk the root chain)")
    kem: Literal["x25519", "mlkem768-x25519"] = Field(
        default="x25519", description="the new telemetry key's KEM; mlkem768-x25519 is the PQ hybrid"
    )
    drop_old_field_key: bool = Field(
        default=False, description="distrust the old field-token key and its tokens at once (it leaked)"
    )


class NewFieldToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engineer: str = Field(
        min_length=1, max_length=MAX_SUBJECT_CHARS, description="who the token is for (shown in audit)"
    )
    role: Literal["viewer", "technician"] = Field(
        description="viewer: read-only; technician: also inference, line state and rollback"
    )
    devices: list[str] = Field(
        min_length=1, max_length=MAX_DEVICES, description="device ids, or ['*'] for every device"
    )
    hours: float = Field(default=8.0, gt=0, le=MAX_TTL_S / 3600, description="lifetime, at most 8 h")


Jti = Annotated[str, PathParam(pattern="^[0-9a-f]{32}$", description="the token's id")]


def add_keys_routes(app: FastAPI, service: FleetService, auth: Depends) -> None:
    @app.get("/api/keys", dependencies=[auth])
    def keys() -> dict[str, Any]:
        """The keys document devices get, and the keyring's state (current and retiring key ids)."""
        return {"document": service.keyring.document(), "keyring": service.keyring.state().to_json()}

    @app.post("/api/keys/rotate", dependencies=[auth])
    async def rotate(body: RotateKeys) -> dict[str, Any]:
        request = key_rotation.RotateRequest(**body.model_dump())
        return await key_rotation.rotate(service, request)

    @app.post("/api/field-tokens", dependencies=[auth], status_code=201)
    def issue(body: NewFieldToken) -> dict[str, Any]:
        return service.field_tokens.issue(body.engineer, body.role, body.devices, round(body.hours * 3600))

    @app.get("/api/field-tokens", dependencies=[auth])
    def tokens(include_expired: bool = False) -> list[dict[str, Any]]:
        return service.field_tokens.list(include_expired)

    @app.post("/api/field-tokens/{jti}/revoke", dependencies=[auth])
    async def revoke(jti: Jti) -> dict[str, Any]:
        view = service.field_tokens.revoke(jti)
        return {**view, **await key_rotation.publish_and_notify(service)}
