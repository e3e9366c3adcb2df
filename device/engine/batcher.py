"""A micro-batcher per model: concurrent requests grouped into one engine call, each caller gets its rows.

Callers hand in inputs already checked against the manifest and get a Future back. One worker thread
per model takes the oldest request, gathers the requests behind it that have the same row shape until
`max_batch` rows are reached or `max_wait_ms` has passed since the oldest arrived, concatenates them
along dim 0, runs them once and hands each caller a slice of the outputs (a view, no copy).

The queue is bounded: when `max_queue` requests wait, `submit` raises `Overloaded` at once, so a burst
becomes fast refusals (HTTP 503) instead of a backlog that only grows. With `max_batch=1` nothing is
grouped and the batcher is just that bounded queue with one runner, which is also the best schedule on
a CPU whose cores one ONNX Runtime call already keeps busy.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from device.engine.backends.base import Tensors
from device.errors import ConfigError, EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")
# The worker never waits longer than this for a batch to fill; longer waits are configuration mistakes.
MAX_WAIT_LIMIT_MS = 1000.0
CLOSE_TIMEOUT_S = 10.0


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

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= MAX_WAIT_LIMIT_MS:
            raise ConfigError(
                f"max_wait_ms must be within 0..{MAX_WAIT_LIMIT_MS:.0f}, got {self.max_wait_ms}"
            )
        if self.max_queue < 1:
            raise ConfigError(f"max_queue must be at least 1, got {self.max_queue}")


@dataclass
class BatcherStats:
    batches: int = 0  # engine calls made
    rows: int = 0  # rows those calls carried
    requests: int = 0  # requests answered (with outputs or an error)
    refused: int = 0  # requests refused because the queue was full

    def mean_batch_rows(self) -> float | None:
        return self.rows / self.batches if self.batches else None


@dataclass
class _Request(Generic[T]):
    target: T
    inputs: Tensors
    rows: int
    key: Hashable | None  # requests with equal keys may share a call; None runs alone
    arrived: float
    future: Future[Tensors] = field(default_factory=Future)


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
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, target: T, inputs: Tensors, batchable: bool) -> Future[Tensors]:
        """Queue `inputs` for `target`; `batchable` says whether its dim 0 is a dynamic batch dim."""
        rows = _rows(inputs)
        key: Hashable | None = None
        if batchable and rows is not None and 0 < rows < self.config.max_batch:
            # Only rows of the same shape, for the very same loaded model, can be stacked.
            key = (id(target), tuple((n, a.shape[1:], a.dtype.str) for n, a in inputs.items()))
        request = _Request(target, inputs, rows or 0, key, time.monotonic())
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
        return request.future

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(CLOSE_TIMEOUT_S)

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
        if not head.future.set_running_or_notify_cancel():
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
                if nxt.future.set_running_or_notify_cancel():
                    batch.append(nxt)
                    rows += nxt.rows
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                break
            self._cond.wait(remaining)
        return batch

    def _execute(self, batch: list[_Request[T]]) -> None:
        try:
            if len(batch) == 1:
                outputs = self._run(batch[0].target, batch[0].inputs)
                batch[0].future.set_result(outputs)
            else:
                self._execute_stacked(batch)
        except Exception as e:  # the worker must outlive any model failure; every caller gets it
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(e)
        with self._cond:
            self.stats.batches += 1
            self.stats.rows += sum(r.rows for r in batch)
            self.stats.requests += len(batch)

    def _execute_stacked(self, batch: list[_Request[T]]) -> None:
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
        start = 0
        for request in batch:
            end = start + request.rows
            request.future.set_result({n: a[start:end] for n, a in outputs.items()})
            start = end
