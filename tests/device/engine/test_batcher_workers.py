"""Several engine calls in flight per model (`BatchConfig.workers`), with real ONNX Runtime sessions."""

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device.engine.batcher import BatchConfig, MicroBatcher
from device.engine.engine import Engine
from device.errors import ConfigError
from tests.device.engine.onnx_models import doubler, serve_bare
from tests.device.engine.onnx_models import doubler_rows as rows


@pytest.fixture(autouse=True)
def _close_engine(engine: Engine) -> Iterator[None]:
    yield
    engine.close()


def test_two_workers_run_two_calls_at_once() -> None:
    # Each call waits for a second one to be running: with one worker this would time out.
    both_running = threading.Barrier(2, timeout=10)

    def run(_: object, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        both_running.wait()
        return {"y": 2 * inputs["x"]}

    batcher = MicroBatcher("pair", BatchConfig(max_batch=1, workers=2), run)
    try:
        futures = [batcher.submit("model", {"x": rows(1, i)}, batchable=True) for i in range(4)]
        for i, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(30)["y"], 2 * rows(1, i))
    finally:
        batcher.close()
    assert batcher.stats.batches == 4 and not both_running.broken


def test_many_callers_each_get_their_rows_from_two_workers(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=8, max_queue=1000, workers=2))
    inputs = [rows(1 + i % 3, 10.0 * i) for i in range(300)]

    async def main() -> list[dict[str, np.ndarray]]:
        return list(await asyncio.gather(*(engine.submit_async(serving, {"x": x}) for x in inputs)))

    for x, out in zip(inputs, asyncio.run(main()), strict=True):
        np.testing.assert_array_equal(out["y"], 2 * x)
    stats = engine.batcher_stats("doubler")
    assert serving.stats.inferences == sum(len(x) for x in inputs)
    assert sum(serving.stats.snapshot().bucket_counts) == stats["batches"]  # every call counted once


def test_closing_stops_every_worker(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    before = set(threading.enumerate())
    engine.configure_batching("doubler", BatchConfig(workers=3))
    engine.submit(serving, {"x": rows(1, 0)}).result(30)
    workers = [t for t in threading.enumerate() if t not in before and t.name == "batcher-doubler"]
    assert len(workers) == 3
    engine.close()
    assert not any(t.is_alive() for t in workers)


@pytest.mark.parametrize("workers", [0, 65])
def test_a_bad_worker_count_says_what_to_fix(workers: int) -> None:
    with pytest.raises(ConfigError, match=r"workers must be within 1\.\.64"):
        BatchConfig(workers=workers)
