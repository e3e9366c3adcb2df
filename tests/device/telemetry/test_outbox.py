"""The durable outbox: order, seqs across restarts and SIGKILL, the byte bound, eviction, ack."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from device.telemetry.outbox import RECORD_OVERHEAD, Kind, Outbox, OutboxError


def charged(payload: bytes) -> int:
    return len(payload) + RECORD_OVERHEAD


def test_put_peek_in_seq_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=1 << 20) as box:
        seqs = [box.put(Kind.METRIC if i % 2 else "health", f"r{i}".encode()) for i in range(10)]
        assert seqs == list(range(1, 11))
        records = box.peek(100)
        assert [r.seq for r in records] == seqs
        assert [r.payload for r in records] == [f"r{i}".encode() for i in range(10)]
        assert records[0].kind is Kind.HEALTH and records[1].kind is Kind.METRIC
        assert [r.seq for r in box.peek(3)] == [1, 2, 3]
        assert [r.seq for r in box.peek(3, after=3)] == [4, 5, 6]
        assert box.put_many("metric", [b"a", b"b"]) == [11, 12]


def test_wal_and_full_sync(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=1 << 20) as box:
        assert box._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert box._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_ack_removes_exactly_one(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=1 << 20) as box:
        for i in range(5):
            box.put("metric", bytes([i]) * 10)
        before = box.stats()
        assert box.ack(3)
        assert [r.seq for r in box.peek()] == [1, 2, 4, 5]
        after = box.stats()
        assert after.pending == before.pending - 1 and after.bytes == before.bytes - charged(b"x" * 10)
        assert not box.ack(3)  # already gone
        assert not box.ack(99)  # never existed
        assert box.stats().pending == 4
        assert box.ack_many([1, 5, 42]) == 2
        assert [r.seq for r in box.peek()] == [2, 4]


def test_close_and_reopen_keeps_records_and_seq(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_bytes=1 << 20) as box:
        for i in range(5):
            box.put("metric", f"m{i}".encode())
        box.ack_many([1, 2, 3, 4, 5])  # all sent: seq must still continue after them
        box.put("health", b"h")
    with Outbox(path, max_bytes=1 << 20) as box:
        assert [(r.seq, r.payload) for r in box.peek()] == [(6, b"h")]
        assert box.stats().bytes == charged(b"h")
        assert box.put("metric", b"after") == 7
    with Outbox(path, max_bytes=1 << 20) as box:
        assert box.stats().last_seq == 7
        assert box.put("metric", b"again") == 8


WRITER = """
import sys
from device.telemetry.outbox import Outbox
box = Outbox(sys.argv[1], max_bytes=1 << 24)
i = 0
while True:
    seq = box.put("metric" if i % 3 else "health", b"payload-%d" % i + b"." * (i % 200))
    print(seq, i, flush=True)
    i += 1
"""


def test_sigkill_mid_stream_loses_nothing_that_put_returned(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    returned: dict[int, int] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        seq, i = map(int, line.split())
        returned[seq] = i
        if len(returned) >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with Outbox(path, max_bytes=1 << 24) as box:
        stored = {r.seq: r.payload for r in box.peek(100_000)}
        for seq, i in returned.items():
            assert stored[seq] == b"payload-%d" % i + b"." * (i % 200)
        assert sorted(stored) == list(range(1, len(stored) + 1))  # no holes, nothing torn
        assert box.put("metric", b"next") == max(stored) + 1
        assert box._db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_byte_bound_holds_under_a_burst(tmp_path: Path) -> None:
    limit = 64 * 1024
    path = tmp_path / "outbox.db"
    with Outbox(path, max_bytes=limit) as box:
        for burst in range(200):
            sizes = [(burst * 37 + i * 101) % 3000 for i in range(50)]
            box.put_many("metric", [b"m" * s for s in sizes])
            if burst % 4 == 0:
                box.put("health", b"h" * 500)
            stats = box.stats()
            assert stats.bytes <= limit
            (on_disk,) = box._db.execute("SELECT SUM(size) FROM records").fetchone()
            assert on_disk == stats.bytes
        stats = box.stats()
        assert stats.evicted_by_kind["metric"] > 0 and stats.evicted_by_kind["health"] == 0
        assert stats.pending + sum(stats.evicted_by_kind.values()) == stats.last_seq
    # The file stays in proportion to the bound (WAL included), not to what went through.
    files = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert files < 3 * limit + 256 * 1024, files  # 128 KiB is the WAL's floor, 32 KiB the shm


def test_eviction_order_metric_first_then_health_and_counts_persist(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    payload = b"x" * (1000 - RECORD_OVERHEAD)  # charged exactly 1000
    with Outbox(path, max_bytes=5000) as box:
        box.put("health", payload)  # 1
        box.put("metric", payload)  # 2
        box.put("health", payload)  # 3
        box.put("metric", payload)  # 4
        box.put("metric", payload)  # 5  -> full
        box.put("health", payload)  # 6 evicts metric 2
        assert [r.seq for r in box.peek()] == [1, 3, 4, 5, 6]
        box.put("metric", payload)  # 7 evicts metric 4
        assert [r.seq for r in box.peek()] == [1, 3, 5, 6, 7]
        box.put("health", payload)  # 8 evicts 5
        box.put("health", payload)  # 9 evicts 7: no metric left now
        assert [r.kind for r in box.peek()] == [Kind.HEALTH] * 5
        assert box.put("metric", payload) == 10  # only health left: the new metric is dropped
        assert [r.seq for r in box.peek()] == [1, 3, 6, 8, 9]
        box.put("health", payload)  # 11: health evicts the oldest health
        assert [r.seq for r in box.peek()] == [3, 6, 8, 9, 11]
        stats = box.stats()
        assert stats.evicted_by_kind == {"metric": 5, "health": 1}
        assert stats.evicted_bytes_by_kind == {"metric": 5000, "health": 1000}
    with Outbox(path, max_bytes=5000) as box:
        assert box.stats().evicted_by_kind == {"metric": 5, "health": 1}
    with Outbox(path, max_bytes=3000) as box:  # a smaller bound at start: evicted down to it
        assert [r.seq for r in box.peek()] == [8, 9, 11]
        assert box.stats().bytes == 3000
        assert box.stats().evicted_by_kind == {"metric": 5, "health": 3}


def test_big_metric_evicts_several_small_ones(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=4096) as box:
        for _ in range(10):
            box.put("metric", b"s" * 100)
        box.put("metric", b"B" * 3000)
        stats = box.stats()
        assert stats.bytes <= 4096
        assert box.peek()[-1].payload == b"B" * 3000
        assert stats.evicted_by_kind["metric"] == 11 - stats.pending


def test_refusals(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=2048) as box:
        with pytest.raises(OutboxError, match="never fit"):
            box.put("metric", b"x" * 2048)
        with pytest.raises(ValueError):
            box.put("bogus", b"x")
        assert box.stats().last_seq == 0  # a refused put consumes no seq
    with pytest.raises(ValueError, match="too small"):
        Outbox(tmp_path / "other.db", max_bytes=10)


def test_failed_transaction_leaves_accounting_intact(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=1 << 20) as box:
        box.put("metric", b"a")
        before = box.stats()

        def payloads() -> Iterator[bytes]:
            yield b"ok"
            raise RuntimeError("producer broke")

        with pytest.raises(RuntimeError):
            box.put_many("metric", payloads())
        assert box.stats() == before
        assert box.put("metric", b"b") == 2


def test_threads_share_one_outbox(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=1 << 22) as box:
        got: list[int] = []
        lock = threading.Lock()

        def produce(kind: str) -> None:
            for i in range(50):
                seq = box.put(kind, b"%d" % i)
                with lock:
                    got.append(seq)

        def drain() -> None:
            for _ in range(50):
                for record in box.peek(5):
                    box.ack(record.seq)

        threads = [threading.Thread(target=produce, args=(k,)) for k in ("metric", "health", "metric")]
        threads.append(threading.Thread(target=drain))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(1, 151))
        stats = box.stats()
        assert stats.pending == len(box.peek(1000)) and stats.last_seq == 150
        (on_disk,) = box._db.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()
        assert on_disk == stats.bytes


def test_other_process_sees_committed_records(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_bytes=1 << 20) as box:
        box.put("metric", b"visible")
        reader = sqlite3.connect(path)
        assert reader.execute("SELECT payload FROM records").fetchall() == [(b"visible",)]
        reader.close()


def test_metric_that_cannot_fit_evicts_nothing(tmp_path: Path) -> None:
    one_k = b"x" * (1000 - RECORD_OVERHEAD)
    with Outbox(tmp_path / "outbox.db", max_bytes=5000) as box:
        box.put_many("health", [one_k] * 3)
        box.put("metric", one_k)  # seq 4; 1000 bytes free
        seq = box.put("metric", b"y" * (2500 - RECORD_OVERHEAD))  # would need 1500 of metric: only 1000
        assert seq == 5
        assert [r.seq for r in box.peek()] == [1, 2, 3, 4]  # the old metric was not sacrificed for nothing
        assert box.stats().evicted_by_kind == {"metric": 1, "health": 0}
        assert box.stats().bytes == 4000


def test_start_after_moves_the_seq_counter_up_only(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.sqlite", 64 * 1024) as outbox:
        outbox.start_after(40)
        assert outbox.put(Kind.METRIC, b"a") == 41
        outbox.start_after(10)  # never back: seq 41 may be at the fleet already
        assert outbox.put(Kind.METRIC, b"b") == 42
        with pytest.raises(ValueError):
            outbox.start_after(-1)
    with Outbox(tmp_path / "o.sqlite", 64 * 1024) as reopened:
        assert reopened.put(Kind.METRIC, b"c") == 43
