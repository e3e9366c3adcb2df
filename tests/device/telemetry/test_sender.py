"""The telemetry sender's resend rule, with a real outbox; the broker and fleet are one function
that drops what a full broker queue would drop and receipts the rest (the MQTT path itself runs in
tests/integration/test_telemetry_link.py)."""

import asyncio
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.telemetry.outbox import Kind, Outbox
from device.telemetry.sender import TelemetrySender
from protocol.messages import TelemetryAck
from protocol.sealed import KEM_X25519, fleet_key_id, generate_telemetry_key, peek_header


def test_a_record_lost_between_receipted_ones_is_sent_again_while_receipts_keep_coming(
    tmp_path: Path,
) -> None:
    """The broker dropped seq 3 once; later records keep being receipted. The sender must not wait
    for receipts to stop altogether before it sends seq 3 again."""
    fleet_key = generate_telemetry_key(KEM_X25519)
    key_id = fleet_key_id(fleet_key.public_key())
    sent: list[int] = []

    async def scenario() -> TelemetrySender:
        outbox = Outbox(tmp_path / "outbox.db", 1 << 20)
        connected = asyncio.Event()
        connected.set()
        sender: TelemetrySender | None = None
        dropped: set[int] = set()

        async def publish(envelopes: list[bytes]) -> None:
            assert sender is not None
            seqs = [peek_header(e)[2] for e in envelopes]
            sent.extend(seqs)
            delivered = [s for s in seqs if s != 3 or 3 in dropped]
            if 3 in seqs:
                dropped.add(3)
            await sender.on_receipt(TelemetryAck(stored=delivered))

        sender = TelemetrySender(
            outbox,
            "cam-1",
            Ed25519PrivateKey.generate(),
            lambda: (key_id, fleet_key.public_key()),
            connected,
            publish,
            resend_after_s=0.5,
        )
        task = asyncio.create_task(sender.run())
        try:
            for i in range(40):  # a record every 50 ms: receipts never stop for 0.5 s
                outbox.put(Kind.METRIC, b"r%d" % i)
                sender.wakeup.set()
                await asyncio.sleep(0.05)
            for _ in range(100):
                if outbox.stats().pending == 0:
                    break
                await asyncio.sleep(0.05)
            assert outbox.stats().pending == 0, "seq 3 still waits in the outbox"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            outbox.close()
        return sender

    sender = asyncio.run(scenario())
    assert sent.count(3) == 2, "sent, dropped, sent again"
    assert sender.resends >= 1
    assert sender.receipted == 40
    # It was sent again well before the 40 records (2 s) were over, not after receipts stopped.
    assert sent.index(3, sent.index(3) + 1) < len(sent) - 5
