"""An update's payload pulled from the fleet chunk by chunk into `downloads/`, resumable after a restart.

Each chunk is checked as it arrives (offset, size) and is on disk (fsync) before the next is asked
for, so after a restart the download goes on from the last whole chunk; the sha256 of the whole
payload (the one the signed targets name) is checked afterwards.
"""

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from device.errors import ChunkRefused, UpdateRejected
from device.transport import FleetTransport
from protocol.frames import Chunk

log = logging.getLogger(__name__)
CHUNK_TIMEOUT_S = 10.0
CHUNK_ATTEMPTS = 5
# The longest a device waits before asking again for a chunk the fleet could not read just now.
MAX_RETRY_WAIT_S = 30.0
KINDS = ("package", "delta")


class PayloadDownload:
    def __init__(self, folder: Path, transport: FleetTransport) -> None:
        self.folder = folder
        self.transport = transport

    def part(self, update_id: str, kind: str) -> Path:
        return self.folder / f"{update_id}.{kind}.part"

    async def fetch(self, update_id: str, chunk_size: int, kind: str, size: int) -> Path:
        """The payload as a .part file of `size` bytes (not yet checked as a whole)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        part = self.part(update_id, kind)
        offset = 0
        if part.exists():
            offset = min(part.stat().st_size, size) // chunk_size * chunk_size
            if offset:
                log.info(
                    "update %s: resuming the %s download at %d of %d bytes", update_id, kind, offset, size
                )
        with part.open("r+b" if part.exists() else "wb") as out:
            out.truncate(offset)
            out.seek(offset)
            while offset < size:
                length = min(chunk_size, size - offset)
                chunk = await self._fetch_with_retries(update_id, offset, length, kind, size)
                if len(chunk.data) != length:
                    raise UpdateRejected(f"chunk at {offset} does not fit the signed size {size}")
                out.write(chunk.data)
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
                offset += length
        return part

    async def _fetch_with_retries(
        self, update_id: str, offset: int, length: int, kind: str, total: int
    ) -> Chunk:
        misfit: Chunk | None = None
        refused: ChunkRefused | None = None
        for attempt in range(1, CHUNK_ATTEMPTS + 1):
            try:
                chunk = await self.transport.fetch_chunk(update_id, offset, length, CHUNK_TIMEOUT_S, kind)
            except TimeoutError:
                log.warning("chunk %s@%d timed out (attempt %d)", update_id, offset, attempt)
                continue
            except ChunkRefused as e:
                if e.retry_after_s is None:  # the fleet says it will not come: no use asking again
                    raise UpdateRejected(f"{kind} download stopped: {e}") from e
                log.warning("update %s: %s (attempt %d)", update_id, e, attempt)
                refused = e
                await asyncio.sleep(min(e.retry_after_s, MAX_RETRY_WAIT_S))
                continue
            if chunk.total == total and chunk.offset == offset:
                return chunk
            # Maybe a late answer to an earlier request (another payload or offset): ask again.
            misfit = chunk
        if misfit is not None:
            raise UpdateRejected(
                f"chunk at {offset} does not fit the signed size {total}: the fleet answered "
                f"{len(misfit.data)} bytes at {misfit.offset} of {misfit.total}"
            )
        said = f"; the fleet's last word: {refused}" if refused is not None else ""
        raise TimeoutError(
            f"download stalled: chunk at offset {offset} did not arrive after {CHUNK_ATTEMPTS} tries{said}"
        )

    def discard(self, update_id: str) -> None:
        for kind in KINDS:
            self.part(update_id, kind).unlink(missing_ok=True)


def verify_payload(payload: Path, size: int, sha256: str) -> None:
    """The whole payload against the signed size and sha256; a mismatch is deleted."""
    digest = hashlib.sha256()
    with payload.open("rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    if payload.stat().st_size != size or digest.hexdigest() != sha256:
        payload.unlink()
        raise UpdateRejected("downloaded payload does not match the signed sha256 and size; discarded")
