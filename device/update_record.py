"""The update journal's record: how far the last update (or commanded rollback) got, and what it needs
to resume after a crash. Written atomically by the updater before every side effect.
"""

from dataclasses import dataclass, field
from typing import Any

from protocol.messages import UpdateMetadata, UpdateState

ROLLBACK_FORMAT = "slot-rollback"  # UpdateMetadata.format of a record that installs nothing new


@dataclass
class UpdateRecord:
    update: UpdateMetadata  # as verified against the fleet's TUF targets (a rollback: the slot it goes to)
    state: UpdateState = UpdateState.IDLE
    reason: str = ""
    target_slot: str | None = None  # the slot the update writes and switches to (a rollback: leaves)
    previous_slot: str | None = None  # the slot serving before, the one a rollback returns to
    chunk_size: int = 256 * 1024
    history: list[dict[str, Any]] = field(default_factory=list)
    switch_windows: list[tuple[float, float]] = field(default_factory=list)
    # Set while the proven model waits before the switch (`{"waiting_for": ...}`), so a restart waits too.
    waiting_for: dict[str, Any] | None = None
    # True from just before the new slot's model is loaded until it is proven: found True at boot, the
    # agent died loading it, which counts as one failed start of the model.
    loading: bool = False
    failed_starts: int = 0  # in a row; a start that proved the model resets it
    # Restarts while verifying or applying that sent the update back to its download: bounded, so a
    # payload that kills the agent as it is unpacked fails instead of looping.
    resumes: int = 0

    @property
    def update_id(self) -> str:
        return self.update.update_id

    @property
    def is_rollback(self) -> bool:
        return self.update.format == ROLLBACK_FORMAT

    def to_json(self) -> dict[str, Any]:
        return {
            "update": self.update.model_dump(mode="json"),
            "state": self.state.value,
            "reason": self.reason,
            "target_slot": self.target_slot,
            "previous_slot": self.previous_slot,
            "chunk_size": self.chunk_size,
            "history": self.history,
            "switch_windows": [list(w) for w in self.switch_windows],
            "waiting_for": self.waiting_for,
            "loading": self.loading,
            "failed_starts": self.failed_starts,
            "resumes": self.resumes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "UpdateRecord":
        return cls(
            # Journals written before TUF wrapped the metadata with its signature.
            update=UpdateMetadata.model_validate(data["update"].get("metadata", data["update"])),
            state=UpdateState(data["state"]),
            reason=data.get("reason", ""),
            target_slot=data.get("target_slot"),
            previous_slot=data.get("previous_slot"),
            chunk_size=int(data.get("chunk_size", 256 * 1024)),
            history=list(data.get("history", [])),
            switch_windows=[(float(s), float(e)) for s, e in data.get("switch_windows", [])],
            waiting_for=data.get("waiting_for"),
            loading=bool(data.get("loading", False)),
            failed_starts=int(data.get("failed_starts", 0)),
            resumes=int(data.get("resumes", 0)),
        )
