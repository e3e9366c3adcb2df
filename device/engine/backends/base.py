"""The interface every backend implements: say whether it can run a model here, load it, run it."""

from pathlib import Path
from typing import Protocol

import numpy as np

from device.engine.probe import HardwareProfile
from models.manifest import Manifest

Tensors = dict[str, np.ndarray]


class LoadedModel(Protocol):
    # Engine calls worth having in flight at once when requests are not grouped: more than 1 only
    # where the runtime runs concurrent calls and fills the cores better with them.
    calls_in_flight: int

    def run(self, inputs: Tensors) -> Tensors:
        """Run one batch; inputs are already checked against the manifest."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def unavailable_reason(self, profile: HardwareProfile, manifest: Manifest) -> str | None:
        """None when this backend can run `manifest` on this machine, else why not."""
        ...

    def load(self, model_path: Path, manifest: Manifest, profile: HardwareProfile) -> LoadedModel: ...
