"""Roll surface-defect v1 -> v2 out to 10, 100 and 1,000 simulated devices through a real fleet server.

    nice -n 10 .venv/bin/python bench/updates/bench_rollout.py --sizes 10 100 1000 --repeats 3 3 2

Each run: a fresh fleet server (`edgefleet.demo.FleetProcess`, with its managed Mosquitto, 64 KiB chunks),
v1 and v2 registered, N devices enrolled through `POST /api/devices`, N simulated devices (simdevice.py,
one real MQTT client and one real TUF client each, in 1 process per 500 devices) connected and reporting
health, then `POST /api/rollouts` with one phase of 100% (or the default canary/10%/all phases). It
measures from just before that POST to the fleet's own `finished` time of the campaign (the moment the
last `committed` status was recorded), the bytes each device pulled, and the CPU and memory of the fleet
server, its Mosquitto (RSS sampled every 100 ms with psutil) and the simulator processes.

Modes: `delta` (devices report v1 in health, so the fleet offers the package delta) and `full` (devices
report no version, so the fleet offers the whole package). Results: results.json and RESULTS.md here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import psutil

from edgefleet.demo import SAMPLE_MODEL, FleetProcess, package_archives
from edgefleet.procs import Child, wait_for
from fleet.broker_auth import FLEET_USER
from fleet.client import FleetClient
from models.package_delta import manifest_sha256

HERE = Path(__file__).resolve().parent
SIMDEVICE = HERE / "simdevice.py"
MODEL = "surface-defect"
DEVICES_PER_PROCESS = 500
ONE_PHASE = [{"name": "all", "percent": 100}]
SAMPLE_EVERY_S = 0.1
MIB = 1024 * 1024
IDLE_WINDOW_S = 10.0
BYTE_FIGURES = ("payload_bytes", "frame_bytes", "metadata_bytes", "metadata_files", "offer_bytes", "chunks")
ROOT = HERE.parent.parent
# The fleet code a run measured: its hash goes into each run, so report.py keeps runs of different
# fleets apart (the rows before issue #5's worker changes have none).
MEASURED = (
    "fleet/mqtt_worker.py",
    "fleet/service.py",
    "fleet/campaigns.py",
    "fleet/rollouts.py",
    "fleet/deltas.py",
    "fleet/ingest.py",
)


def fleet_code() -> str:
    digest = hashlib.sha256()
    for name in MEASURED:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()[:12]


class BenchFailed(RuntimeError):
    pass


class WhatIfFleet(FleetProcess):
    """`fleet serve` with whatif_fleet.py's changes: an experiment, to size the fix for the lead."""

    def start(self, timeout: float = 30) -> FleetClient:
        log = self.root.parent / "logs" / "fleet.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        child = Child.__new__(Child)
        child.name, child.log_path = "fleet", log
        with log.open("wb") as out:
            child.process = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "whatif_fleet.py"),
                    *("--data-dir", str(self.root), "--http-port", str(self.http_port)),
                    *("--broker-port", str(self.broker_port), "--chunk-size", str(64 * 1024)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.child = child
        wait_for("the fleet API", self._healthy, timeout)
        token = (self.root / "secrets" / "operator-token").read_text().strip()
        self.client = FleetClient(self.url, token)
        return self.client


@dataclass
class Peak:
    """RSS peaks of the watched processes, sampled on a thread every SAMPLE_EVERY_S."""

    rss: dict[str, int] = field(default_factory=dict)
    window_rss: dict[str, int] = field(default_factory=dict)  # only while `in_window`
    samples: int = 0


class Sampler(threading.Thread):
    """RSS peaks per group of processes; the broker is looked up again whenever it is gone, because
    the fleet restarts a Mosquitto that died (its pids are kept in `broker_pids`)."""

    def __init__(self, fleet: psutil.Process) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.fleet = fleet
        self.broker = mosquitto_of(fleet)
        self.broker_pids = [self.broker.pid]
        self.processes: dict[str, list[psutil.Process]] = {"fleet": [fleet]}
        self.peak = Peak()
        self.in_window = False
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def watch(self, name: str, process: psutil.Process) -> None:
        with self._lock:
            self.processes.setdefault(name, []).append(process)

    def current_broker(self) -> psutil.Process:
        if not self.broker.is_running():
            with contextlib.suppress(BenchFailed, psutil.Error):
                self.broker = mosquitto_of(self.fleet)
                if self.broker.pid not in self.broker_pids:
                    self.broker_pids.append(self.broker.pid)
        return self.broker

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_EVERY_S):
            with self._lock:
                groups = {name: list(procs) for name, procs in self.processes.items()}
            groups["mosquitto"] = [self.current_broker()]
            for name, procs in groups.items():
                rss = 0
                for proc in procs:
                    try:
                        rss += proc.memory_info().rss
                    except psutil.Error:
                        continue
                self.peak.rss[name] = max(self.peak.rss.get(name, 0), rss)
                if self.in_window:
                    self.peak.window_rss[name] = max(self.peak.window_rss.get(name, 0), rss)
            self.peak.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def mosquitto_of(fleet: psutil.Process) -> psutil.Process:
    for child in fleet.children(recursive=True):
        if child.name() == "mosquitto":
            return child
    raise BenchFailed("the fleet server has no mosquitto child; is it running an external broker?")


@dataclass
class RunSpec:
    devices: int
    mode: str  # delta | full
    phases: str  # one | default
    repeat: int
    health_interval_s: float
    whatif: bool = False  # the fleet with whatif_fleet.py's changes


class SimProcesses:
    """The simulator children: start them, wait for READY, stop them and read their reports."""

    def __init__(self, spec: RunSpec, identities: list[dict[str, str]], workdir: Path, base_sha: str) -> None:
        self.children: list[tuple[subprocess.Popen[bytes], Path]] = []
        groups = [
            identities[i : i + DEVICES_PER_PROCESS] for i in range(0, len(identities), DEVICES_PER_PROCESS)
        ]
        for index, group in enumerate(groups):
            ids_file = workdir / f"sim-{index}-ids.json"
            ids_file.write_text(json.dumps(group))
            out = workdir / f"sim-{index}-results.json"
            args = [
                sys.executable,
                str(SIMDEVICE),
                "--identities",
                str(ids_file),
                "--home",
                str(workdir / "sim"),
                "--out",
                str(out),
                "--installed-version",
                "1",
                "--installed-manifest-sha256",
                base_sha,
                "--health-interval-s",
                str(spec.health_interval_s),
            ]
            if spec.mode == "full":
                args.append("--no-report-version")
            log = (workdir / f"sim-{index}.log").open("wb")
            process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
            self.children.append((process, out))

    @property
    def processes(self) -> list[psutil.Process]:
        return [psutil.Process(p.pid) for p, _ in self.children]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process, _ in self.children:
            assert process.stdout is not None
            line = b""
            while not line.startswith(b"READY"):
                if time.monotonic() > deadline:
                    raise BenchFailed("the simulated devices did not connect in time; see sim-*.log")
                line = process.stdout.readline()
                if not line and process.poll() is not None:
                    raise BenchFailed(f"a simulator exited with {process.returncode}; see sim-*.log")

    def stop(self) -> list[dict[str, Any]]:
        reports = []
        for process, _ in self.children:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, out in self.children:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if out.exists():
                reports.append(json.loads(out.read_text()))
        return reports


def enroll(client: FleetClient, count: int) -> list[dict[str, str]]:
    identities = []
    for i in range(count):
        enrollment = client.add_device(f"sim-{i:05d}")
        if "mqtt_password" not in enrollment:
            raise BenchFailed(
                "the fleet gave no broker password: the simulator needs a plain-mode (mqtt://) fleet"
            )
        identities.append(
            {
                "device_id": enrollment["device_id"],
                "broker_url": enrollment["fleet_url"],
                "password": enrollment["mqtt_password"],
                "tuf_root": enrollment["tuf_root"],
            }
        )
    return identities


def _all_reporting(client: FleetClient, count: int, with_version: bool) -> bool:
    devices = client.devices()
    ready = [
        d for d in devices if d["online"] and d["health"] and (not with_version or d["health"].get("models"))
    ]
    return len(ready) >= count


def _py_spy(pid: int, out: Path, gil: bool = False) -> subprocess.Popen[bytes]:
    """Sample the fleet server's stacks (collapsed format) until interrupted; needs py-spy installed.

    `gil`: only the thread holding the GIL, so the samples say where the process's CPU goes (without
    it, a thread waiting for the GIL is sampled as if it ran)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--output", str(out)]
    args += ["--gil"] if gil else []
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Watched:
    sampler: Sampler
    sims: list[psutil.Process]

    def cpu(self) -> dict[str, float]:
        return {
            "fleet": cpu_seconds([self.sampler.fleet]),
            "mosquitto": cpu_seconds([self.sampler.current_broker()]),
            "sim": cpu_seconds(self.sims),
        }


def broker_round_trip_ms(fleet: FleetProcess, count: int = 50) -> float:
    """Median time for a QoS 1 message to come back through the broker to its sender: the machine's
    latency floor at this load and niceness (a chunk costs two such hops plus the fleet's work)."""
    password = (fleet.root / "secrets" / "broker-fleet-password").read_text().strip()
    topic = "edgefleet/v1/bench-probe/rtt"

    async def probe() -> list[float]:
        times = []
        async with aiomqtt.Client(
            "127.0.0.1",
            fleet.broker_port,
            identifier="edgefleet-bench-probe",
            username=FLEET_USER,
            password=password,
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(topic, qos=1)
            messages = aiter(client.messages)
            for i in range(count):
                started = time.perf_counter()
                await client.publish(topic, str(i).encode(), qos=1)
                while bytes((await anext(messages)).payload) != str(i).encode():
                    pass
                times.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.02)
        return times

    return statistics.median(asyncio.run(probe()))


def _diff(after: dict[str, float], before: dict[str, float], per: float = 1.0) -> dict[str, float]:
    return {name: (after[name] - before[name]) / per for name in after}


def run_once(
    spec: RunSpec,
    archives: dict[int, Path],
    base_sha: str,
    scratch: Path,
    profile: Path | None = None,
    profile_gil: bool = False,
) -> dict[str, Any]:
    """One rollout on a fresh fleet; the figures, or `ok: false` with the devices' outcomes."""
    whatif = "-whatif" if spec.whatif else ""
    workdir = (
        scratch
        / f"n{spec.devices}-{spec.mode}-{spec.phases}-h{spec.health_interval_s:g}{whatif}-{spec.repeat}"
    )
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    fleet = (WhatIfFleet if spec.whatif else FleetProcess)(workdir / "fleet", broker_tls=False)
    sampler: Sampler | None = None
    sims: SimProcesses | None = None
    run: dict[str, Any] = {
        **asdict(spec),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "fleet_code": fleet_code(),
        "nice": os.nice(0),
    }
    try:
        fleet.start(timeout=60)
        token = (fleet.root / "secrets" / "operator-token").read_text().strip()
        # The rollout's POST offers every device of its first phase before it answers: minutes at 1,000.
        client = FleetClient(fleet.url, token, timeout=600)
        assert fleet.child is not None
        sampler = Sampler(psutil.Process(fleet.child.process.pid))
        watched = Watched(sampler, [])
        sampler.start()
        for version in sorted(archives):
            client.push_model(archives[version])
        started = time.monotonic()
        identities = enroll(client, spec.devices)
        run["enroll_s"] = time.monotonic() - started
        started = time.monotonic()
        sims = SimProcesses(spec, identities, workdir, base_sha)
        watched.sims = sims.processes
        for proc in watched.sims:
            sampler.watch("sim", proc)
        sims.wait_ready(timeout=300)
        wait_for(
            "every device online with health at the fleet",
            lambda: _all_reporting(client, spec.devices, spec.mode == "delta"),
            120,
            interval=1.0,
        )
        run["connect_s"] = time.monotonic() - started
        run["broker_round_trip_ms"] = broker_round_trip_ms(fleet)
        # The fleet's cost of N idle devices (health every interval), before anything is offered.
        before = watched.cpu()
        time.sleep(IDLE_WINDOW_S)
        run["idle_cpu_per_s"] = _diff(watched.cpu(), before, IDLE_WINDOW_S)
        run["loadavg_start"] = os.getloadavg()
        spy = (
            _py_spy(sampler.fleet.pid, profile / f"{workdir.name}-fleet.txt", profile_gil)
            if profile
            else None
        )
        before = watched.cpu()
        sampler.in_window = True
        t0 = time.time()
        campaign = client.start_rollout(
            MODEL,
            2,
            {"devices": [i["device_id"] for i in identities]},
            phases=ONE_PHASE if spec.phases == "one" else None,
        )
        run["post_rollout_s"] = time.time() - t0
        campaign_id = campaign["campaign_id"]

        def finished() -> dict[str, Any] | None:
            summary = next(c for c in client.rollouts() if c["campaign_id"] == campaign_id)
            return summary if summary["state"] not in ("running", "paused") else None

        summary = wait_for(f"campaign {campaign_id} to finish", finished, 900, interval=0.25)
        run["seen_by_bench_s"] = time.time() - t0
        sampler.in_window = False
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its profile when interrupted
            spy.wait(timeout=60)
        run["cpu_s"] = _diff(watched.cpu(), before)
        run["loadavg_end"] = os.getloadavg()
        status = client.rollout(campaign_id)
        reports = sims.stop()
        sims = None
        client.close()
    finally:
        if sims is not None:
            sims.stop()
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        fleet.stop()
    run.update(_figures(spec, t0, summary, status, reports))
    run["rss_peak_mib"] = {name: rss / MIB for name, rss in sampler.peak.rss.items()}
    run["rss_peak_in_window_mib"] = {name: rss / MIB for name, rss in sampler.peak.window_rss.items()}
    run["rss_samples"] = sampler.peak.samples
    # More than one pid: Mosquitto died and the fleet started it again (its log says why).
    run["broker_pids"] = sampler.broker_pids
    if run["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        run["workdir"] = str(workdir)
    return run


def _figures(
    spec: RunSpec, t0: float, summary: dict[str, Any], status: dict[str, Any], reports: list[dict[str, Any]]
) -> dict[str, Any]:
    """What the fleet and the devices recorded, relative to `t0` (just before the rollout's POST)."""
    results = [r for report in reports for r in report["results"]]
    outcomes = [str(d["outcome"]) for d in status["devices"]]
    committed = [r for r in results if r["state"] == "committed"]
    ok = summary["state"] == "completed" and outcomes.count("committed") == spec.devices
    failures: dict[str, int] = {}
    for r in results:
        if r["state"] != "committed":
            why = r["reason"][:120] or r["state"] or "no offer received"
            failures[why] = failures.get(why, 0) + 1
    figures: dict[str, Any] = {
        "ok": ok,
        "campaign_state": summary["state"],
        "campaign_reason": summary["reason"],
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "failures": failures,
        "sim_processes": len(reports),
        "sim_reported_devices": len(results),
        # The fleet's own clock: the campaign ends as the last committed status is recorded.
        "all_committed_s": summary["finished"] - t0 if ok else None,
        "chunk_retries": sum(r["chunk_retries"] for r in results),
    }
    if not committed:
        return figures
    per_device = [r["committed"] - r["offer_received"] for r in committed]
    figures |= {
        "last_commit_sent_s": max(r["committed"] for r in committed) - t0,
        "last_offer_received_s": max(r["offer_received"] for r in committed) - t0,
        "device_offer_to_commit_s": {
            "median": statistics.median(per_device),
            "p95": _percentile(per_device, 95),
            "max": max(per_device),
        },
        # Where a device's time goes: TUF refresh (offer -> offered), download, the rest (verify, statuses).
        "device_stage_median_s": {
            "tuf_refresh": statistics.median(r["offered"] - r["offer_received"] for r in committed),
            "download": statistics.median(r["downloaded"] - r["offered"] for r in committed),
            "verify_and_report": statistics.median(r["committed"] - r["downloaded"] for r in committed),
        },
        "payload": sorted({r["payload"] for r in committed}),
        "bytes_per_device": {key: statistics.median(r[key] for r in committed) for key in BYTE_FIGURES},
    }
    return figures


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _one_line(run: dict[str, Any]) -> str:
    done = (
        f"all committed in {run['all_committed_s']:.1f} s"
        if run["ok"]
        else f"NOT all committed {run['outcomes']}"
    )
    payload = run.get("bytes_per_device", {}).get("payload_bytes")
    return (
        f"{done}, payload/device {payload} B, fleet cpu {run['cpu_s']['fleet']:.1f} s, "
        f"mosquitto peak {run['rss_peak_mib']['mosquitto']:.1f} MiB, load {run['loadavg_start'][0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 3, 2], help="one per size")
    parser.add_argument("--modes", nargs="+", default=["delta", "full"], choices=["delta", "full"])
    parser.add_argument(
        "--default-phases-at",
        type=int,
        nargs="*",
        default=[100],
        help="sizes to also run with the default phases",
    )
    parser.add_argument("--health-interval-s", type=float, default=5.0)
    parser.add_argument("--whatif", action="store_true", help="run whatif_fleet.py's changed fleet instead")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--profile", type=Path, help="folder for py-spy profiles of the fleet server")
    parser.add_argument(
        "--profile-gil", action="store_true", help="profile only the thread holding the GIL (where CPU goes)"
    )
    parser.add_argument(
        "--scratch", type=Path, default=Path(tempfile.gettempdir()) / "edgefleet-bench-updates"
    )
    args = parser.parse_args()
    if len(args.repeats) != len(args.sizes):
        parser.error("give one --repeats value per --sizes value")
    archives = package_archives(args.scratch / "packages")
    base_sha = manifest_sha256(SAMPLE_MODEL / "v1")
    runs: list[dict[str, Any]] = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    plan = [
        RunSpec(n, mode, "one", r, args.health_interval_s, args.whatif)
        for n, repeats in zip(args.sizes, args.repeats, strict=True)
        for r in range(repeats)
        for mode in args.modes
    ]
    plan += [
        RunSpec(n, "delta", "default", r, args.health_interval_s, args.whatif)
        for n, repeats in zip(args.sizes, args.repeats, strict=True)
        if n in args.default_phases_at
        for r in range(repeats)
    ]
    for spec in plan:
        print(
            f"[bench] {spec.devices} devices, {spec.mode}, {spec.phases} phase(s), run {spec.repeat}",
            flush=True,
        )
        run = run_once(spec, archives, base_sha, args.scratch, args.profile, args.profile_gil)
        print(f"[bench]   {_one_line(run)}", flush=True)
        runs.append(run)
        args.out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
