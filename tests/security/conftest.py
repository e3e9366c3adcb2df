"""A fleet TUF repository, the wire to a device, and the device's client, all real and in one process."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from device.tuf_client import TufClient, bootstrap
from fleet.tuf_repository import Expiries, KeyPolicy, TufRepository
from tests.security.tuf_harness import Wire

TARGET = "surface_defect/2.tar"


@dataclass
class World:
    repo: TufRepository
    wire: Wire
    device_dir: Path
    archive: Path

    def client(self, **kwargs: object) -> TufClient:
        kwargs.setdefault("retry_delay_s", 0.0)
        return TufClient(self.device_dir, self.wire, **kwargs)  # type: ignore[arg-type]


MakeWorld = Callable[..., World]


@pytest.fixture
def make_world(tmp_path: Path, archives: dict[int, Path]) -> MakeWorld:
    """A repository holding the sample model v2 and a device enrolled with its root."""

    def make(policy: KeyPolicy | None = None, expiries: Expiries | None = None) -> World:
        repo = TufRepository(
            tmp_path / "fleet" / "tuf", tmp_path / "fleet" / "secrets" / "tuf", expiries=expiries
        )
        repo.init(policy)
        repo.add_target(archives[2], TARGET, {"model": "surface_defect", "version": 2, "format": "onnx"})
        wire = Wire(repo)
        wire.put_target(TARGET, archives[2].read_bytes())
        device_dir = tmp_path / "device"
        bootstrap(device_dir, repo.trusted_root())
        return World(repo, wire, device_dir, archives[2])

    return make


@pytest.fixture
def world(make_world: MakeWorld) -> World:
    return make_world()
