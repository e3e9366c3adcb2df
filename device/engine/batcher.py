"""A micro-batcher per model: concurrent requests grouped into one engine call, each caller gets its rows.

Callers hand in inputs already checked against the manifest and get a Future back: a
concurrent.futures.Future from `submit` (threads), or an asyncio future of the caller's loop from
`submit_async` (the API). A worker thread per model (or `workers` of them) takes the oldest
request, gathers the requests behind it that have the same row shape until `max_batch` rows are
reached or `max_wait_ms` has passed since the oldest arrived, concatenates them along dim 0, runs
them once and hands each caller a slice of the outputs (a view, no copy).

The queue is bounded: when `max_queue` requests wait, `submit` raises `Overloaded` at once, so a burst
becomes fast refusals (HTTP 503) instead of a backlog that only grows. With `max_batch=1` nothing is
grouped and the batcher is just that bounded queue with its runner(s).

Asyncio callers are answered with one `call_soon_threadsafe` per batch and loop, which sets their
futures on the loop's own thread. Chaining a concurrent Future into the loop (`asyncio.wrap_future`)
costs two callbacks, a lock and a loop wake-up per request: with a model that costs next to nothing
and 16 callers, 108 µs of CPU per request for the round trip against 72 µs this way.
"""

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from device.engine.backends.base import Tensors
from device.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")
# The worker never waits longer than this for a batch to fill; longer waits are configuration mistakes.
MAX_WAIT_LIMIT_MS = 1000.0
CLOSE_TIMEOUT_S = 10.0
MAX_WORKERS = 64


class Unavailable(EngineError):
    """The model cannot take requests just now; the caller should retry (HTTP 503 with Retry-After)."""


class Overloaded(Unavailable):
    """The model's queue is full."""


@dataclass(frozen=True)
class BatchConfig:
    """How requests for one model are queued and grouped."""

    max_batch: int = 1  # rows per engine call; 1 = no grouping, a plain bounded queue
    max_wait_ms: float = 0.0  # 0 = group only what is already waiting when the model becomes free
    max_queue: int = 32  # requests waiting (not rows); the next one is refused
    # Engine calls in flight at once. More than 1 only for runtimes whose run may be called from
    # several threads at once (ONNX Runtime; not TVM's graph executor nor a LiteRT interpreter):
    # one call's input stacking and hand-back then overlap another's run, and a runtime with one
    # thread per call fills the cores with no sync between its threads (bench/engine/RESULTS.md).
    workers: int = 1

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= MAX_WAIT_LIMIT_MS:
            raise ConfigError(
                f"max_wait_ms must be within 0..{MAX_WAIT_LIMIT_MS:.0f}, got {self.max_wait_ms}"
            )
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {self.max_queue}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers must be within 1..{MAX_WORKERS}, got {self.workers}")


@dataclass
class BatcherStats:
    batches: int = 0  # engine calls made
    rows: int = 0  # rows those calls carried
    requests: int = 0  # requests answered (with outputs or an error)
    refused: int = 0  # requests refused because the queue was full

    def mean_batch_rows(self) -> float | None:
        return self.rows / self.batches if self.batches else None


@dataclass(slots=True)
class _Request(Generic[T]):
    target: T
    inputs: Tensors
    rows: int
    key: Hashable | None  # requests with equal keys may share a call; None runs alone
    arrived: float
    future: Future[Tensors] | None = None  # a thread's caller
    waiter: "asyncio.Future[Tensors] | None" = None  # or a coroutine's, set on `loop` only
    loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """Mark it running; False when its caller has gone (cancelled): then it is dropped."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        assert self.waiter is not None
        # Read from the worker thread: a cancel that lands after this is seen by _settle instead.
        return not self.waiter.done()


# What one batch produced for its asyncio callers on one loop: (future, outputs or an error).
_Settled = list[tuple["asyncio.Future[Tensors]", Tensors | BaseException]]


def _settle(settled: _Settled) -> None:
    """On the callers' loop: hand each waiting coroutine its rows or the error."""
    for waiter, outcome in settled:
        if waiter.done():  # cancelled meanwhile: its caller went away
            continue
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)


def _aligned(inputs: Tensors) -> Tensors:
    """`inputs` with each array whose data is not aligned for its dtype copied into one that is.

    Runtimes that hand buffers to C (TensorRT, TVM) need aligned data; binary tensors read in place
    from an HTTP body start wherever its JSON part ended. Stacked batches are new arrays already.
    """
    for array in inputs.values():
        if not array.flags.aligned:
            return {name: a if a.flags.aligned else a.copy() for name, a in inputs.items()}
    return inputs


def _rows(inputs: Tensors) -> int | None:
    """The common dim-0 size of all inputs, or None when they disagree (such a request runs alone)."""
    sizes = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
    return sizes.pop() if len(sizes) == 1 else None


class MicroBatcher(Generic[T]):
    """One model's queue and its worker thread. `run(target, inputs)` makes the engine call."""

    def __init__(self, name: str, config: BatchConfig, run: Callable[[T, Tensors], Tensors]) -> None:
        self.name = name
        self.config = config
        self.stats = BatcherStats()
        self._run = run
        self._queue: deque[_Request[T]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
            for _ in range(config.workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, target: T, inputs: Tensors, batchable: bool) -> Future[Tensors]:
        """Queue `inputs` for `target`; `batchable` says whether its dim 0 is a dynamic batch dim."""
        request = self._request(target, inputs, batchable)
        request.future = Future()
        self._enqueue(request)
        return request.future

    def submit_async(self, target: T, inputs: Tensors, batchable: bool) -> "asyncio.Future[Tensors]":
        """`submit` for a coroutine: the future belongs to the running loop and is set on it."""
        loop = asyncio.get_running_loop()
        request = self._request(target, inputs, batchable)
        request.waiter, request.loop = loop.create_future(), loop
        self._enqueue(request)
        return request.waiter

    def _request(self, target: T, inputs: Tensors, batchable: bool) -> _Request[T]:
        rows = _rows(inputs)
        key: Hashable | None = None
        if batchable and rows is not None and 0 < rows < self.config.max_batch:
            # Only rows of the same shape, for the very same loaded model, can be stacked.
            key = (id(target), tuple((n, a.shape[1:], a.dtype.str) for n, a in inputs.items()))
        return _Request(target, inputs, rows or 0, key, time.monotonic())

    def _enqueue(self, request: _Request[T]) -> None:
        with self._cond:
            if self._closed:
                raise Unavailable(f"{self.name} is shutting down or being reconfigured; retry shortly")
            if len(self._queue) >= self.config.max_queue:
                self.stats.refused += 1
                raise Overloaded(
                    f"{self.name} is overloaded: {len(self._queue)} requests already wait "
                    f"(max_queue {self.config.max_queue}); retry shortly or send fewer at once"
                )
            self._queue.append(request)
            self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take()
            if batch:
                self._execute(batch)

    def _take(self) -> list[_Request[T]]:
        """The next batch; called with the lock held. Cancelled requests (gone callers) are dropped."""
        head = self._queue.popleft()
        if not head.start():
            return []
        batch, rows = [head], head.rows
        if head.key is None:
            return batch
        deadline = head.arrived + self.config.max_wait_ms / 1000
        while rows < self.config.max_batch:
            if self._queue:
                nxt = self._queue[0]
                if nxt.key != head.key or rows + nxt.rows > self.config.max_batch:
                    break  # FIFO: an incompatible request heads the next batch instead of being skipped
                self._queue.popleft()
                if nxt.start():
                    batch.append(nxt)
                    rows += nxt.rows
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                break
            self._cond.wait(remaining)
        return batch

    def _execute(self, batch: list[_Request[T]]) -> None:
        outcomes: list[Tensors | BaseException]
        try:
            if len(batch) == 1:
                outcomes = [self._run(batch[0].target, _aligned(batch[0].inputs))]
            else:
                outcomes = list(self._execute_stacked(batch))
        except Exception as e:  # the worker must outlive any model failure; every caller gets it
            outcomes = [e] * len(batch)
        with self._cond:
            self.stats.batches += 1
            self.stats.rows += sum(r.rows for r in batch)
            self.stats.requests += len(batch)
        # Counted before the callers hear back, so a caller that reads the stats sees its own call.
        by_loop: dict[asyncio.AbstractEventLoop, _Settled] = {}
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.future is not None:
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)
            else:
                assert request.loop is not None and request.waiter is not None
                by_loop.setdefault(request.loop, []).append((request.waiter, outcome))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop has closed: nobody is left to answer
                log.debug("%s: %d answers dropped, their event loop is closed", self.name, len(settled))

    def _execute_stacked(self, batch: list[_Request[T]]) -> list[Tensors]:
        names = list(batch[0].inputs)
        stacked = {n: np.concatenate([r.inputs[n] for r in batch]) for n in names}
        total = sum(r.rows for r in batch)
        outputs = self._run(batch[0].target, stacked)
        for out_name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise EngineError(
                    f"{self.name}: output {out_name!r} has shape {list(array.shape)} for a batch of "
                    f"{total} rows; set max_batch 1 for models whose outputs are not per row"
                )
        sliced, start = [], 0
        for request in batch:
            end = start + request.rows
            sliced.append({n: a[start:end] for n, a in outputs.items()})  # views, no copies
            start = end
        return sliced
