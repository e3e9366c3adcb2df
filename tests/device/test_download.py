"""Payload downloads (device/download.py) when the fleet answers that it cannot give a chunk."""

import asyncio
from pathlib import Path

import pytest

from device import download
from device.download import PayloadDownload
from device.errors import ChunkRefused, UpdateRejected
from protocol.frames import Chunk
from protocol.messages import UpdateStatus

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes: three chunks of 4,096


class RefusingFleet:
    """Gives the payload's chunks, after refusing the first `refusals` requests with `retry_after_s`."""

    def __init__(self, refusals: int, retry_after_s: float | None) -> None:
        self.refusals, self.retry_after_s = refusals, retry_after_s
        self.requests = 0

    async def publish_update_status(self, status: UpdateStatus) -> None:
        pass

    async def fetch_chunk(
        self, update_id: str, offset: int, length: int, timeout: float, payload: str = "package"
    ) -> Chunk:
        self.requests += 1
        if self.requests <= self.refusals:
            raise ChunkRefused(offset, "the fleet cannot read this payload", self.retry_after_s)
        return Chunk(update_id, offset, len(PAYLOAD), PAYLOAD[offset : offset + length])


def fetch(tmp_path: Path, fleet: RefusingFleet) -> Path:
    return asyncio.run(PayloadDownload(tmp_path, fleet).fetch("u1", 4096, "package", len(PAYLOAD)))


def test_a_chunk_that_will_not_come_stops_the_download_at_once(tmp_path: Path) -> None:
    fleet = RefusingFleet(refusals=99, retry_after_s=None)
    with pytest.raises(
        UpdateRejected, match=r"package download stopped: .*cannot read this payload.*will not come"
    ):
        fetch(tmp_path, fleet)
    assert fleet.requests == 1  # not asked five times, ten seconds each


def test_a_chunk_refused_for_now_is_asked_again_after_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "MAX_RETRY_WAIT_S", 0.05)  # the fleet says 10 s; the test waits less
    fleet = RefusingFleet(refusals=2, retry_after_s=10.0)
    assert fetch(tmp_path, fleet).read_bytes() == PAYLOAD
    assert fleet.requests == 2 + 3


def test_refused_on_every_try_the_download_stalls_with_the_fleets_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "MAX_RETRY_WAIT_S", 0.0)
    fleet = RefusingFleet(refusals=99, retry_after_s=5.0)
    with pytest.raises(TimeoutError, match=r"after 5 tries; the fleet's last word: .*ask again in 5 s"):
        fetch(tmp_path, fleet)
    assert fleet.requests == download.CHUNK_ATTEMPTS
