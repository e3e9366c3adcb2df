"""Engine and v2 endpoint benchmarks, side by side with the raw runtime, in one run.

    .venv/bin/python bench/engine/bench_engine.py [--model PATH] [--repeats 3] [--seconds 6]
        [--threads N] [--precision auto|fp32|int8] [--parts overhead,latency,throughput]
        [--served 1:0,16:0,16:2,4:0] [--server-path DIR]

1. Engine overhead: `engine.run` vs `onnxruntime.InferenceSession.run` on the same model file with
   the same session options, batch 1, in alternating blocks so that drift hits both alike.
2. Latency added by the v2 HTTP endpoint: one client, one request at a time, batch 1, binary
   tensors (and JSON, and Triton's own client, for comparison), against the raw in-process run.
3. Served throughput: 16 concurrent clients, batch 1 each, against the raw runtime's best in-process
   throughput at any batch size, called by one thread or several at once (the ceiling), with
   micro-batching off and on, and with one or two engine calls in flight.

Besides wall time, CPU time is counted (the server's from /proc, the clients' and the raw runs'
from this process): on a shared machine it is far steadier than wall time, and on 2 cores it is
what bounds served throughput. The CPU other processes took during each throughput run (from
/proc/stat) and the load average are recorded beside it. Servers run as child processes
(bench/engine/serve.py); clients run in this process. Raw runs go to bench/engine/results.json (or
--out).

Every server and every raw run use the same model file: the precision is decided once (pinned.py).
"""

import argparse
import dataclasses
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from loadgen import http_request, run_load  # beside this script
from pinned import PRECISIONS, load_pinned, served_file

from edgefleet.procs import free_port, wait_for
from fleet.ca import FleetCA

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "zoo" / "surface_defect" / "v1"
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
CLIENTS = 16
WARMUP_CALLS = 20
DEFAULT_SERVED = "1:0,1:0:2,16:0,16:2,4:0,16:0:2"  # max_batch:max_wait_ms[:workers] per served configuration
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Served:
    """One served configuration of `--served`."""

    max_batch: int
    max_wait_ms: float
    workers: int
    images: int  # per request
    tls: bool  # HTTPS, as a device with a certificate serves its API


def served_configs(spec: str) -> dict[str, Served]:
    """`--served` (max_batch:max_wait_ms[:workers[:images[:tls]]], comma-separated) by label."""
    configs = {}
    for item in spec.split(","):
        batch, wait, workers, images, tls = ([*item.split(":"), "", "", "", ""])[:5]
        if tls not in ("", "tls"):
            raise SystemExit(f"--served {item}: the fifth field is 'tls' or nothing")
        config = Served(int(batch), float(wait or 0), int(workers or 1), int(images or 1), tls == "tls")
        label = (
            "batching off"
            if config.max_batch == 1
            else f"batching on, max_batch {config.max_batch}, wait {config.max_wait_ms:g} ms"
        )
        label += f", {config.workers} workers" if config.workers > 1 else ""
        label += f", {config.images} images per request" if config.images > 1 else ""
        label += ", HTTPS" if config.tls else ""
        configs[label] = config
    return configs


def busy_cpu_s() -> float:
    """CPU seconds all processes spent on all cores (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) * TICK_S


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a whole process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def quantiles_ms(seconds: list[float]) -> dict[str, float]:
    array = np.asarray(seconds) * 1000
    return {"p50": float(np.quantile(array, 0.5)), "p99": float(np.quantile(array, 0.99))}


def raw_session(model_file: Path, threads: int) -> ort.InferenceSession:
    # The options the engine's onnxruntime-cpu backend sets, so only the engine's own code differs.
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def tiny_model(folder: Path) -> Path | None:
    """y = 2x on a [n, 4] float32 input: a run of a few µs, so what remains is the engine's own cost."""
    try:
        import onnx
    except ImportError:  # the onnx package is in the train extra; without it this part is skipped
        return None
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        initializer=[onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "tiny.onnx"))
    return folder / "tiny.onnx"


def paired(
    raw: Callable[[], object], wrapped: Callable[[], object], blocks: int, calls: int
) -> dict[str, Any]:
    """Alternating blocks of `calls` calls; per block the wrapped/raw ratio of wall and of CPU time."""
    for _ in range(WARMUP_CALLS):
        raw(), wrapped()
    wall: dict[str, list[float]] = {"raw": [], "wrapped": []}
    cpu: dict[str, list[float]] = {"raw": [], "wrapped": []}
    for block in range(blocks):
        order = [("raw", raw), ("wrapped", wrapped)]
        for which, call in order if block % 2 == 0 else order[::-1]:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(calls):
                call()
            wall[which].append((time.perf_counter() - start) / calls)
            cpu[which].append((time.process_time() - cpu_start) / calls)

    def ratios(times: dict[str, list[float]]) -> list[float]:
        return [w / r for w, r in zip(times["wrapped"], times["raw"], strict=True)]

    return {
        "raw_ms": statistics.median(wall["raw"]) * 1e3,
        "wrapped_ms": statistics.median(wall["wrapped"]) * 1e3,
        "wall_ratio": statistics.median(ratios(wall)),
        "wall_ratio_quartiles": statistics.quantiles(ratios(wall), n=4),
        "raw_cpu_us": statistics.median(cpu["raw"]) * 1e6,
        "wrapped_cpu_us": statistics.median(cpu["wrapped"]) * 1e6,
        "cpu_ratio": statistics.median(ratios(cpu)),
    }


def engine_overhead(model: Path, precision: str, threads: int, blocks: int) -> dict[str, Any]:
    """engine.run against InferenceSession.run on the engine's own session (one thread pool, no
    session-to-session differences), an A/A run of that session against itself for the noise floor,
    and the engine's cost in µs on a model that costs next to nothing."""
    from device.standalone import manifest_for_bare_onnx

    engine, serving = load_pinned(model, precision, threads)
    session = serving.model._session  # type: ignore[attr-defined]  # the very session the engine runs
    spec = serving.manifest.inputs[0]
    shape = [1 if d == -1 else d for d in spec.shape]
    feed = {spec.name: np.random.default_rng(0).normal(size=shape).astype(spec.dtype)}
    name = serving.manifest.name
    out: dict[str, Any] = {"model": str(model), "threads": threads, "precision": precision}
    out["engine_vs_raw"] = paired(lambda: session.run(None, feed), lambda: engine.run(name, feed), blocks, 40)
    out["raw_vs_raw"] = paired(lambda: session.run(None, feed), lambda: session.run(None, feed), blocks, 40)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp))
        if tiny is not None:
            served = engine.prepare(tiny.parent, manifest_for_bare_onnx(tiny))
            engine.serve(served)
            tiny_session = served.model._session  # type: ignore[attr-defined]
            x = {"x": np.ones((1, 4), np.float32)}
            out["tiny"] = paired(lambda: tiny_session.run(None, x), lambda: engine.run("tiny", x), 15, 3000)
    engine.close()
    return out


def raw_rate(
    session: ort.InferenceSession, name: str, batch: int, seconds: float, callers: int = 1
) -> dict[str, float]:
    """Items/s and CPU ms per item of the raw session at `batch`, run by `callers` threads at once
    (ONNX Runtime's run may be called concurrently), and the other jobs' CPU meanwhile."""
    feed = {name: np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)}
    session.run(None, feed)
    calls = [0] * callers
    start, cpu, busy = time.perf_counter(), time.process_time(), busy_cpu_s()
    stop = start + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            session.run(None, feed)
            calls[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(1, callers)]
    for thread in threads:
        thread.start()
    loop(0)
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    items = sum(calls) * batch
    return {
        "items_s": items / elapsed,
        "cpu_ms_item": cpu / items * 1e3,
        "other_cpu_cores": max(0.0, busy_cpu_s() - busy - cpu) / elapsed,
    }


def ceiling_key(batch: int, callers: int) -> str:
    return str(batch) if callers == 1 else f"{batch}x{callers}"


def ceiling(
    session: ort.InferenceSession, name: str, seconds_each: float, callers: list[int]
) -> dict[str, dict[str, float]]:
    """Items/s and CPU ms per item of the raw session at each batch size, for each number of callers."""
    return {
        ceiling_key(batch, n): raw_rate(session, name, batch, seconds_each, n)
        for n in callers
        for batch in BATCH_SIZES
    }


@dataclass
class Server:
    port: int
    token: str
    pid: int
    tls: ssl.SSLContext | None = None  # a client context that trusts the server's certificate

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


@contextmanager
def server(model: Path, config: Served, args: argparse.Namespace) -> Iterator[Server]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "token"
        cmd = [sys.executable, str(ROOT / "bench" / "engine" / "serve.py"), "--model", str(model)]
        cmd += ["--port", str(port), "--token-file", str(token_file), "--http", args.http]
        cmd += ["--max-batch", str(config.max_batch), "--max-wait-ms", str(config.max_wait_ms)]
        cmd += ["--max-queue", "64", "--workers", str(config.workers)]
        cmd += ["--threads", str(args.threads), "--precision", args.served_precision]
        tls = None
        if config.tls:  # a certificate from a fleet CA, as a device's API has
            ca = FleetCA(Path(tmp) / "ca")
            cert, key = ca.api_tls()
            cmd += ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
            tls = ssl.create_default_context(cafile=str(ca.cert_path))
        env = dict(os.environ)
        if args.server_path:  # e.g. a folder with httptools and uvloop, which uvicorn then picks up
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.server_path, env.get("PYTHONPATH")]))
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 - closed below, after the child
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:

            def up() -> bool:
                if child.poll() is not None:
                    raise RuntimeError((Path(tmp) / "serve.log").read_text())
                return httpx.get(f"{srv.url}/healthz", timeout=1, verify=tls or True).status_code == 200

            srv = Server(port, "", child.pid, tls)
            wait_for("the bench server", up, 60)
            yield dataclasses.replace(srv, token=token_file.read_text().strip())
        finally:
            child.terminate()
            child.wait(15)
            log.close()


def server_stack(extra_path: str | None) -> dict[str, bool]:
    """Whether the server child can import httptools and uvloop (uvicorn uses them when it can)."""
    env = dict(os.environ, PYTHONPATH=extra_path or "")
    check = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: bool(u.find_spec(m)) for m in ('httptools', 'uvloop')}))"
    )
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def binary_request(model_name: str, array: np.ndarray, token: str) -> bytes:
    raw = array.tobytes()
    tensor = {
        "name": "image",
        "shape": list(array.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    headers = {"Authorization": f"Bearer {token}", "Inference-Header-Content-Length": str(len(header))}
    return http_request(f"/v2/models/{model_name}/infer", header + raw, headers)


def json_request(model_name: str, array: np.ndarray, token: str) -> bytes:
    tensor = {"name": "image", "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}
    body = json.dumps({"inputs": [tensor]}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return http_request(f"/v2/models/{model_name}/infer", body, headers)


def measured(call: Callable[[], object], n: int, pid: int | None) -> dict[str, float]:
    """Latency quantiles of `n` calls after a warm-up, with CPU ms per call here and in `pid`."""
    for _ in range(WARMUP_CALLS):
        call()
    latencies = []
    here, there = time.process_time(), process_cpu_s(pid) if pid else 0.0
    for _ in range(n):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    result = quantiles_ms(latencies)
    result["cpu_ms_here"] = (time.process_time() - here) / n * 1e3
    if pid:
        result["cpu_ms_server"] = (process_cpu_s(pid) - there) / n * 1e3
    return result


def lean_caller(port: int, request: bytes) -> tuple[Callable[[], None], Callable[[], None]]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = sock.makefile("rb")

    def call() -> None:
        sock.sendall(request)
        status = int(stream.readline().split()[1])
        length = 0
        while (line := stream.readline()) not in (b"\r\n", b""):
            key, _, value = line.partition(b":")
            if key.lower() == b"content-length":
                length = int(value)
        stream.read(length)
        if status != 200:
            raise RuntimeError(f"the server answered {status}")

    def close() -> None:
        stream.close()
        sock.close()

    return call, close


def latencies(server: Server, model_name: str, session: ort.InferenceSession, n: int) -> dict[str, Any]:
    import tritonclient.http as triton

    one = np.random.default_rng(1).normal(size=(1, 3, 64, 64)).astype(np.float32)
    out = {"raw in-process": measured(lambda: session.run(None, {"image": one}), n, None)}
    for label, request in (
        ("v2 binary", binary_request(model_name, one, server.token)),
        ("v2 JSON", json_request(model_name, one, server.token)),
    ):
        call, close = lean_caller(server.port, request)
        out[label] = measured(call, n, server.pid)
        close()
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    tensor = triton.InferInput("image", [1, 3, 64, 64], "FP32")
    tensor.set_data_from_numpy(one)
    out["v2 binary, tritonclient"] = measured(
        lambda: client.infer(model_name, [tensor], headers={"Authorization": f"Bearer {server.token}"}),
        n,
        server.pid,
    )
    client.close()
    return out


def batching_counts(srv: Server) -> tuple[int, float]:
    """Engine calls made and rows they carried so far, from the server's status."""
    status = httpx.get(
        f"{srv.url}/api/status",
        headers={"Authorization": f"Bearer {srv.token}"},
        timeout=10,
        verify=srv.tls or True,
    ).json()
    batching = status["batching"]
    return batching["batches"], (batching["mean_batch_rows"] or 0.0) * batching["batches"]


def throughput(
    args: argparse.Namespace,
    srv: Server,
    request: bytes,
    ceiling: dict[str, Any],
    session: ort.InferenceSession,
    images: int = 1,
) -> dict[str, Any]:
    """`CLIENTS` connections sending `request` (`images` images each) one after another."""
    run_load(srv.port, request, CLIENTS, seconds=1.0, warmup_s=0.0, tls=srv.tls)
    # The raw runtime at this repeat's best batch size just before and just after the served run (the
    # server idles meanwhile): the ceiling under the same load from other jobs, which moves by tens
    # of percent within a minute on a shared machine.
    best = max(ceiling["ceiling"], key=lambda b: ceiling["ceiling"][b]["items_s"])
    best_batch, _, callers = best.partition("x")
    beside = [raw_rate(session, "image", int(best_batch), args.seconds / 3, int(callers or 1))]
    batches, rows = batching_counts(srv)
    load_before = os.getloadavg()[0]
    busy, here, there = busy_cpu_s(), time.process_time(), process_cpu_s(srv.pid)
    load = run_load(srv.port, request, CLIENTS, args.seconds, warmup_s=0.0, tls=srv.tls)
    here, there = time.process_time() - here, process_cpu_s(srv.pid) - there
    busy = busy_cpu_s() - busy
    batches_after, rows_after = batching_counts(srv)
    beside.append(raw_rate(session, "image", int(best_batch), args.seconds / 3, int(callers or 1)))
    answered = max(1, sum(load.statuses.values())) * images  # items: CPU below is per image
    items_s = load.ok * images / load.elapsed_s
    paired = statistics.mean(r["items_s"] for r in beside)
    result = {
        "items_s": items_s,
        "of_ceiling": items_s / ceiling["ceiling_best"],
        "ceiling_beside": {"raw": best, "items_s": paired, "runs": beside},
        "of_ceiling_beside": items_s / paired,
        "statuses": load.statuses,
        "cpu_ms_server": there / answered * 1e3,
        "cpu_ms_clients": here / answered * 1e3,
        "mean_batch_rows": (rows_after - rows) / max(1, batches_after - batches),
        # Cores' worth of CPU that neither the server nor the clients used: the other jobs' share.
        "other_cpu_cores": max(0.0, busy - here - there) / load.elapsed_s,
        "load_average": [load_before, os.getloadavg()[0]],
        **quantiles_ms(load.latencies_s),
    }
    # What a CPU-saturated machine would serve, relative to the raw runtime at its cheapest:
    # steadier than the wall-clock ratio when other jobs share the cores.
    spent = result["cpu_ms_server"] + result["cpu_ms_clients"]
    result["of_ceiling_by_cpu"] = ceiling["ceiling_cpu_ms_item"] / spent
    # The same with the clients elsewhere, as on a device whose callers are other machines.
    result["of_ceiling_by_server_cpu"] = ceiling["ceiling_cpu_ms_item"] / result["cpu_ms_server"]
    return result


def one_repeat(args: argparse.Namespace, model_name: str, session: ort.InferenceSession) -> dict[str, Any]:
    one = np.random.default_rng(1).normal(size=(1, 3, 64, 64)).astype(np.float32)
    result: dict[str, Any] = {}
    if "throughput" in args.parts:
        result["ceiling"] = ceiling(session, "image", args.ceiling_seconds, args.ceiling_callers)
        result["ceiling_best"] = max(r["items_s"] for r in result["ceiling"].values())
        result["ceiling_cpu_ms_item"] = min(r["cpu_ms_item"] for r in result["ceiling"].values())
    served: dict[str, Any] = {}
    configs = served_configs(args.served)
    plain_one = {label: c for label, c in configs.items() if c.max_batch == 1 and c.images == 1 and not c.tls}
    if "throughput" not in args.parts:  # one server for the latency part alone
        configs = plain_one or {"batching off": Served(1, 0.0, 1, 1, False)}
    for label, config in configs.items():
        with server(args.model, config, args) as srv:
            # One request at a time: batching is moot; measured on the first plain unbatched server.
            if label in plain_one and "latency" in args.parts and "latency" not in result:
                result["latency"] = latencies(srv, model_name, session, args.latency_n)
            if "throughput" in args.parts:
                request = binary_request(model_name, np.repeat(one, config.images, axis=0), srv.token)
                served[label] = throughput(args, srv, request, result, session, config.images)
    result["served"] = served
    return result


def med(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(value)
    return float(statistics.median(values))


def report(overhead: dict[str, Any] | None, runs: list[dict[str, Any]], threads: int, precision: str) -> str:
    lines: list[str] = []
    if overhead is not None:
        lines += [*overhead_table(overhead, threads), ""]
    if "latency" in runs[0]:
        lines += [*latency_table(runs), ""]
    if runs[0]["served"]:
        lines += throughput_table(runs, precision)
    return "\n".join(lines).strip()


def overhead_table(overhead: dict[str, Any], threads: int) -> list[str]:
    pair, aa = overhead["engine_vs_raw"], overhead["raw_vs_raw"]
    lines = [
        f"### Engine overhead, in-process, batch 1 (runtime threads: {threads}, {overhead['precision']})",
        "",
        "| comparison | raw ms/call | wrapped ms/call | wall ratio (quartiles) | CPU ratio |",
        "|---|---:|---:|---:|---:|",
        f"| engine.run vs session.run, {Path(overhead['model']).name} | {pair['raw_ms']:.3f} | "
        f"{pair['wrapped_ms']:.3f} | {pair['wall_ratio']:.3f} ({pair['wall_ratio_quartiles'][0]:.3f}-"
        f"{pair['wall_ratio_quartiles'][2]:.3f}) | {pair['cpu_ratio']:.3f} |",
        f"| A/A: session.run vs itself (noise floor) | {aa['raw_ms']:.3f} | {aa['wrapped_ms']:.3f} | "
        f"{aa['wall_ratio']:.3f} ({aa['wall_ratio_quartiles'][0]:.3f}-{aa['wall_ratio_quartiles'][2]:.3f}) | "
        f"{aa['cpu_ratio']:.3f} |",
    ]
    if "tiny" in overhead:
        tiny = overhead["tiny"]
        added = tiny["wrapped_cpu_us"] - tiny["raw_cpu_us"]
        lines.append(
            f"| engine.run vs session.run, 2x model (engine cost alone) | {tiny['raw_cpu_us']:.1f} µs CPU | "
            f"{tiny['wrapped_cpu_us']:.1f} µs CPU | +{added:.1f} µs = "
            f"{added / pair['raw_cpu_us'] * 100:.2f}% of the model's "
            f"{pair['raw_cpu_us']:.0f} µs CPU per call | |"
        )
    return lines


def latency_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "### Latency, one client, one request at a time, batch 1",
        "",
        "| path | p50 ms | p99 ms | added p50 | added p99 | server CPU ms/req | client CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    raw50, raw99 = (
        med(runs, "latency", "raw in-process", "p50"),
        med(runs, "latency", "raw in-process", "p99"),
    )
    for path in runs[0]["latency"]:
        p50, p99 = med(runs, "latency", path, "p50"), med(runs, "latency", path, "p99")
        server_cpu = f"{med(runs, 'latency', path, 'cpu_ms_server'):.3f}" if path != "raw in-process" else ""
        lines.append(
            f"| {path} | {p50:.3f} | {p99:.3f} | {p50 - raw50:+.3f} | {p99 - raw99:+.3f} | {server_cpu} | "
            f"{med(runs, 'latency', path, 'cpu_ms_here'):.3f} |"
        )
    return lines


def throughput_table(runs: list[dict[str, Any]], precision: str) -> list[str]:
    lines = [
        f"### Throughput, {CLIENTS} concurrent clients, batch 1 each, binary tensors ({precision})",
        "",
        "| what | items/s | of ceiling | of ceiling beside | p50 ms | p99 ms | server CPU ms/item "
        "| client CPU ms/item | of ceiling by CPU | by server CPU | mean batch | other jobs' CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in runs[0]["ceiling"]:
        c = ("ceiling", key)
        batch, _, callers = key.partition("x")
        what = f"batch {batch}" + (f", {callers} callers at once" if callers else "")
        lines.append(
            f"| raw ORT in-process, {what} | {med(runs, *c, 'items_s'):.0f} | | | | "
            f"| {med(runs, *c, 'cpu_ms_item'):.3f} | | | | | {med(runs, *c, 'other_cpu_cores'):.2f} |"
        )
    lines.append(
        f"| **ceiling** (best of the above, per repeat) | {med(runs, 'ceiling_best'):.0f} | 1.00 | | | | "
        f"{med(runs, 'ceiling_cpu_ms_item'):.3f} (cheapest) | | 1.00 | 1.00 | | |"
    )
    for label in runs[0]["served"]:
        s = ("served", label)
        lines.append(
            f"| v2 endpoint, {label} | {med(runs, *s, 'items_s'):.0f} | {med(runs, *s, 'of_ceiling'):.2f} | "
            f"{med(runs, *s, 'of_ceiling_beside'):.2f} | {med(runs, *s, 'p50'):.1f} | "
            f"{med(runs, *s, 'p99'):.1f} | "
            f"{med(runs, *s, 'cpu_ms_server'):.3f} | {med(runs, *s, 'cpu_ms_clients'):.3f} | "
            f"{med(runs, *s, 'of_ceiling_by_cpu'):.2f} | {med(runs, *s, 'of_ceiling_by_server_cpu'):.2f} | "
            f"{med(runs, *s, 'mean_batch_rows'):.1f} | "
            f"{med(runs, *s, 'other_cpu_cores'):.2f} |"
        )
    lines += [
        "",
        "*of ceiling beside*: against the raw runtime at the repeat's best configuration, timed for a third "
        "of the run just before and just after it (the same load from other jobs). *of ceiling by CPU*: "
        "the raw runtime's CPU per item at its cheapest batch size over the server's and the clients' CPU "
        "per served item (what a machine with no other jobs would reach); *by server CPU*: the same "
        "without the clients' share (clients on other machines).",
    ]
    bound = batch_one_bound(runs)
    if bound is not None:
        lines += [
            "",
            f"*Bound with batching off*: the raw runtime itself, one item per call (its best caller count), "
            f"makes {bound:.2f} of the ceiling; a server that cost nothing would reach that and no more "
            f"when every engine call carries one item.",
        ]
    return lines


def batch_one_bound(runs: list[dict[str, Any]]) -> float | None:
    """Median over repeats of the raw runtime's best batch-1 throughput over that repeat's ceiling."""
    ratios = []
    for run in runs:
        batch_one = [v["items_s"] for k, v in run["ceiling"].items() if k.partition("x")[0] == "1"]
        if batch_one and run["ceiling_best"]:
            ratios.append(max(batch_one) / run["ceiling_best"])
    return statistics.median(ratios) if ratios else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a package folder or an .onnx")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per throughput run")
    parser.add_argument("--ceiling-seconds", type=float, default=1.0, help="per batch size")
    parser.add_argument(
        "--ceiling-callers", default="1,2", help="threads calling the raw session at once, comma list"
    )
    parser.add_argument("--latency-n", type=int, default=500, help="sequential requests per latency run")
    parser.add_argument("--overhead-blocks", type=int, default=30)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="runtime threads, everywhere"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the model file served and timed raw; auto: what the engine picks on this machine, once",
    )
    parser.add_argument(
        "--parts", default="overhead,latency,throughput", help="comma list of overhead, latency, throughput"
    )
    parser.add_argument(
        "--served",
        default=DEFAULT_SERVED,
        help="max_batch:max_wait_ms[:workers[:images per request]] per served configuration, comma list",
    )
    parser.add_argument(
        "--http",
        default="edgefleet",
        help="the server's HTTP protocol: edgefleet (the device's), or uvicorn's auto, h11, httptools",
    )
    parser.add_argument("--server-path", help="prepended to the server's PYTHONPATH (e.g. httptools, uvloop)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    args.parts = set(args.parts.split(","))
    args.ceiling_callers = [int(n) for n in args.ceiling_callers.split(",")]
    unknown = args.parts - {"overhead", "latency", "throughput"}
    if unknown:
        parser.error(f"unknown --parts {sorted(unknown)}")
    served_configs(args.served)  # a malformed --served fails now, not after the first repeat

    engine, serving = load_pinned(args.model, args.precision, args.threads)
    model_name = serving.manifest.name
    # Every server serves, and the raw runs time, this one file.
    args.served_precision = serving.served_precision
    model_file = served_file(serving)
    precision_reason = serving.precision.reason if serving.precision else "fp32"
    engine.close()
    session = raw_session(model_file, args.threads)
    print(f"serving and timing {model_file.name} ({args.served_precision}: {precision_reason})", flush=True)
    load_before = os.getloadavg()

    overhead = None
    if "overhead" in args.parts:
        overhead = engine_overhead(args.model, args.served_precision, args.threads, args.overhead_blocks)
        print("engine overhead measured", flush=True)
    runs = []
    for i in range(args.repeats):
        runs.append(one_repeat(args, model_name, session))
        print(f"repeat {i + 1}/{args.repeats} done", flush=True)
    table = report(overhead, runs, args.threads, f"{args.served_precision}, {model_file.name}")
    print(table)
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    results = {
        "command": " ".join(sys.argv),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "onnxruntime": ort.__version__,
        "server_stack": server_stack(args.server_path),
        "threads": args.threads,
        "precision": {"served": args.served_precision, "file": model_file.name, "reason": precision_reason},
        "overhead": overhead,
        "runs": runs,
        "table": table,
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
