"""Drains the outbox to the fleet: seal each record, publish at QoS 1, delete it on the fleet's receipt.

The broker's PUBACK only says the broker has the message; the record leaves the outbox when the
fleet says it stored it (or refused it for good, which is counted). When the oldest record sent
has had no receipt for `RESEND_AFTER_S`, everything unreceipted is sent again from the oldest;
the fleet drops the duplicates by (device, seq). The clock is per record, not "no receipt at
all": a record the broker dropped (its queue for a busy fleet worker full) while later ones were
receipted goes again too. So a broker or fleet-worker crash costs a resend, not a record.

Records are sealed when they are sent, to the fleet key `fleet_key()` names then, so a key the
fleet rotated to applies to the backlog too. Records the fleet sends back as sealed to a key it
no longer holds (`rekey`) stay in the outbox: sending pauses until the keys document changed (or
`REKEY_WAIT_S` passed) and starts over from the oldest.
"""

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.telemetry.outbox import Outbox
from protocol.messages import TelemetryAck
from protocol.sealed import TelemetryPublicKey, seal

log = logging.getLogger(__name__)
BATCH = 64
IDLE_POLL_S = 0.5
RESEND_AFTER_S = 15.0
REKEY_WAIT_S = 30.0

PublishBatch = Callable[[list[bytes]], Awaitable[None]]
FleetKeySource = Callable[[], tuple[str, TelemetryPublicKey]]  # (key id, public key) to seal to now


class TelemetrySender:
    def __init__(
        self,
        outbox: Outbox,
        device_id: str,
        device_key: Ed25519PrivateKey,
        fleet_key: FleetKeySource,
        connected: asyncio.Event,
        publish_batch: PublishBatch,
        resend_after_s: float = RESEND_AFTER_S,
        on_rekey: Callable[[], None] = lambda: None,
    ) -> None:
        self.resend_after_s = resend_after_s
        self.outbox = outbox
        self.device_id = device_id
        self.device_key = device_key
        self.fleet_key = fleet_key
        self.on_rekey = on_rekey  # asks for a keys refresh
        self.connected = connected
        self.publish_batch = publish_batch
        self.sent = 0
        self.receipted = 0
        self.refused_by_fleet = 0
        self.rekeyed = 0  # records the fleet sent back to be re-sealed to its current key
        self.keys_changed = asyncio.Event()
        self._rekey_pending = False
        self.cursor = 0  # highest seq published and not yet due for a resend
        self.last_progress = time.monotonic()
        # Seqs published since the last start-over and not receipted yet, with when: oldest first.
        self._unreceipted: OrderedDict[int, float] = OrderedDict()
        self.resends = 0  # times everything unreceipted was sent again
        self.wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def wakeup_threadsafe(self) -> None:
        """Producers in other threads call this after a put, so records leave without polling delay."""
        self._loop.call_soon_threadsafe(self.wakeup.set)

    def keys_changed_threadsafe(self) -> None:
        """The keys document changed (called from the thread that refreshed it)."""
        self._loop.call_soon_threadsafe(self.keys_changed.set)

    async def on_receipt(self, ack: TelemetryAck) -> None:
        """The fleet's receipt: only now do records leave the outbox."""
        if ack.rekey:
            self.rekeyed += len(ack.rekey)
            if not self._rekey_pending:
                log.warning(
                    "the fleet no longer holds the key %d record(s) were sealed to; refreshing keys",
                    len(ack.rekey),
                )
                self._rekey_pending = True
                self.keys_changed.clear()
                self.on_rekey()
        for seq in (*ack.stored, *ack.refused):
            self._unreceipted.pop(seq, None)
        done = await asyncio.to_thread(self.outbox.ack_many, [*ack.stored, *ack.refused])
        self.receipted += done
        self.refused_by_fleet += len(ack.refused)
        if ack.refused:
            log.error("the fleet refused telemetry records %s; see the fleet's log", ack.refused[:10])
        self.last_progress = time.monotonic()

    def _seal_batch(self) -> tuple[list[int], list[bytes]]:
        records = self.outbox.peek(BATCH, after=self.cursor)
        key_id, public = self.fleet_key()
        envelopes = [
            seal(
                r.payload,
                device_id=self.device_id,
                seq=r.seq,
                device_key=self.device_key,
                fleet_public=public,
                fleet_key_id=key_id,
            )
            for r in records
        ]
        return [r.seq for r in records], envelopes

    def _due_for_resend(self) -> bool:
        """The oldest record sent has waited too long for its receipt (or, after a restart, no
        receipt came for a while): start over from the oldest."""
        if self.cursor == 0:
            return False
        now = time.monotonic()
        if self._unreceipted and now - next(iter(self._unreceipted.values())) > self.resend_after_s:
            return True
        return now - self.last_progress > self.resend_after_s

    def _start_over(self) -> None:
        self.cursor = 0
        self._unreceipted.clear()
        self.last_progress = time.monotonic()

    async def run(self) -> None:
        while True:
            await self.connected.wait()
            if self._rekey_pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.keys_changed.wait(), REKEY_WAIT_S)
                self._rekey_pending = False
                self._start_over()  # everything unreceipted goes again, sealed to the key known now
            if self._due_for_resend():
                log.info(
                    "a telemetry record had no receipt from the fleet for %.0f s; resending unreceipted ones",
                    self.resend_after_s,
                )
                self.resends += 1
                self._start_over()
            seqs, envelopes = await asyncio.to_thread(self._seal_batch)
            if not envelopes:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), IDLE_POLL_S)
                continue
            if self.cursor == 0:
                self.last_progress = time.monotonic()
            try:
                await self.publish_batch(envelopes)
            except Exception as e:  # link dropped mid-batch: send again from the oldest after reconnect
                log.info("telemetry batch not acknowledged by the broker (%s); will resend", e)
                self._start_over()
                await asyncio.sleep(0.5)
                continue
            now = time.monotonic()
            for seq in seqs:
                self._unreceipted.setdefault(seq, now)
            self.cursor = seqs[-1]
            self.sent += len(seqs)
