"""ModelStats: calls recorded from several threads without a lock are all counted, once."""

import threading

import pytest

from device.engine.engine import FOLD_EVERY, LATENCY_BUCKETS_MS, LATENCY_WINDOW, ModelStats


def test_calls_recorded_by_many_threads_at_once_are_all_counted() -> None:
    stats = ModelStats()
    threads, calls = 4, 3 * FOLD_EVERY + 7  # folds happen in the callers' threads meanwhile
    start = threading.Barrier(threads + 1)

    def caller() -> None:
        start.wait()
        for i in range(calls):
            stats.record(2, 0.7 if i % 2 else 3.0)

    def reader() -> None:  # /metrics scrapes while the callers record
        start.wait()
        for _ in range(200):
            stats.snapshot()

    workers = [threading.Thread(target=caller) for _ in range(threads)] + [threading.Thread(target=reader)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    snap = stats.snapshot()
    assert snap.inferences == threads * calls * 2
    assert sum(snap.bucket_counts) == threads * calls  # one histogram entry per call
    fast = (calls // 2) * threads
    assert snap.bucket_counts[LATENCY_BUCKETS_MS.index(1)] == fast  # 0.7 ms falls under the 1 ms bound
    assert snap.bucket_counts[LATENCY_BUCKETS_MS.index(5)] == threads * calls - fast
    assert snap.latency_sum_ms == pytest.approx(fast * 0.7 + (threads * calls - fast) * 3.0)
    assert stats.latency_samples == LATENCY_WINDOW


def test_reading_sees_every_call_so_far() -> None:
    stats = ModelStats()
    assert stats.quantile(0.5) is None and stats.inferences == 0
    for ms in (1.0, 2.0, 3.0):
        stats.record(1, ms)
    assert stats.inferences == 3  # read before any fold was due
    assert stats.quantile(0.5) == 2.0
    stats.failed(5)
    assert stats.errors == 5 and stats.inferences == 3


def test_a_model_nobody_reads_keeps_a_short_queue() -> None:
    stats = ModelStats()
    for _ in range(10 * FOLD_EVERY):
        stats.record(1, 1.0)
    assert len(stats._pending) < FOLD_EVERY
