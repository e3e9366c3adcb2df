"""End-to-end ingest benchmark: simulated devices -> real Mosquitto -> fleet worker processes -> SQLite.

    .venv/bin/python bench/telemetry/bench_ingest.py steady  [--devices 5000 --rate 1 --duration 30]
    .venv/bin/python bench/telemetry/bench_ingest.py ceiling [--rates 1,1.5,2,3]
    .venv/bin/python bench/telemetry/bench_ingest.py drain   [--drain-devices 500 --drain-records 600]
    common: --workers 1,2 --repeats 3 --open-processes N --json FILE

Each run starts from nothing: a new fleet data dir and SQLite file, the fleet's own managed
Mosquitto (plain mode), and `--workers` worker processes (bench/telemetry/ingest_worker.py: the
fleet's FleetService and FleetWorker) sharing the telemetry subscription. Devices are registered
with their keys pinned, as enrollment leaves them. The simulator (bench/telemetry/ingest_sim.py)
publishes pre-sealed records on a 10 ms schedule and takes the fleet's receipts. Figures:
- offered/s and stored/s over the sending window; the backlog (sent, not stored) when it ends;
- lag per record: its row's `received` time minus when its PUBLISH was written (send -> stored),
  and send -> receipt back at the device;
- nothing lost: every sent (device, seq) is stored exactly once and receipted;
- CPU seconds of the broker, the workers (with any child processes) and the simulator.
Repeats interleave the worker counts, so 1 and 2 workers are compared side by side.
"""

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from ingest_sim import Fleetless, Schedule, burst, device_id, public_pem, schedule, sealed_corpus
from sqlalchemy import insert

from edgefleet.procs import free_port
from fleet.broker import ManagedBroker
from fleet.broker_auth import FLEET_USER
from fleet.db import Device, open_database
from fleet.service import FleetService
from fleet.store import FleetDataDir

HERE = Path(__file__).resolve().parent
CONNECTIONS = 8  # simulator connections; each carries 1/8 of the devices
KEEPS_UP_BACKLOG_S = 1.0  # keeping up: at the end of the window, at most 1 s of offered records unstored
KEEPS_UP_P99_S = 2.0  # ... and 99% of records stored within 2 s of being sent
# INGEST_BENCH_PROFILE=1: cProfile each worker's event loop into logs/w<N>.prof
PROFILE = bool(os.environ.get("INGEST_BENCH_PROFILE"))


def cpu_s(process: psutil.Process, children: bool = False) -> float:
    try:
        t = process.cpu_times()
        total = t.user + t.system
        if children:
            for child in process.children(recursive=True):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system
                except psutil.NoSuchProcess:
                    pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def prepare_fleet(root: Path, fleet_key_pem: bytes, devices: int) -> FleetDataDir:
    """A fleet data dir with the cached telemetry key and `devices` devices whose keys are pinned."""
    data = FleetDataDir(root)
    data.make_dirs()
    data.telemetry_key_path.write_bytes(fleet_key_pem)
    data.telemetry_key_path.chmod(0o600)
    service = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883")
    with service.sessions.begin() as s:
        s.execute(
            insert(Device),
            [
                {"id": device_id(i), "mqtt_password_hash": "", "public_key": public_pem(i)}
                for i in range(devices)
            ],
        )
    service.write_broker_auth()
    service.sessions.kw["bind"].dispose()
    return data


class Workers:
    """The worker processes; their output goes to `logs`/w<N>.log (kept after the run)."""

    def __init__(
        self, data: FleetDataDir, port: int, count: int, open_processes: int | None, logs: Path
    ) -> None:
        extra = [] if open_processes is None else ["--open-processes", str(open_processes)]
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / f"w{i}.log" for i in range(count)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with log.open("w") as out:
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(HERE / "ingest_worker.py"),
                            str(data.root),
                            str(port),
                            f"w{i}",
                            *extra,
                            *(["--profile", str(log.with_suffix(".prof"))] if PROFILE else []),
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 60
        for proc, log in zip(self.procs, self.logs, strict=True):
            while "ready" not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"a worker did not start: {log.read_text()[-2000:]}")
                time.sleep(0.05)
        self.ps = [psutil.Process(p.pid) for p in self.procs]

    def cpu(self) -> float:
        return sum(cpu_s(p, children=True) for p in self.ps)

    def stop(self) -> list[str]:
        """Stop them; the last line each printed (its counts)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [
            next((ln for ln in log.read_text().splitlines() if ln.startswith("counts")), "")
            for log in self.logs
        ]


def stored_count(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as c:
        (n,) = c.execute("SELECT coalesce(max(id), 0) FROM telemetry").fetchone()
    return int(n)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_once(
    plan: Schedule,
    corpus_devices: int,
    fleet_key_pem: bytes,
    workers: int,
    open_processes: int | None,
    window: int,
    drain_timeout_s: float,
    logs: Path,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    data = prepare_fleet(root / "fleet", fleet_key_pem, corpus_devices)
    port = free_port()
    broker = ManagedBroker(data.broker, "127.0.0.1", port, data.password_file, data.acl_file)
    broker.start()
    pool: Workers | None = None
    sim = Fleetless(corpus_devices, CONNECTIONS)
    try:
        pool = Workers(data, port, workers, open_processes, logs)
        await sim.connect("127.0.0.1", port, FLEET_USER, data.secret("broker-fleet-password"))
        assert broker._process is not None
        broker_ps, me = psutil.Process(broker._process.pid), psutil.Process()
        load_before = os.getloadavg()[0]
        cpu0 = (cpu_s(broker_ps), pool.cpu(), cpu_s(me))
        t0 = time.time()
        await sim.play(plan, window=window, stored=lambda: stored_count(data.database))
        t_end = time.time()
        stored_at_end = await asyncio.to_thread(stored_count, data.database)
        # Drain: wait until everything is stored and receipted, or progress stops.
        last, last_change = stored_at_end, time.monotonic()
        while time.monotonic() - last_change < 20 and time.time() - t_end < drain_timeout_s:
            n = await asyncio.to_thread(stored_count, data.database)
            if n >= plan.total and len(sim.receipts.stored) >= plan.total:
                break
            if n != last:
                last, last_change = n, time.monotonic()
            await asyncio.sleep(0.1)
        t_drained = time.time()
        stalled = time.monotonic() - last_change >= 20  # no progress for 20 s: what is missing is lost
        cpu1 = (cpu_s(broker_ps), pool.cpu(), cpu_s(me))
        load_after = os.getloadavg()[0]
        pubacks = sim.pubacks()
    finally:
        await sim.close()
        outputs = pool.stop() if pool else []
        broker.stop()
    with sqlite3.connect(data.database) as c:
        rows = c.execute("SELECT device_id, seq, received FROM telemetry").fetchall()
    # Mosquitto drops QoS 1 messages for a client whose queue is full (max_queued_messages) and says so.
    broker_log = data.broker / "mosquitto.log"
    dropped_notes = broker_log.read_text(errors="replace").count("dropped") if broker_log.exists() else 0
    shutil.rmtree(root, ignore_errors=True)
    sent_keys = {(device_id(i), s) for (i, s) in plan.slot_of}
    stored_keys = {(d, s) for d, s, _ in rows}
    sent_time = {(device_id(i), s): sim.sent_at[slot] for (i, s), slot in plan.slot_of.items()}
    lags = [received - sent_time[(d, s)] for d, s, received in rows if (d, s) in sent_time]
    receipt_lags = [at - sent_time[k] for k, at in sim.receipts.at.items() if k in sent_time]
    window_s = t_end - t0
    cpu = {
        name: round(b - a, 2)
        for name, a, b in zip(("broker", "workers", "simulator"), cpu0, cpu1, strict=True)
    }
    return {
        "workers": workers,
        "open_processes": open_processes,
        "sent": plan.total,
        "broker_acked": pubacks,
        "window_s": round(window_s, 2),
        "offered_per_s": round(plan.total / window_s, 1),
        "stored_per_s_in_window": round(stored_at_end / window_s, 1),
        "backlog_at_end": plan.total - stored_at_end,
        "drain_s": round(t_drained - t_end, 2),
        "overall_per_s": round(len(rows) / (t_drained - t0), 1),
        "stored": len(rows),
        "unique": len(stored_keys),
        "lost": len(sent_keys - stored_keys),
        "drain_complete": not (sent_keys - stored_keys),
        "broker_drop_notices": dropped_notes,
        "stalled": stalled,
        "receipted": len(sim.receipts.stored),
        "refused": sim.receipts.refused,
        "lag_p50_s": round(pct(lags, 0.5), 3),
        "lag_p99_s": round(pct(lags, 0.99), 3),
        "lag_max_s": round(max(lags, default=float("nan")), 3),
        "receipt_lag_p50_s": round(pct(receipt_lags, 0.5), 3),
        "receipt_lag_p99_s": round(pct(receipt_lags, 0.99), 3),
        "cpu_s": cpu,
        "cpu_us_per_record": {k: round(v / max(1, len(rows)) * 1e6, 1) for k, v in cpu.items()},
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "worker_output": outputs,
    }


def keeps_up(result: dict[str, Any]) -> bool:
    return bool(
        result["lost"] == 0
        and result["backlog_at_end"] <= KEEPS_UP_BACKLOG_S * result["offered_per_s"]
        and result["lag_p99_s"] <= KEEPS_UP_P99_S
    )


def summary(results: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(results)}
    for key in keys:
        out[key] = statistics.median(r[key] for r in results)
    for part in ("broker", "workers", "simulator"):
        out[f"cpu_us_per_record_{part}"] = statistics.median(r["cpu_us_per_record"][part] for r in results)
    out["lost_total"] = sum(r["lost"] for r in results)
    out["duplicates_total"] = sum(r["stored"] - r["unique"] for r in results)
    out["load_avg_1m"] = [r["load_avg_1m"] for r in results]
    return out


def show(tag: str, r: dict[str, Any]) -> None:
    print(
        f"  {tag}: offered {r['offered_per_s']:.0f}/s stored {r['stored_per_s_in_window']:.0f}/s "
        f"backlog@end {r['backlog_at_end']} drain {r['drain_s']}s "
        f"lag p50/p99 {r['lag_p50_s']}/{r['lag_p99_s']}s receipt p99 {r['receipt_lag_p99_s']}s "
        f"not stored {r['lost']} (stalled: {r['stalled']}) dup {r['stored'] - r['unique']} "
        f"receipted {r['receipted']}/{r['sent']} cpu {r['cpu_s']} load {r['load_avg_1m']}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["steady", "ceiling", "drain"])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1.0, help="records/s per device (steady)")
    parser.add_argument("--rates", default="1,1.5,2,3", help="records/s per device to try (ceiling)")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--open-processes", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drain-devices", type=int, default=500)
    parser.add_argument("--drain-records", type=int, default=600)
    parser.add_argument(
        "--window",
        type=int,
        default=0,
        help="drain: at most this many records sent and not stored (0: none)",
    )
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgefleet-ingest-bench")
    parser.add_argument("--json", type=Path, default=None, help="append the results here")
    args = parser.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    key_path = args.cache / "fleet-telemetry-x25519.pem"
    if not key_path.exists():  # one fleet key for every run, so the sealed corpus can be reused
        FleetDataDir(args.cache / "keygen").telemetry_key()
        shutil.copy(args.cache / "keygen" / "secrets" / "telemetry-x25519.pem", key_path)
    fleet_key = FleetDataDir(args.cache / "keygen").telemetry_key()
    fleet_key_pem = key_path.read_bytes()
    worker_counts = [int(w) for w in args.workers.split(",")]

    plans: list[tuple[str, Schedule, int, int]] = []  # (label, schedule, devices, window)
    if args.mode == "drain":
        corpus = sealed_corpus(fleet_key, args.drain_devices, args.drain_records, args.cache)
        plans.append(
            (
                f"drain {args.drain_devices}x{args.drain_records}",
                burst(corpus, CONNECTIONS),
                len(corpus),
                args.window,
            )
        )
    else:
        rates = [args.rate] if args.mode == "steady" else [float(r) for r in args.rates.split(",")]
        per_device = int(max(rates) * args.duration) + 1
        corpus = sealed_corpus(fleet_key, args.devices, per_device, args.cache)
        for rate in rates:
            plans.append(
                (
                    f"{args.devices} devices x {rate}/s",
                    schedule(corpus, rate, args.duration, CONNECTIONS),
                    args.devices,
                    0,
                )
            )
    del corpus

    print(f"load average before: {os.getloadavg()}", flush=True)
    report: dict[str, Any] = {
        "mode": args.mode,
        "args": vars(args) | {"cache": str(args.cache), "json": str(args.json)},
        "plans": [],
    }
    for label, plan, devices, window in plans:
        print(f"{label}: {plan.total:,} records", flush=True)
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in worker_counts}
        for repeat in range(args.repeats):
            for w in worker_counts:
                r = asyncio.run(
                    run_once(
                        plan,
                        devices,
                        fleet_key_pem,
                        w,
                        args.open_processes,
                        window,
                        args.drain_timeout,
                        args.cache / "logs",
                    )
                )
                runs[w].append(r)
                show(f"{w} worker(s) run {repeat + 1}", r)
        keys = [
            "offered_per_s",
            "stored_per_s_in_window",
            "backlog_at_end",
            "drain_s",
            "overall_per_s",
            "lag_p50_s",
            "lag_p99_s",
            "receipt_lag_p50_s",
            "receipt_lag_p99_s",
        ]
        entry = {"label": label, "records": plan.total, "by_workers": {}}
        for w, results in runs.items():
            s = summary(results, keys)
            s["keeps_up"] = [keeps_up(r) for r in results]
            entry["by_workers"][w] = {"median": s, "runs": results}
            print(f"  median, {w} worker(s): " + json.dumps(s), flush=True)
        report["plans"].append(entry)
    if args.json:
        existing = json.loads(args.json.read_text()) if args.json.exists() else []
        existing.append(report | {"when": time.strftime("%Y-%m-%d %H:%M:%S")})
        args.json.write_text(json.dumps(existing, indent=1))


if __name__ == "__main__":
    main()
