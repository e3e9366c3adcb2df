import shutil
from pathlib import Path

import pytest

from device.engine.engine import Engine
from device.engine.probe import probe
from device.slots import install_initial


@pytest.fixture(scope="session")
def engine_profile():  # type: ignore[no-untyped-def]
    return probe()


@pytest.fixture
def engine(engine_profile) -> Engine:  # type: ignore[no-untyped-def]
    return Engine(engine_profile)


@pytest.fixture
def data_dir(tmp_path: Path, archives: dict[int, Path]) -> Path:
    """A data dir with v1 installed in slot a."""
    root = tmp_path / "data"
    (root / "models").mkdir(parents=True)
    install_initial(root / "models", archives[1])
    return root


@pytest.fixture
def v2_folder(tmp_path: Path, zoo: Path) -> Path:
    return Path(shutil.copytree(zoo / "v2", tmp_path / "v2"))
