"""What sealing costs per telemetry record: X25519 vs the post-quantum hybrid ML-KEM-768+X25519.

    nice -n 10 .venv/bin/python bench/telemetry/bench_seal.py [--n 1000] [--repeats 9] [--json FILE]

One realistic metrics record (a pipeline's per-minute summary, about 600 bytes as the device's
outbox holds it) is sealed by a device and opened by the fleet, per KEM, `--n` times per run; runs
are interleaved (every operation once per round, `--repeats` rounds) so drift on a shared machine
hits them alike. Each figure is the median over the runs of the mean time per record, with the
slowest and fastest run beside it. Baselines: the JSON encode the device does anyway (the
protocol's pydantic `encode`, and the stdlib's `json.dumps` of the same body). Sizes: the record,
the envelope, and what sealing adds (MQTT carries the envelope).
"""

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import __version__ as cryptography_version
from cryptography.hazmat.backends.openssl.backend import backend
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from protocol.messages import TelemetryRecord, encode
from protocol.sealed import (
    KEMS,
    fleet_key_id,
    generate_telemetry_key,
    open_sealed,
    seal,
)

DEVICE = "line3-cam-0042"


def metrics_body(minute: int) -> dict[str, Any]:
    """A pipeline's one-minute summary, as a device's pipeline puts it in the outbox."""
    return {
        "pipeline": "weld-seam-inspection",
        "site": "plant-2/line-3/station-07",
        "model": {
            "name": "seam-defect-yolo",
            "version": "2.4.1",
            "backend": "onnxruntime-cpu",
            "precision": "int8",
        },
        "window_s": 60,
        "minute": minute,
        "frames": 1784,
        "dropped": 3,
        "results": {"ok": 1702, "defect": 71, "uncertain": 11},
        "latency_ms": {"p50": 18.4, "p90": 23.9, "p95": 27.2, "p99": 41.7, "max": 63.0},
        "histogram_ms": {"le_10": 12, "le_20": 1104, "le_30": 601, "le_50": 61, "le_100": 6, "inf": 0},
        "queue_depth_max": 4,
        "actions": {"mqtt_publish": 82, "webhook": 71, "webhook_failed": 0},
        "cpu_pct": 61.5,
        "gpu_pct": None,
        "temperature_c": 58.5,
    }


def timed(n: int, op: Callable[[int], object]) -> float:
    """Mean seconds per call of op(i) over n calls."""
    start = time.perf_counter()
    for i in range(n):
        op(i)
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="records per run and operation")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved runs per operation")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    device_key = Ed25519PrivateKey.generate()
    device_public = device_key.public_key()
    body = metrics_body(1)
    record = encode(TelemetryRecord(kind="metric", ts=1_760_000_000.0, body=body))

    ops: dict[str, Callable[[int], object]] = {
        "JSON encode (protocol, pydantic)": lambda i: encode(
            TelemetryRecord(kind="metric", ts=float(i), body=body)
        ),
        "JSON encode (stdlib json.dumps)": lambda i: json.dumps(body).encode(),
    }
    # The device's signature inside every envelope, the same for both KEMs: what the KEMs add is the rest.
    signed = b"x" * (len(record) + 200)
    signature = device_key.sign(signed)
    ops["Ed25519 sign (inside seal)"] = lambda i: device_key.sign(signed)
    ops["Ed25519 verify (inside open)"] = lambda i: device_public.verify(signature, signed)
    sizes: dict[str, int] = {}
    for kem in KEMS:
        fleet = generate_telemetry_key(kem)
        public, kid = fleet.public_key(), fleet_key_id(fleet.public_key())

        def seal_one(i: int, public: Any = public, kid: str = kid) -> bytes:
            return seal(
                record, device_id=DEVICE, seq=i, device_key=device_key, fleet_public=public, fleet_key_id=kid
            )

        envelopes = [seal_one(i) for i in range(args.n)]
        keys = {kid: fleet}

        def open_one(i: int, envelopes: list[bytes] = envelopes, keys: Any = keys) -> object:
            return open_sealed(envelopes[i], fleet_keys=keys, device_keys=lambda _: device_public)

        assert open_one(0).record == record  # type: ignore[attr-defined]
        ops[f"seal {kem}"] = seal_one
        ops[f"open {kem}"] = open_one
        sizes[kem] = len(envelopes[0])

    runs: dict[str, list[float]] = {name: [] for name in ops}
    for op in ops.values():  # warm-up
        timed(min(args.n, 50), op)
    for _ in range(args.repeats):
        for name, op in ops.items():
            runs[name].append(timed(args.n, op))

    print(f"record: {len(record)} bytes; n={args.n} per run, {args.repeats} interleaved runs")
    print(
        f"python {platform.python_version()}, cryptography {cryptography_version}, "
        f"{backend.openssl_version_text()}, {platform.machine()}"
    )
    print()
    print("| operation | median us/record | fastest-slowest run | records/s (one core) |")
    print("|---|---:|---:|---:|")
    figures: dict[str, Any] = {"record_bytes": len(record), "n": args.n, "repeats": args.repeats, "ops": {}}
    for name, values in runs.items():
        med = statistics.median(values)
        figures["ops"][name] = {
            "median_us": med * 1e6,
            "min_us": min(values) * 1e6,
            "max_us": max(values) * 1e6,
        }
        print(
            f"| {name} | {med * 1e6:.1f} | {min(values) * 1e6:.1f}-{max(values) * 1e6:.1f} | {1 / med:,.0f} |"
        )
    print()
    print("| KEM | record bytes | envelope bytes | added by sealing |")
    print("|---|---:|---:|---:|")
    for kem, size in sizes.items():
        print(f"| {kem} | {len(record)} | {size} | {size - len(record)} |")
    figures["envelope_bytes"] = sizes
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
