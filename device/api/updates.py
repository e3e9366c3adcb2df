"""Local API routes for safe updates: the line state (busy/idle) and a field engineer's rollback.

`router(updater, line)` holds the routes without auth; `create_app(..., routers=[...])` includes
it behind the same auth and failed-login limiter as every other route. The role follows the method
(device/api/auth.py `role_for`): `GET /api/line` is for viewers; setting the line state and a
rollback change the device, so they need a technician.
"""

import re
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from device.errors import ConfigError
from device.line import MAX_SETTER_CHARS, LineState
from device.updater import Updater
from models.errors import ModelError
from models.package import verify_package
from protocol.messages import UpdateState

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MAX_BODY_BYTES = 64 * 1024  # these routes take a few fields


class LineChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    busy: bool
    by: str = Field(default="local-api", min_length=1, max_length=MAX_SETTER_CHARS)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to_version: int | None = Field(
        default=None, ge=1, description="default: the version the other slot holds"
    )
    reason: str = Field(default="", max_length=1024)


def router(updater: Updater, line: LineState) -> APIRouter:
    routes = APIRouter()

    @routes.get("/api/line")
    def get_line() -> dict[str, Any]:
        return line.get().to_json()

    @routes.put("/api/line")
    def put_line(change: LineChange) -> dict[str, Any]:
        try:
            return line.set(change.busy, change.by).to_json()
        except ConfigError as e:
            raise HTTPException(422, str(e)) from e

    @routes.post("/api/models/{name}/rollback")
    async def roll_back(name: str, request: RollbackRequest | None = None) -> dict[str, Any]:
        request = request or RollbackRequest()
        slots = updater.slots_of(name) if MODEL_NAME.match(name) else None
        if slots is None or not slots.exists():
            raise HTTPException(404, f"no model named {name!r} is installed on this device")
        to_version = request.to_version or _kept_version(updater, name)
        status = await updater.roll_back(
            name,
            to_version,
            f"field engineer via the local API: {request.reason or 'no reason given'}",
            f"local-{uuid.uuid4().hex[:12]}",
        )
        if status.state is not UpdateState.ROLLED_BACK:
            raise HTTPException(409, status.reason)
        return status.model_dump(mode="json")

    return routes


def _kept_version(updater: Updater, name: str) -> int:
    slots = updater.slots_of(name)
    try:
        return verify_package(slots.slot_dir(slots.inactive_slot())).version
    except ModelError as e:
        raise HTTPException(
            409, f"the other slot of {name} holds no usable version to go back to: {e}"
        ) from e
