"""The micro-batcher with real ONNX Runtime sessions: grouping, per-caller rows, overload, failures."""

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from device.engine.batcher import BatchConfig, Overloaded, Unavailable
from device.engine.engine import Engine
from device.errors import ConfigError, EngineError, InferenceInputError
from models.manifest import load_manifest
from tests.device.engine.onnx_models import doubler, rows_of_three, serve_bare

Tensors = dict[str, np.ndarray]


@pytest.fixture(autouse=True)
def _close_engine(engine: Engine) -> Iterator[None]:
    yield
    engine.close()  # stops the batchers' threads; an engine per test would leave them otherwise


def rows(n: int, start: float, width: int = 4) -> np.ndarray:
    return (start + np.arange(n * width, dtype=np.float32)).reshape(n, width)


def results(futures: list[Future[Tensors]]) -> list[Tensors]:
    return [f.result(timeout=30) for f in futures]


def test_each_caller_gets_exactly_its_own_rows(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=32, max_wait_ms=200))
    inputs = [rows(1 + i % 3, 100.0 * i) for i in range(10)]  # 19 rows in all, distinct values
    futures = [engine.submit(serving, {"x": x}) for x in inputs]
    for x, out in zip(inputs, results(futures), strict=True):
        np.testing.assert_array_equal(out["y"], 2 * x)
    stats = engine.batcher_stats("doubler")
    assert stats["batches"] <= 2, stats  # queued within microseconds, well inside the 200 ms wait
    assert serving.stats.inferences == 19


def test_batched_cnn_outputs_match_single_runs(engine: Engine, zoo: Path) -> None:
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    engine.serve(serving)
    engine.configure_batching("surface-defect", BatchConfig(max_batch=8, max_wait_ms=200))
    images = [
        np.random.default_rng(i).normal(size=(1 + i % 2, 3, 64, 64)).astype(np.float32) for i in range(6)
    ]
    futures = [engine.submit(serving, {"image": x}) for x in images]
    for x, out in zip(images, results(futures), strict=True):
        alone = engine.run("surface-defect", {"image": x})["logits"]
        assert out["logits"].shape == (len(x), 4)
        np.testing.assert_allclose(out["logits"], alone, rtol=1e-4, atol=1e-5)
    assert engine.batcher_stats("surface-defect")["batches"] < len(images)


def test_batch_never_exceeds_max_batch_and_large_requests_run_alone(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=4, max_wait_ms=100))
    sizes = [1, 6, 1, 1, 3, 2, 4]
    inputs = [rows(n, 10.0 * i) for i, n in enumerate(sizes)]
    futures = [engine.submit(serving, {"x": x}) for x in inputs]
    for x, out in zip(inputs, results(futures), strict=True):
        np.testing.assert_array_equal(out["y"], 2 * x)
    latencies = serving.stats.latency_samples  # one entry per engine call
    # FIFO, at most 4 rows a call, 6 and 4 alone: [1] [6] [1,1] [3] [2] [4] -> 6 calls.
    assert latencies == engine.batcher_stats("doubler")["batches"] == 6


def test_fixed_batch_dim_is_never_stacked(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path, shape=(1, 4), name="fixed"))
    assert not serving.batchable
    engine.configure_batching("fixed", BatchConfig(max_batch=8, max_wait_ms=50))
    futures = [engine.submit(serving, {"x": rows(1, i)}) for i in range(5)]
    for i, out in enumerate(results(futures)):
        np.testing.assert_array_equal(out["y"], 2 * rows(1, i))
    assert engine.batcher_stats("fixed")["batches"] == 5


def test_rows_of_other_shapes_go_in_other_batches(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path, shape=("n", "w"), name="anywidth"))
    engine.configure_batching("anywidth", BatchConfig(max_batch=8, max_wait_ms=100))
    inputs = [rows(1, 0, width=4), rows(2, 50, width=4), rows(1, 9, width=5), rows(1, 7, width=4)]
    futures = [engine.submit(serving, {"x": x}) for x in inputs]
    for x, out in zip(inputs, results(futures), strict=True):
        np.testing.assert_array_equal(out["y"], 2 * x)
    assert engine.batcher_stats("anywidth")["batches"] == 3  # [4,4] [5] [4]: FIFO, no reordering


def test_a_full_queue_refuses_at_once(engine: Engine, zoo: Path) -> None:
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    engine.serve(serving)
    engine.configure_batching("surface-defect", BatchConfig(max_batch=1, max_queue=2))
    busy = engine.submit(serving, {"image": np.zeros((256, 3, 64, 64), np.float32)})  # tens of ms
    accepted, refused = [], []
    for _ in range(20):
        try:
            accepted.append(engine.submit(serving, {"image": np.zeros((1, 3, 64, 64), np.float32)}))
        except Overloaded as e:
            refused.append(str(e))
    assert refused and "overloaded" in refused[0] and "max_queue 2" in refused[0]
    assert len(accepted) <= 3  # two waiting, perhaps one more once the busy batch was taken
    assert busy.result(30)["logits"].shape == (256, 4)
    assert all(f.result(30)["logits"].shape == (1, 4) for f in accepted)
    assert engine.batcher_stats("surface-defect")["refused"] == len(refused)


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, rows_of_three(tmp_path))
    engine.configure_batching("rows-of-three", BatchConfig(max_batch=8, max_wait_ms=100))
    doomed = [engine.submit(serving, {"x": rows(1, i)}) for i in range(2)]  # 2 rows: reshape fails
    for future in doomed:
        with pytest.raises(EngineError, match="rows-of-three failed on onnxruntime-cpu"):
            future.result(30)
    out = engine.submit(serving, {"x": rows(3, 0)}).result(30)
    assert out["y"].shape == (3, 4)
    assert serving.stats.errors == 2 and serving.stats.inferences == 3


def test_bad_inputs_are_refused_before_queueing(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    with pytest.raises(InferenceInputError, match="shape"):
        engine.submit(serving, {"x": np.zeros((1, 5), np.float32)})
    assert engine.batcher_stats("doubler")["batches"] == 0


def test_cancelled_requests_are_dropped(engine: Engine, zoo: Path) -> None:
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    engine.serve(serving)
    busy = engine.submit(serving, {"image": np.zeros((256, 3, 64, 64), np.float32)})
    gone = engine.submit(serving, {"image": np.zeros((1, 3, 64, 64), np.float32)})
    assert gone.cancel()  # the caller went away while the model was busy
    busy.result(30)
    kept = engine.submit(serving, {"image": np.zeros((1, 3, 64, 64), np.float32)}).result(30)
    assert kept["logits"].shape == (1, 4)
    assert serving.stats.inferences == 257


def test_stats_stay_exact_with_the_pipeline_and_the_batcher_running_together(
    engine: Engine, tmp_path: Path
) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=16, max_wait_ms=1, max_queue=1000))

    def pipeline() -> None:
        for i in range(200):
            engine.run("doubler", {"x": rows(2, i)})

    threads = [threading.Thread(target=pipeline) for _ in range(3)]
    for t in threads:
        t.start()
    futures = [engine.submit(serving, {"x": rows(1, i)}) for i in range(300)]
    results(futures)
    for t in threads:
        t.join(60)
    assert serving.stats.inferences == 3 * 200 * 2 + 300
    assert sum(serving.stats.snapshot().bucket_counts) == 3 * 200 + engine.batcher_stats("doubler")["batches"]


def test_closing_finishes_what_was_queued(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=4, max_wait_ms=20))
    futures = [engine.submit(serving, {"x": rows(1, i)}) for i in range(10)]
    engine.configure_batching("doubler", BatchConfig())  # the old batcher drains, then stops
    assert all(f.done() for f in futures)
    assert [f.result()["y"][0, 0] for f in futures] == [2.0 * i for i in range(10)]


def test_a_closed_engine_refuses_and_leaves_no_worker_behind(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    before = set(threading.enumerate())
    engine.submit(serving, {"x": rows(1, 0)}).result(30)
    workers = [t for t in threading.enumerate() if t not in before and t.name == "batcher-doubler"]
    assert len(workers) == serving.model.calls_in_flight  # the default: one thread per call in flight
    engine.close()
    assert not any(worker.is_alive() for worker in workers)
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit(serving, {"x": rows(1, 0)})


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"max_batch": 0}, "max_batch"), ({"max_wait_ms": -1}, "max_wait_ms"), ({"max_queue": 0}, "max_queue")],
)
def test_bad_batch_config_says_what_to_fix(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BatchConfig(**fields)  # type: ignore[arg-type]
