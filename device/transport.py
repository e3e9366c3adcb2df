"""The one seam between the device's logic and the fleet: tests can put an in-memory fleet here."""

from typing import Protocol

from protocol.frames import Chunk
from protocol.messages import UpdateStatus


class FleetTransport(Protocol):
    async def publish_update_status(self, status: UpdateStatus) -> None:
        """Deliver a status to the fleet (queued while the link is down)."""
        ...

    async def fetch_chunk(
        self, update_id: str, offset: int, length: int, timeout: float, payload: str = "package"
    ) -> Chunk:
        """Ask the fleet for bytes [offset, offset+length) of an update's payload; raise TimeoutError,
        or ChunkRefused when the fleet answers that it cannot give them.

        `payload` is "package" (the whole package archive) or "delta" (the package delta).
        """
        ...
