"""Rotating the fleet's keys without taking a device offline, and telling devices about it.

What `edgefleet fleet keys rotate` can rotate, and how devices follow:
- TUF's online roles (targets, snapshot, timestamp; root on request): a new root signed by the
  old and the new root keys, which devices walk to at their next metadata refresh.
- The telemetry key: new records are sealed to the new key once a device has refreshed; the old
  key keeps opening what was sealed before, for its grace period.
- The field-token signing key: new tokens are signed with the new key; tokens already issued stay
  valid until they expire, or die at once with `drop_old_field_key` (the key leaked).

After any change the keys document is re-published as a TUF target (signed with the targets key
now in force) and every online device is sent a `cmd/keys` notice, so it refreshes now instead of
within the hour.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from fleet.db import Device
from fleet.errors import InvalidRequest
from protocol import topics
from protocol.keys_document import KEYS_FORMAT
from protocol.messages import KeysNotice, encode
from protocol.targets import KEYS_TARGET

if TYPE_CHECKING:
    from fleet.service import FleetService

log = logging.getLogger(__name__)
ONLINE_ROLES = ("targets", "snapshot", "timestamp")


@dataclass(frozen=True)
class RotateRequest:
    telemetry: bool = False
    signing: bool = False
    field_tokens: bool = False
    root: bool = False
    kem: str = "x25519"
    drop_old_field_key: bool = False

    def check(self) -> None:
        if not (self.telemetry or self.signing or self.field_tokens or self.root):
            raise InvalidRequest("name what to rotate: telemetry, signing, field_tokens and/or root")
        if self.drop_old_field_key and not self.field_tokens:
            raise InvalidRequest("drop_old_field_key applies only when rotating field_tokens")


def publish_keys_document(service: FleetService) -> int:
    """Publish the keyring's document as the signed TUF target devices read; return its serial."""
    data = service.keyring.document_bytes()
    service.tuf.publish_document(KEYS_TARGET, data, {"format": KEYS_FORMAT})
    return service.keyring.state().serial


async def notify_devices(service: FleetService, serial: int) -> int:
    """Send `cmd/keys` to every online device; return how many were told (the rest refresh on
    reconnect and hourly)."""
    if service.publish is None:
        return 0
    with service.sessions() as s:
        online = list(s.scalars(select(Device.id).where(Device.online.is_(True))))
    payload = encode(KeysNotice(serial=serial))
    publish = service.publish
    sent = 0
    for start in range(0, len(online), 200):  # bounded bursts: a notice is tiny, the broker is shared
        batch = online[start : start + 200]
        results = await asyncio.gather(
            *(publish(topics.device_topic(d, topics.CMD_KEYS), payload, 1) for d in batch),
            return_exceptions=True,
        )
        sent += sum(1 for r in results if not isinstance(r, BaseException))
    return sent


async def rotate(service: FleetService, request: RotateRequest) -> dict[str, Any]:
    """Rotate what `request` names, publish, notify; return what changed."""
    request.check()
    changed: dict[str, Any] = {}

    def work() -> int:
        if request.root:
            changed["root_version"] = service.tuf.rotate_key("root")
        if request.signing:
            for role in ONLINE_ROLES:
                changed["root_version"] = service.tuf.rotate_key(role)
            changed["signing"] = list(ONLINE_ROLES)
        if request.telemetry:
            changed["telemetry_key_id"] = service.keyring.rotate_telemetry(request.kem)
            changed["kem"] = request.kem
        if request.field_tokens:
            changed["field_token_key_id"] = service.keyring.rotate_field_signing(
                drop_old=request.drop_old_field_key
            )
        return publish_keys_document(service)

    serial = await asyncio.to_thread(work)
    changed["serial"] = serial
    changed["devices_notified"] = await notify_devices(service, serial)
    log.info("keys rotated: %s", changed)
    return changed


async def publish_and_notify(service: FleetService) -> dict[str, int]:
    serial = await asyncio.to_thread(publish_keys_document, service)
    return {"serial": serial, "devices_notified": await notify_devices(service, serial)}


async def prune(service: FleetService) -> list[str]:
    """Drop expired keys and revocations (hourly); publish and notify when anything went."""
    dropped = await asyncio.to_thread(service.keyring.prune)
    if dropped:
        log.info("keyring pruned: %s", ", ".join(dropped))
        await publish_and_notify(service)
    return dropped
