"""The enrollment routes of the fleet API.

`POST /api/enroll` and `POST /api/enroll/renew` take no operator token: the enrollment token, or a
live certificate and a CSR signed by its key, is the credential. Refused attempts are counted per
client address (HTTP 429 past the limit). New tokens, certificate lists and revocation are the
operator's, behind the operator token like the rest of the API.
"""

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from fleet.ca import MAX_CSR_BYTES
from fleet.enrollment import EnrollmentRefused, TooManyFailures, enrollment_of
from fleet.service import FleetService


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=128, description="the one-time token from `device-add`")
    csr: str = Field(min_length=1, max_length=MAX_CSR_BYTES, description="PEM CSR of the device's own key")
    device_key: str | None = Field(
        default=None, max_length=1024, description="the device's Ed25519 telemetry signing key (PEM)"
    )


class RenewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    certificate: str = Field(min_length=1, max_length=MAX_CSR_BYTES, description="the current certificate")
    csr: str = Field(min_length=1, max_length=MAX_CSR_BYTES, description="PEM CSR signed by the same key")


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def add_enrollment_routes(app: FastAPI, service: FleetService, auth: Depends) -> None:
    async def refused(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=403)

    async def too_many(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, TooManyFailures)
        headers = {"Retry-After": str(max(1, round(e.retry_after_s)))}
        return JSONResponse({"error": str(e)}, status_code=429, headers=headers)

    app.add_exception_handler(EnrollmentRefused, refused)
    app.add_exception_handler(TooManyFailures, too_many)

    @app.post("/api/enroll")
    async def enroll(body: EnrollRequest, request: Request) -> dict[str, Any]:
        enrollment = enrollment_of(service)
        # Signing and the database are blocking; broker restarts (a re-enrollment) more so.
        return await asyncio.to_thread(
            enrollment.enroll, body.token, body.csr, body.device_key, _client(request)
        )

    @app.post("/api/enroll/renew")
    async def renew(body: RenewRequest, request: Request) -> dict[str, Any]:
        enrollment = enrollment_of(service)
        return await asyncio.to_thread(enrollment.renew, body.certificate, body.csr, _client(request))

    @app.post("/api/devices/{device_id}/token", dependencies=[auth], status_code=201)
    def new_token(device_id: str) -> dict[str, Any]:
        return enrollment_of(service).new_token(device_id)

    @app.get("/api/devices/{device_id}/certificates", dependencies=[auth])
    def certificates(device_id: str) -> list[dict[str, Any]]:
        return enrollment_of(service).certificates(device_id)

    @app.post("/api/devices/{device_id}/revoke", dependencies=[auth])
    def revoke(device_id: str) -> dict[str, Any]:
        return {"device_id": device_id, "revoked": enrollment_of(service).revoke_device(device_id)}
