"""The batcher's asyncio hand-off (`submit_async`, what the API uses), with real ONNX Runtime sessions."""

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device.engine.batcher import BatchConfig, Overloaded
from device.engine.engine import Engine
from device.errors import EngineError, InferenceInputError
from models.manifest import load_manifest
from tests.device.engine.onnx_models import doubler, rows_of_three, serve_bare
from tests.device.engine.onnx_models import doubler_rows as rows


@pytest.fixture(autouse=True)
def _close_engine(engine: Engine) -> Iterator[None]:
    yield
    engine.close()


def test_coroutines_get_their_own_rows_from_shared_calls(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=32, max_wait_ms=200))
    inputs = [rows(1 + i % 3, 100.0 * i) for i in range(12)]

    async def main() -> list[dict[str, np.ndarray]]:
        futures = [engine.submit_async(serving, {"x": x}) for x in inputs]
        return list(await asyncio.gather(*futures))

    for x, out in zip(inputs, asyncio.run(main()), strict=True):
        np.testing.assert_array_equal(out["y"], 2 * x)
    assert engine.batcher_stats("doubler")["batches"] <= 2  # queued within the 200 ms wait


def test_each_batch_wakes_the_loop_once(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=8, max_wait_ms=200))
    woken: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            woken.append(len(args[0]) if args else 0)  # the answers that call carries
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
        await asyncio.gather(*(engine.submit_async(serving, {"x": rows(1, i)}) for i in range(16)))

    asyncio.run(main())
    stats = engine.batcher_stats("doubler")
    assert len(woken) == stats["batches"] == 2  # 16 single rows, 8 a call: two wake-ups, not 16
    assert woken == [8, 8]


def test_a_model_failure_reaches_every_coroutine_of_the_batch(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, rows_of_three(tmp_path))
    engine.configure_batching("rows-of-three", BatchConfig(max_batch=8, max_wait_ms=100))

    async def main() -> list[object]:
        doomed = [engine.submit_async(serving, {"x": rows(1, i)}) for i in range(2)]  # 2 rows: fails
        return list(await asyncio.gather(*doomed, return_exceptions=True))

    for outcome in asyncio.run(main()):
        assert isinstance(outcome, EngineError) and "rows-of-three failed" in str(outcome)
    assert serving.stats.errors == 2


def test_a_cancelled_coroutine_is_skipped_and_the_rest_are_served(engine: Engine, zoo: Path) -> None:
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    engine.serve(serving)
    engine.configure_batching("surface-defect", BatchConfig(max_batch=1))

    async def main() -> dict[str, np.ndarray]:
        busy = engine.submit_async(serving, {"image": np.zeros((256, 3, 64, 64), np.float32)})
        gone = engine.submit_async(serving, {"image": np.zeros((1, 3, 64, 64), np.float32)})
        gone.cancel()  # the client went away while the model was busy
        kept = engine.submit_async(serving, {"image": np.ones((1, 3, 64, 64), np.float32)})
        await busy
        return await kept

    assert asyncio.run(main())["logits"].shape == (1, 4)
    assert serving.stats.inferences == 257  # the cancelled image never ran


def test_threads_and_coroutines_share_one_queue(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=16, max_wait_ms=1, max_queue=1000))
    from_threads: list[np.ndarray] = []

    def thread_caller() -> None:
        futures = [engine.submit(serving, {"x": rows(1, i)}) for i in range(100)]
        from_threads.extend(f.result(30)["y"] for f in futures)

    async def main() -> list[dict[str, np.ndarray]]:
        return list(
            await asyncio.gather(*(engine.submit_async(serving, {"x": rows(1, i)}) for i in range(100)))
        )

    worker = threading.Thread(target=thread_caller)
    worker.start()
    answers = asyncio.run(main())
    worker.join(30)
    assert [a["y"][0, 0] for a in answers] == [2.0 * i for i in range(100)]
    assert [y[0, 0] for y in from_threads] == [2.0 * i for i in range(100)]
    assert serving.stats.inferences == 200


def test_refusals_and_bad_inputs_are_raised_at_once(engine: Engine, zoo: Path, tmp_path: Path) -> None:
    serving = engine.prepare(zoo / "v1", load_manifest(zoo / "v1"))
    engine.serve(serving)
    engine.configure_batching("surface-defect", BatchConfig(max_batch=1, max_queue=1))

    async def main() -> None:
        busy = engine.submit_async(serving, {"image": np.zeros((256, 3, 64, 64), np.float32)})
        with pytest.raises(InferenceInputError, match="shape"):
            engine.submit_async(serving, {"image": np.zeros((1, 3, 32, 32), np.float32)})
        with pytest.raises(Overloaded, match="max_queue 1"):
            for _ in range(5):  # one may be taken by the worker; the queue holds one more
                engine.submit_async(serving, {"image": np.zeros((1, 3, 64, 64), np.float32)})
        await busy

    asyncio.run(main())


def test_an_answer_for_a_closed_loop_is_dropped_without_harm(engine: Engine, tmp_path: Path) -> None:
    serving = serve_bare(engine, doubler(tmp_path))
    engine.configure_batching("doubler", BatchConfig(max_batch=4, max_wait_ms=300))

    async def leave_early() -> None:
        engine.submit_async(serving, {"x": rows(1, 0)})  # never awaited: the loop ends first

    asyncio.run(leave_early())  # the loop is closed while the batch still waits to fill
    # The worker survives the dropped answer and serves the next caller.
    assert engine.submit(serving, {"x": rows(1, 5)}).result(30)["y"][0, 0] == 10.0


def unaligned_rows(n: int, start: float) -> np.ndarray:
    """Rows read in place from a buffer one byte off, as binary tensors are from an HTTP body."""
    buffer = b"\0" + rows(n, start).tobytes()
    array = np.frombuffer(buffer, np.float32, count=n * 4, offset=1).reshape(n, 4)
    assert not array.flags.aligned
    return array


@pytest.mark.parametrize("max_batch", [1, 8])
def test_the_model_is_handed_aligned_data(max_batch: int) -> None:
    from device.engine.batcher import MicroBatcher

    seen: list[bool] = []

    def run(_: object, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.append(all(a.flags.aligned for a in inputs.values()))
        return {"y": 2 * inputs["x"]}

    batcher = MicroBatcher("recorder", BatchConfig(max_batch=max_batch, max_wait_ms=100), run)
    try:
        futures = [
            batcher.submit("model", {"x": unaligned_rows(1, 10.0 * i)}, batchable=True) for i in range(4)
        ]
        for i, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(30)["y"], 2 * rows(1, 10.0 * i))
    finally:
        batcher.close()
    assert seen and all(seen)
    assert len(seen) == (4 if max_batch == 1 else 1)
