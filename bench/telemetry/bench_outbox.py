"""Micro-benchmark of the telemetry outbox (and sealing): records/s for put, batched put, drain.

    .venv/bin/python bench/telemetry/bench_outbox.py [--dir DIR] [--n N] [--size BYTES]

Every `put` is one commit with synchronous=FULL, so single puts measure the disk's fsync rate;
run it on the device's real storage (eMMC/SD) for figures that mean anything there.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from device.telemetry.outbox import Outbox
from protocol.sealed import fleet_key_id, open_sealed, seal


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:10.0f} records/s  ({seconds * 1e6 / n:8.1f} us each)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the outbox file goes (default: a temp dir)"
    )
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    payload = b"m" * args.size
    with (
        tempfile.TemporaryDirectory(dir=args.dir) as tmp,
        Outbox(Path(tmp) / "outbox.db", max_bytes=1 << 30) as box,
    ):
        t0 = time.perf_counter()
        for _ in range(args.n):
            box.put("metric", payload)
        print(f"put (1 commit each)       {rate(args.n, time.perf_counter() - t0)}")
        t0 = time.perf_counter()
        for _ in range(args.n // 100):
            box.put_many("metric", [payload] * 100)
        print(f"put_many (100 per commit) {rate(args.n // 100 * 100, time.perf_counter() - t0)}")
        total = box.stats().pending
        t0 = time.perf_counter()
        while batch := box.peek(100):
            box.ack_many(r.seq for r in batch)
        print(f"drain (peek 100+ack_many) {rate(total, time.perf_counter() - t0)}")

    fleet, device = X25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    kid = fleet_key_id(fleet.public_key())
    t0 = time.perf_counter()
    envelopes = [
        seal(
            payload,
            device_id="bench",
            seq=i,
            device_key=device,
            fleet_public=fleet.public_key(),
            fleet_key_id=kid,
        )
        for i in range(args.n)
    ]
    seal_s = time.perf_counter() - t0
    print(f"seal                      {rate(args.n, seal_s)}")
    t0 = time.perf_counter()
    for envelope in envelopes:
        open_sealed(envelope, fleet_keys={kid: fleet}, device_keys=lambda _: device.public_key())
    open_s = time.perf_counter() - t0
    print(f"open_sealed               {rate(args.n, open_s)}")

    # The baseline a user would otherwise have: the same record as plain JSON, encoded and parsed.
    record = {"kind": "metric", "ts": 1.0, "body": {"label": "scratch", "pad": "m" * max(0, args.size - 60)}}
    t0 = time.perf_counter()
    plain = [json.dumps(record).encode() for _ in range(args.n)]
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for item in plain:
        json.loads(item)
    decode_s = time.perf_counter() - t0
    print(f"plain JSON encode         {rate(args.n, encode_s)}")
    print(f"plain JSON decode         {rate(args.n, decode_s)}")
    print(f"seal / plain encode cost  {seal_s / encode_s:10.1f}x")
    print(f"open / plain decode cost  {open_s / decode_s:10.1f}x")
    print(f"envelope overhead         {len(envelopes[0]) - len(payload):10d} bytes per record")


if __name__ == "__main__":
    main()
