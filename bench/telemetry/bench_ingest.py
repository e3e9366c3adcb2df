"""End-to-end ingest benchmark: simulated devices -> real Mosquitto -> fleet worker processes -> SQLite.

    .venv/bin/python bench/telemetry/bench_ingest.py steady  [--devices 5000 --rate 1 --duration 30]
    .venv/bin/python bench/telemetry/bench_ingest.py ceiling [--rates 0.4,0.6,0.8,1]
    .venv/bin/python bench/telemetry/bench_ingest.py drain   [--drain-devices 500 --drain-records 600]
    common: --workers 1,2 --repeats 3 --open-processes N --json FILE --logs DIR

Each run starts from nothing: a new fleet data dir and SQLite file, the fleet's own managed
Mosquitto (plain mode), and `--workers` worker processes (bench/telemetry/ingest_worker.py: the
fleet's FleetService and FleetWorker) sharing the telemetry subscription. Devices are registered
with their keys pinned, as enrollment leaves them. The simulator (bench/telemetry/ingest_sim.py)
publishes pre-sealed records on a 10 ms schedule and takes the fleet's receipts. Figures:
- offered/s and stored/s over the sending window; the backlog (sent, not stored) when it ends;
- lag per record: its row's `received` time minus when its PUBLISH was written (send -> stored),
  and send -> receipt back at the device;
- nothing lost: every sent (device, seq) is stored exactly once and receipted;
- CPU seconds of the broker, the workers (with any child processes) and the simulator, and of
  everything else on the machine over the same time ("others": a disturbed run shows there);
- the peak RSS of the broker and of each worker (a worker acknowledges what it has only queued);
- once sending stops, the rate at which the backlog is stored (`drain_per_s`: the ceiling when
  the workers never wait for input).
Repeats interleave the worker counts, so 1 and 2 workers are compared side by side. Worker logs
(and with INGEST_BENCH_PROFILE=1 a py-spy profile of every worker thread, summarised per part of
the ingest path) go to --logs, bench/telemetry/logs/ by default.
"""

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from ingest_sim import Fleetless, Schedule, burst, device_id, public_pem, schedule, sealed_corpus
from sqlalchemy import Table, insert
from sqlalchemy.dialects import sqlite as sqlite_dialect

from edgefleet.procs import free_port
from fleet.broker import ManagedBroker
from fleet.broker_auth import FLEET_USER
from fleet.db import Device, TelemetryRecordRow, open_database
from fleet.ingest import Arrival, EnvelopeOpener
from fleet.service import FleetService
from fleet.store import FleetDataDir

HERE = Path(__file__).resolve().parent
CONNECTIONS = 8  # simulator connections; each carries 1/8 of the devices
KEEPS_UP_BACKLOG_S = 1.0  # keeping up: at the end of the window, at most 1 s of offered records unstored
KEEPS_UP_P99_S = 2.0  # ... and 99% of records stored within 2 s of being sent
# INGEST_BENCH_PROFILE=1: sample every thread of each worker (and its children) with py-spy
PROFILE = bool(os.environ.get("INGEST_BENCH_PROFILE"))
PY_SPY = Path(sys.executable).with_name("py-spy")
# The fleet code a run measured: its hashes go into the results, since it changes between runs.
MEASURED = ("fleet/ingest.py", "fleet/mqtt_worker.py", "fleet/mqtt_link.py", "protocol/sealed.py")
# Where a worker's CPU goes, by the first of these functions found on a sampled stack.
PARTS = (
    ("open envelopes (HPKE + Ed25519)", ("open_sealed", "open_one", "_pool_open", "EnvelopeOpener.open")),
    ("store (SQLAlchemy + SQLite)", ("TelemetryIngest._store",)),
    ("device keys", ("TelemetryIngest._load_keys",)),
    ("other ingest (outcomes, rows)", ("TelemetryIngest.ingest",)),
    ("receipts (encode + publish)", ("_send_receipts", "_send_receipt", "_receipt_all")),
    ("MQTT receive, telemetry link", ("MqttLink._read_loop",)),
    ("telemetry handler (queue)", ("FleetWorker._on_telemetry", "FleetWorker._handle")),
    ("MQTT acks, telemetry link", ("FleetWorker._ack_telemetry", "MqttLink.ack")),
    (
        "MQTT receive (paho + aiomqtt)",
        ("loop_read", "_packet_read", "MessagesIterator.__anext__", "_on_message", "FleetWorker._session"),
    ),
    ("MQTT send (paho)", ("loop_write", "_packet_write", "loop_misc")),
    ("event loop select", ("select",)),
    ("asyncio and thread hand-offs", ("_run_once", "_write_to_self", "_read_from_self", "_worker")),
)


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


def peak_rss_mib(process: psutil.Process, children: bool = False) -> float:
    """VmHWM (peak resident set) of the process, and of its children summed, in MiB (Linux)."""
    procs = [process]
    if children:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += process.children(recursive=True)
    total = 0
    for p in procs:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) if match else 0
    return round(total / 1024, 1)


def busy_cpu_s() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def wait_for_quiet(below_cores: float, max_wait_s: float) -> float:
    """Wait (at most `max_wait_s`) until the machine's other jobs use under `below_cores` over 3 s;
    return what they used last."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = busy_cpu_s()
        time.sleep(3)
        cores = (busy_cpu_s() - b0) / 3
        if cores < below_cores or time.monotonic() > deadline:
            return round(cores, 2)
        print(f"  waiting for quiet: other jobs use {cores:.2f} cores", flush=True)


def code_hashes() -> dict[str, str]:
    root = HERE.parent.parent
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest()[:12] for name in MEASURED}


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

    def peak_rss_mib(self) -> list[float]:
        return [peak_rss_mib(p, children=True) for p in self.ps]

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


class Profiler:
    """py-spy sampling each worker process (and its children), every thread, 100 times a second,
    from when the devices start sending until the backlog is stored; `stop` summarises it."""

    def __init__(self, pids: list[int], logs: Path) -> None:
        if not PY_SPY.exists():
            raise RuntimeError(
                f"INGEST_BENCH_PROFILE needs py-spy next to {sys.executable}: pip install py-spy"
            )
        self.outputs = [logs / f"w{i}.pyspy.txt" for i in range(len(pids))]
        self.procs = [
            subprocess.Popen(
                [
                    str(PY_SPY),
                    "record",
                    "--pid",
                    str(pid),
                    "--subprocesses",
                    "--nonblocking",
                    "--nolineno",
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, out in zip(pids, self.outputs, strict=True)
        ]

    def cpu(self) -> float:
        """py-spy's own CPU seconds so far (not the workers', not the others')."""
        return sum(cpu_s(psutil.Process(p.pid)) for p in self.procs if p.poll() is None)

    def stop(self) -> list[dict[str, Any]]:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return [summarise_profile(out) for out in self.outputs if out.exists()]


def summarise_profile(path: Path) -> dict[str, Any]:
    """Shares of the sampled (running) stacks: per part of the ingest path, per thread, top functions."""
    parts: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] for f in stack.split(";")]
        threads["ingest thread" if any(f == "_worker" for f in frames) else frames[0]] += n
        leaves[frames[-1]] += n
        names = set(frames)
        part = next(
            (label for label, fns in PARTS if any(f.endswith(fn) for f in names for fn in fns)), "other"
        )
        parts[part] += n

    def share(c: collections.Counter[str]) -> dict[str, float]:
        return {k: round(v / max(1, total), 3) for k, v in c.most_common(12)}

    return {"samples": total, "parts": share(parts), "threads": share(threads), "top": share(leaves)}


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
    profiler: Profiler | None = None
    profile: list[dict[str, Any]] = []
    sim = Fleetless(corpus_devices, CONNECTIONS)
    try:
        pool = Workers(data, port, workers, open_processes, logs)
        await sim.connect("127.0.0.1", port, FLEET_USER, data.secret("broker-fleet-password"))
        assert broker._process is not None
        broker_ps, me = psutil.Process(broker._process.pid), psutil.Process()
        load_before = os.getloadavg()[0]
        if PROFILE:
            profiler = Profiler([p.pid for p in pool.procs], logs)
        cpu0 = (cpu_s(broker_ps), pool.cpu(), cpu_s(me))
        busy0 = busy_cpu_s()
        t0 = time.time()
        await sim.play(plan, window=window, stored=lambda: stored_count(data.database))
        t_end = time.time()
        stored_at_end = await asyncio.to_thread(stored_count, data.database)
        # Drain: wait until everything is stored and receipted, or progress stops.
        last, last_change = stored_at_end, time.monotonic()
        t_stored = t_end if stored_at_end >= plan.total else None  # when the last row was stored
        while time.monotonic() - last_change < 20 and time.time() - t_end < drain_timeout_s:
            n = await asyncio.to_thread(stored_count, data.database)
            if n >= plan.total and t_stored is None:
                t_stored = time.time()
            if n >= plan.total and len(sim.receipts.stored) >= plan.total:
                break
            if n != last:
                last, last_change = n, time.monotonic()
            await asyncio.sleep(0.1)
        t_drained = time.time()
        stalled = time.monotonic() - last_change >= 20  # no progress for 20 s: what is missing is lost
        cpu1 = (cpu_s(broker_ps), pool.cpu(), cpu_s(me))
        busy1 = busy_cpu_s()
        profiler_cpu = profiler.cpu() if profiler is not None else 0.0
        load_after = os.getloadavg()[0]
        pubacks = sim.pubacks()
        rss = {"broker": peak_rss_mib(broker_ps), "workers": pool.peak_rss_mib()}
    finally:
        if profiler is not None:
            profile = profiler.stop()
        await sim.close()
        outputs = pool.stop() if pool else []
        broker.stop()
    with sqlite3.connect(data.database) as c:
        rows = c.execute("SELECT device_id, seq, received FROM telemetry").fetchall()
    # Mosquitto drops QoS 1 messages for a client whose queue is full (max_queued_messages) and says so.
    broker_log = data.broker / "mosquitto.log"
    log_lines = broker_log.read_text(errors="replace").splitlines() if broker_log.exists() else []
    dropped_notes = [line for line in log_lines if "dropped" in line]
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
    if profiler is not None:
        cpu["profiler"] = round(profiler_cpu, 2)
    # Everything else that ran meanwhile: other jobs on the shared cores.
    cpu["others"] = round(busy1 - busy0 - sum(cpu.values()), 2)
    drain_s = t_drained - t_end
    return {
        "workers": workers,
        "open_processes": open_processes,
        "sent": plan.total,
        "broker_acked": pubacks,
        "window_s": round(window_s, 2),
        "offered_per_s": round(plan.total / window_s, 1),
        "stored_per_s_in_window": round(stored_at_end / window_s, 1),
        "backlog_at_end": plan.total - stored_at_end,
        "drain_s": round(drain_s, 2),  # until every record is stored and receipted
        "store_drain_s": round(t_stored - t_end, 2) if t_stored is not None else None,
        # The rate at which a backlog of 1,000 or more is stored once no new input comes.
        "drain_per_s": round((len(rows) - stored_at_end) / (t_stored - t_end), 1)
        if t_stored is not None and plan.total - stored_at_end >= 1000
        else None,
        "overall_per_s": round(len(rows) / (t_drained - t0), 1),
        "stored": len(rows),
        "unique": len(stored_keys),
        "lost": len(sent_keys - stored_keys),
        "drain_complete": not (sent_keys - stored_keys),
        "broker_drop_notices": len(dropped_notes),
        "broker_drop_lines": dropped_notes[:4],
        # What the workers were handed: sent minus this never left the broker (dropped there).
        "delivered_to_workers": sum(
            int(m.group(1)) for out in outputs if (m := re.search(r"'telemetry': (\d+)", out))
        ),
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
        "cpu_cores_busy": round((busy1 - busy0) / (t_drained - t0), 2),
        "others_cores": round(cpu["others"] / (t_drained - t0), 2),
        "peak_rss_mib": rss,
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "worker_output": outputs,
        "profile": profile,
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
    out["others_cores"] = [r["others_cores"] for r in results]
    for part in ("broker", "workers", "simulator", "others"):
        out[f"cpu_us_per_record_{part}"] = statistics.median(r["cpu_us_per_record"][part] for r in results)
    drains = [r["drain_per_s"] for r in results if r["drain_per_s"] is not None]
    out["drain_per_s"] = statistics.median(drains) if drains else None
    out["worker_peak_rss_mib"] = statistics.median(max(r["peak_rss_mib"]["workers"]) for r in results)
    out["lost_total"] = sum(r["lost"] for r in results)
    out["duplicates_total"] = sum(r["stored"] - r["unique"] for r in results)
    out["load_avg_1m"] = [r["load_avg_1m"] for r in results]
    return out


def show(tag: str, r: dict[str, Any]) -> None:
    print(
        f"  {tag}: offered {r['offered_per_s']:.0f}/s stored {r['stored_per_s_in_window']:.0f}/s "
        f"backlog@end {r['backlog_at_end']} drain {r['drain_s']}s "
        f"lag p50/p99 {r['lag_p50_s']}/{r['lag_p99_s']}s receipt p99 {r['receipt_lag_p99_s']}s "
        f"not stored {r['lost']} (stalled: {r['stalled']}; broker drops {r['broker_drop_notices']}, "
        f"delivered {r['delivered_to_workers']}) dup {r['stored'] - r['unique']} "
        f"receipted {r['receipted']}/{r['sent']} cpu {r['cpu_s']} rss {r['peak_rss_mib']} "
        f"drain {r['drain_per_s']}/s load {r['load_avg_1m']}",
        flush=True,
    )


# -- parts: CPU per record of each stage, measured alone -------------------------------------------
def _thread_us_per_record(run: Callable[[list[Any]], object], items: list[Any], batch: int) -> float:
    """CPU of this thread (SQLite's C code included) per item, fed `batch` items at a time."""
    started = time.thread_time()
    for start in range(0, len(items), batch):
        run(items[start : start + batch])
    return (time.thread_time() - started) / len(items) * 1e6


def ingest_parts(corpus: list[list[bytes]], fleet_key_pem: bytes, batch: int) -> dict[str, float]:
    """Open, store (as fleet/ingest.py does, and through SQLAlchemy Core), and the whole
    `TelemetryIngest.ingest`, each on a fresh database, in this process."""
    devices = len(corpus)
    arrivals = [
        Arrival(device_id(i), records[k]) for k in range(len(corpus[0])) for i, records in enumerate(corpus)
    ]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ingest-parts-") as tmp:
        services = []
        for name in ("open+store", "core", "ingest"):
            data = prepare_fleet(Path(tmp) / name, fleet_key_pem, devices)
            services.append(FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883"))
        ingest = services[0].telemetry_ingest
        ingest._load_keys({a.device_id for a in arrivals})  # loaded once per worker in the real run too
        opener = EnvelopeOpener(ingest.fleet_keys)
        items = [(a.envelope, a.device_id, ingest.keys[a.device_id]) for a in arrivals]
        opened: list[Any] = []
        out["open (HPKE + Ed25519 + decode)"] = _thread_us_per_record(
            lambda chunk: opened.extend(opener.open(chunk)), items, batch
        )
        now = time.time()
        rows = [
            {"device_id": a.device_id, "seq": o[1], "kind": o[2], "ts": o[3], "received": now, "body": o[4]}
            for a, o in zip(arrivals, opened, strict=True)
        ]
        out["store, as fleet/ingest.py (ORM insert ... RETURNING)"] = _thread_us_per_record(
            ingest._store, rows, batch
        )
        table: Table = TelemetryRecordRow.__table__  # type: ignore[assignment]
        core = (
            sqlite_dialect.insert(table)
            .on_conflict_do_nothing(index_elements=["device_id", "seq"])
            .returning(table.c.device_id, table.c.seq)
        )
        engine = services[1].sessions.kw["bind"]

        def store_core(chunk: list[dict[str, Any]]) -> set[tuple[str, int]]:
            with engine.begin() as conn:
                return {(d, q) for d, q in conn.execute(core, chunk)}

        out["store, SQLAlchemy Core (same statement on the Table)"] = _thread_us_per_record(
            store_core, rows, batch
        )
        whole = services[2].telemetry_ingest
        out["TelemetryIngest.ingest (all of the above, as run)"] = _thread_us_per_record(
            whole.ingest, arrivals, batch
        )
        for service in services:
            service.sessions.kw["bind"].dispose()
    return {k: round(v, 1) for k, v in out.items()}


async def receive_part(
    plan: Schedule, devices: int, fleet_key_pem: bytes, protocol: str, logs: Path
) -> dict[str, Any]:
    """The receive path alone: one sink worker (`ingest_worker.py --sink`) takes a burst of
    `plan.total` messages; its CPU and the broker's per message."""
    root = Path(tempfile.mkdtemp(prefix="ingest-recv-"))
    data = prepare_fleet(root / "fleet", fleet_key_pem, devices)
    port = free_port()
    broker = ManagedBroker(data.broker, "127.0.0.1", port, data.password_file, data.acl_file)
    broker.start()
    sim = Fleetless(devices, CONNECTIONS)
    log, progress = logs / f"sink-{protocol}.log", root / "progress"
    logs.mkdir(parents=True, exist_ok=True)

    def received() -> int:
        try:
            return int(progress.read_text() or 0)
        except (OSError, ValueError):
            return 0

    with log.open("w") as out:
        sink = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "ingest_worker.py"),
                str(data.root),
                str(port),
                "sink",
                "--sink",
                protocol,
                "--expect",
                str(plan.total),
                "--progress",
                str(progress),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "ready" not in log.read_text():
            if sink.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sink did not start: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        await sim.connect("127.0.0.1", port, FLEET_USER, data.secret("broker-fleet-password"))
        assert broker._process is not None
        sink_ps, broker_ps = psutil.Process(sink.pid), psutil.Process(broker._process.pid)
        cpu0, broker0, t0 = cpu_s(sink_ps), cpu_s(broker_ps), time.time()
        # A burst slot is one record of every device (5,000): at most 2,000 + 5,000 unread at the
        # broker, under its max_queued_messages (10,000) per client.
        await sim.play(plan, window=2000, stored=received)
        deadline = time.monotonic() + 180
        while "received" not in log.read_text():
            if sink.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the sink did not get every message: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.02)
        wall = time.time() - t0
        cpu, broker_cpu = cpu_s(sink_ps) - cpu0, cpu_s(broker_ps) - broker0
    finally:
        await sim.close()
        sink.terminate()
        sink.wait(timeout=20)
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    return {
        "protocol": protocol,
        "messages": plan.total,
        "per_s": round(plan.total / wall, 1),
        "sink_us_per_message": round(cpu / plan.total * 1e6, 1),
        "broker_us_per_message": round(broker_cpu / plan.total * 1e6, 1),
    }


def run_parts(
    corpus: list[list[bytes]], fleet_key_pem: bytes, repeats: int, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    plan = burst(corpus, CONNECTIONS)
    ingest_runs, receive_runs = [], []
    for repeat in range(repeats):
        quiet = wait_for_quiet(args.quiet_below, args.quiet_wait)
        r = ingest_parts(corpus, fleet_key_pem, batch)
        print(f"  run {repeat + 1} (others {quiet} cores before): in-process us/record {r}", flush=True)
        ingest_runs.append(r)
        for protocol in ("link", "v5", "v311"):
            quiet = wait_for_quiet(args.quiet_below, args.quiet_wait)
            rr = asyncio.run(receive_part(plan, len(corpus), fleet_key_pem, protocol, args.logs))
            rr["others_cores_before"] = quiet
            print(f"  run {repeat + 1}: receive {rr}", flush=True)
            receive_runs.append(rr)
    median = {k: statistics.median(r[k] for r in ingest_runs) for k in ingest_runs[0]}
    for protocol in ("link", "v5", "v311"):
        mine = [r for r in receive_runs if r["protocol"] == protocol]
        for key in ("sink_us_per_message", "broker_us_per_message", "per_s"):
            median[f"receive {protocol}: {key}"] = statistics.median(r[key] for r in mine)
    print("  medians: " + json.dumps(median, indent=1), flush=True)
    return {
        "label": f"parts, {plan.total:,} records, batch {batch}",
        "median": median,
        "in_process": ingest_runs,
        "receive": receive_runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["steady", "ceiling", "drain", "parts"])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=1.0, help="records/s per device (steady)")
    parser.add_argument(
        "--rates", default="0.4,0.6,0.8,1", help="records/s per device to try, each --devices (ceiling)"
    )
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
    parser.add_argument("--parts-records", type=int, default=10, help="parts: records per device")
    parser.add_argument("--parts-batch", type=int, default=2000, help="parts: records per ingest batch")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgefleet-ingest-bench")
    parser.add_argument("--json", type=Path, default=None, help="append the results here")
    parser.add_argument("--logs", type=Path, default=HERE / "logs", help="worker logs and profiles")
    parser.add_argument(
        "--quiet-below", type=float, default=0.3, help="start a run once other jobs use fewer cores"
    )
    parser.add_argument("--quiet-wait", type=float, default=180.0, help="... waiting at most this long")
    parser.add_argument(
        "--disturbed-above",
        type=float,
        default=0.25,
        help="a run during which other jobs used more cores is run again (once), kept aside",
    )
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
    if args.mode == "parts":
        corpus = sealed_corpus(fleet_key, args.devices, args.parts_records, args.cache)
        parts = run_parts(corpus, fleet_key_pem, args.repeats, args.parts_batch, args)
        if args.json:
            earlier = json.loads(args.json.read_text()) if args.json.exists() else []
            meta = {"mode": "parts", "code": code_hashes(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
            args.json.write_text(json.dumps([*earlier, meta | parts], indent=1))
        return
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

    report: dict[str, Any] = {
        "mode": args.mode,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "code": code_hashes(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "plans": [],
    }
    existing = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    for label, plan, devices, window in plans:
        print(f"{label}: {plan.total:,} records", flush=True)
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in worker_counts}
        disturbed: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            for w in worker_counts:
                for attempt in (1, 2):
                    quiet = wait_for_quiet(args.quiet_below, args.quiet_wait)
                    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                    print(
                        f"  before {w} worker(s) run {repeat + 1}: {uptime}; others {quiet} cores", flush=True
                    )
                    r = asyncio.run(
                        run_once(
                            plan,
                            devices,
                            fleet_key_pem,
                            w,
                            args.open_processes,
                            window,
                            args.drain_timeout,
                            args.logs,
                        )
                    )
                    r |= {"repeat": repeat + 1, "uptime_before": uptime, "others_cores_before": quiet}
                    show(f"{w} worker(s) run {repeat + 1}", r)
                    if r["others_cores"] <= args.disturbed_above or attempt == 2:
                        break
                    print(f"  disturbed (others used {r['others_cores']} cores): once more", flush=True)
                    disturbed.append(r)
                runs[w].append(r)
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
            "cpu_cores_busy",
        ]
        by_workers: dict[int, Any] = {}
        entry: dict[str, Any] = {
            "label": label,
            "records": plan.total,
            "by_workers": by_workers,
            "disturbed_runs": disturbed,
        }
        for w, results in runs.items():
            s = summary(results, keys)
            s["keeps_up"] = [keeps_up(r) for r in results]
            by_workers[w] = {"median": s, "runs": results}
            print(f"  median, {w} worker(s): " + json.dumps(s), flush=True)
        report["plans"].append(entry)
        if args.json:  # after every plan, so a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([*existing, report], indent=1))


if __name__ == "__main__":
    main()
