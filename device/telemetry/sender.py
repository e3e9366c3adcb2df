"""Drains the outbox to the fleet: seal each record, publish at QoS 1, delete it only after PUBACK.

A record that was published but not acknowledged when the link dropped stays in the outbox and
is sent again; the fleet drops the duplicate by (device, seq). What the device guarantees ends at
the broker's PUBACK: from there the broker's persistence and the fleet worker's persistent
session carry it. An end-to-end acknowledgement from the fleet (its highest stored seq per
device) is the planned step that closes the remaining windows (see docs/architecture.md).
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from device.telemetry.outbox import Outbox
from protocol.sealed import fleet_key_id, seal

log = logging.getLogger(__name__)
BATCH = 64
IDLE_POLL_S = 0.5

PublishBatch = Callable[[list[bytes]], Awaitable[None]]


class TelemetrySender:
    def __init__(
        self,
        outbox: Outbox,
        device_id: str,
        device_key: Ed25519PrivateKey,
        fleet_public: X25519PublicKey,
        connected: asyncio.Event,
        publish_batch: PublishBatch,
    ) -> None:
        self.outbox = outbox
        self.device_id = device_id
        self.device_key = device_key
        self.fleet_public = fleet_public
        self.fleet_key_id = fleet_key_id(fleet_public)
        self.connected = connected
        self.publish_batch = publish_batch
        self.sent = 0
        self.wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def wakeup_threadsafe(self) -> None:
        """Producers in other threads call this after a put, so records leave without polling delay."""
        self._loop.call_soon_threadsafe(self.wakeup.set)

    def _seal_batch(self) -> tuple[list[int], list[bytes]]:
        records = self.outbox.peek(BATCH)
        envelopes = [
            seal(
                r.payload,
                device_id=self.device_id,
                seq=r.seq,
                device_key=self.device_key,
                fleet_public=self.fleet_public,
                fleet_key_id=self.fleet_key_id,
            )
            for r in records
        ]
        return [r.seq for r in records], envelopes

    async def run(self) -> None:
        while True:
            await self.connected.wait()
            seqs, envelopes = await asyncio.to_thread(self._seal_batch)
            if not envelopes:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), IDLE_POLL_S)
                continue
            try:
                await self.publish_batch(envelopes)
            except Exception as e:  # link dropped mid-batch: keep the records, retry after reconnect
                log.info("telemetry batch not acknowledged (%s); will resend", e)
                await asyncio.sleep(0.5)
                continue
            await asyncio.to_thread(self.outbox.ack_many, seqs)
            self.sent += len(seqs)
