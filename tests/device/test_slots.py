from pathlib import Path

import pytest

from device.errors import ConfigError
from device.slots import ModelSlots, install_initial


def test_initial_install_goes_to_slot_a(data_dir: Path) -> None:
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    assert slots.active_slot() == "a" and slots.inactive_slot() == "b"
    assert slots.active_manifest().version == 1


def test_switch_is_one_rename(data_dir: Path, archives: dict[int, Path]) -> None:
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    assert slots.unpack_into("b", archives[2]).version == 2
    slots.activate("b")
    assert slots.active_slot() == "b" and slots.active_manifest().version == 2
    assert not list(slots.root.glob(".current*")), "no temporary link may remain"


def test_the_active_slot_is_never_cleared(data_dir: Path) -> None:
    slots = ModelSlots(data_dir / "models" / "surface-defect")
    with pytest.raises(ConfigError, match="active slot"):
        slots.clear("a")


def test_second_initial_install_is_refused(data_dir: Path, archives: dict[int, Path]) -> None:
    with pytest.raises(ConfigError, match="already installed"):
        install_initial(data_dir / "models", archives[2])
