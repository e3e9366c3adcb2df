"""A chunk the fleet cannot read, over a real Mosquitto: the device hears why at once, no timeouts."""

import asyncio
import time
from pathlib import Path

import pytest

from device.errors import ChunkRefused
from fleet.artifacts import archive_key
from tests.integration.test_worker_concurrency import CHUNK, rig

pytestmark = pytest.mark.e2e


def test_a_vanished_artifact_is_answered_not_left_to_time_out(
    tmp_path: Path, archives: dict[int, Path]
) -> None:
    asyncio.run(_vanished(tmp_path, archives))


async def _vanished(tmp_path: Path, archives: dict[int, Path]) -> None:
    async with rig(tmp_path, archives) as r:
        device_id = "cam-03"
        link, update_id = r.links[device_id], r.updates[device_id]
        first = await link.fetch_chunk(update_id, 0, CHUNK, timeout=10)
        assert first.data == archives[2].read_bytes()[:CHUNK]

        store_path = r.service.artifacts.path(archive_key("surface-defect", 2))  # type: ignore[attr-defined]
        store_path.unlink()
        started = time.monotonic()
        with pytest.raises(ChunkRefused) as refused:
            await link.fetch_chunk(update_id, CHUNK, CHUNK, timeout=10)
        assert time.monotonic() - started < 5, "answered, not timed out"
        assert refused.value.retry_after_s is None and refused.value.offset == CHUNK
        assert "push it again" in refused.value.reason and str(store_path) not in refused.value.reason
        assert r.service.artifact_errors["ArtifactMissing"] == 1
