"""An experiment, not the fleet's code: `fleet serve` with three changes to its MQTT worker, applied at
run time, to measure what they would buy (`bench_rollout.py --whatif`, `fleet_costs.py --whatif`).

Kept for the record of its results (RESULTS.md, the rows marked what-if): the fleet has done all three
itself since issue #5 (`fleet/mqtt_worker.py`: concurrent answers, `DeviceReports`), so patching the
worker of today would measure nothing; `concurrent_worker()` refuses to.

1. Chunk and metadata requests are answered concurrently (up to MAX_IN_FLIGHT at once). The worker
   otherwise handles one message at a time and awaits the broker's PUBACK of each answer before it
   reads the next message.
2. Health and update statuses go through one ordered queue whose consumer runs the database work in a
   worker thread, so the event loop keeps answering chunk requests while SQLite commits.
3. An update status that is neither final nor carries shadow figures skips the campaign bookkeeping
   (`rollouts.record_update_report`: phase aggregates and abort rules), which only final states and
   shadow figures can change.

    whatif_fleet.py --data-dir D --http-port P --broker-port B --chunk-size C
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fleet import rollouts
from fleet.mqtt_worker import FleetWorker
from fleet.server import ServeOptions, run_server
from protocol import topics
from protocol.errors import ProtocolError
from protocol.messages import Health, UpdateState, UpdateStatus, decode

log = logging.getLogger("whatif_fleet")
MAX_IN_FLIGHT = 64
_FINAL = {state.value for state in UpdateState if state.is_final}


def skip_unchanging_reports() -> None:
    """Change 3: campaigns see only the reports that can move them."""
    record = rollouts.record_update_report

    def record_if_it_matters(
        session: Any,
        update_id: str,
        device_id: str,
        state: str,
        detail: dict[str, Any] | None = None,
        **kw: Any,
    ) -> str | None:
        if state not in _FINAL and rollouts.SHADOW_KEY not in (detail or {}):
            return None
        return record(session, update_id, device_id, state, detail, **kw)

    rollouts.record_update_report = record_if_it_matters  # service.py calls it through the module


def concurrent_worker() -> None:
    """Changes 1 and 2, on FleetWorker."""
    if hasattr(FleetWorker, "_answer"):
        raise SystemExit(
            "whatif_fleet.py: this fleet's worker already answers requests concurrently and records "
            "reports on a thread (issue #5); run bench_rollout.py without --whatif"
        )
    handle: Callable[[FleetWorker, str, bytes], Awaitable[None]] = FleetWorker._handle
    requests = (topics.CHUNK_REQUEST, topics.METADATA_REQUEST)
    state: dict[int, tuple[asyncio.Semaphore, asyncio.Queue[tuple[str, bytes]], set[asyncio.Task[None]]]] = {}

    def of(
        worker: FleetWorker,
    ) -> tuple[asyncio.Semaphore, asyncio.Queue[tuple[str, bytes]], set[asyncio.Task[None]]]:
        if id(worker) not in state:
            queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
            tasks: set[asyncio.Task[None]] = set()
            tasks.add(asyncio.create_task(_consume(worker, queue, handle)))
            state[id(worker)] = (asyncio.Semaphore(MAX_IN_FLIGHT), queue, tasks)
        return state[id(worker)]

    async def answer(worker: FleetWorker, semaphore: asyncio.Semaphore, topic: str, payload: bytes) -> None:
        try:
            await handle(worker, topic, payload)
        finally:
            semaphore.release()

    async def dispatch(self: FleetWorker, topic: str, payload: bytes) -> None:
        semaphore, queue, tasks = of(self)
        leaf = topic.split("/", 3)[-1] if topic.count("/") >= 3 else ""
        if leaf in requests:
            await semaphore.acquire()  # bounded: a flood waits here, at the broker, not in memory
            task = asyncio.create_task(answer(self, semaphore, topic, payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif leaf in (topics.HEALTH, topics.UPDATE_STATUS):
            queue.put_nowait((topic, payload))
        else:
            await handle(self, topic, payload)

    FleetWorker._handle = dispatch  # type: ignore[method-assign]


async def _consume(
    worker: FleetWorker,
    queue: asyncio.Queue[tuple[str, bytes]],
    handle: Callable[[FleetWorker, str, bytes], Awaitable[None]],
) -> None:
    """Device reports in arrival order, their database work off the event loop."""
    while True:
        topic, payload = await queue.get()
        try:
            device_id, leaf = topics.split_device_topic(topic)
            worker.handled[leaf] += 1
            if leaf == topics.HEALTH:
                health = decode(Health, payload)
                _own(device_id, health.device_id)
                await asyncio.to_thread(worker.service.on_health, device_id, health)
            else:
                status = decode(UpdateStatus, payload)
                _own(device_id, status.device_id)
                await asyncio.to_thread(worker.service.on_update_status, device_id, status)
        except (ProtocolError, ValueError) as e:
            worker.service.rejected_messages += 1
            log.warning("rejected message on %s: %s", topic, e)
        except Exception:
            worker.service.rejected_messages += 1
            log.exception("error handling a message on %s", topic)


def _own(device_id: str, named: str) -> None:
    if named != device_id:
        raise ProtocolError(f"payload names device {named!r} on {device_id!r}'s topic")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--broker-port", type=int, required=True)
    parser.add_argument("--chunk-size", type=int, default=64 * 1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    skip_unchanging_reports()
    concurrent_worker()
    run_server(
        ServeOptions(
            args.data_dir,
            "127.0.0.1",
            args.http_port,
            None,
            "127.0.0.1",
            args.broker_port,
            args.chunk_size,
            broker_tls=False,  # the simulator enrolls plain-mode devices
        )
    )


if __name__ == "__main__":
    main()
