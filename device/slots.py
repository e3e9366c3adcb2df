"""A/B model slots: `a/` and `b/` per model and one `current` link swapped by rename.

The active slot always holds a complete, verified package; new versions are written only into
the inactive one, and become active in a single `os.replace` of the link.
"""

import shutil
from pathlib import Path

from device.atomic import replace_symlink
from device.errors import ConfigError
from models.manifest import Manifest
from models.package import unpack, verify_package

SLOTS = ("a", "b")


class ModelSlots:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.current = root / "current"

    @property
    def model_name(self) -> str:
        return self.root.name

    def exists(self) -> bool:
        return self.current.is_symlink()

    def active_slot(self) -> str:
        if not self.current.is_symlink():
            raise ConfigError(f"{self.root} has no active slot: provision the device with a model first")
        target = self.current.readlink().name
        if target not in SLOTS:
            raise ConfigError(f"{self.current} points at {target!r}, not a slot")
        return target

    def inactive_slot(self) -> str:
        return "b" if self.active_slot() == "a" else "a"

    def slot_dir(self, slot: str) -> Path:
        return self.root / slot

    def active_dir(self) -> Path:
        return self.slot_dir(self.active_slot())

    def active_manifest(self) -> Manifest:
        return verify_package(self.active_dir())

    def clear(self, slot: str) -> Path:
        """Empty a slot that is not active, ready to receive a package."""
        if self.exists() and slot == self.active_slot():
            raise ConfigError(f"refusing to clear the active slot {slot} of {self.model_name}")
        folder = self.slot_dir(slot)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def unpack_into(self, slot: str, archive: Path) -> Manifest:
        return unpack(archive, self.clear(slot))

    def activate(self, slot: str) -> None:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}")
        replace_symlink(self.current, slot)


def install_initial(models_dir: Path, archive: Path) -> Manifest:
    """Provisioning: put a package into slot `a` of a model that has no slots yet."""
    from models.package import read_archive_manifest

    name = read_archive_manifest(archive).name
    slots = ModelSlots(models_dir / name)
    if slots.exists():
        raise ConfigError(f"{name} is already installed in {slots.root}; updates go through the fleet")
    manifest = slots.unpack_into("a", archive)
    slots.activate("a")
    return manifest
