"""Fixtures shared by every test folder: sample packages, keys, and a real Mosquitto."""

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.procs import free_port
from fleet import broker_auth
from fleet.broker import ManagedBroker, find_mosquitto
from models.package import pack

ZOO = Path(__file__).resolve().parent.parent / "models" / "zoo" / "surface_defect"


@pytest.fixture(scope="session")
def zoo() -> Path:
    return ZOO


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The sample model's v1 and v2 as package archives."""
    out = tmp_path_factory.mktemp("archives")
    return {v: out / f"v{v}.tar" for v in (1, 2) if pack(ZOO / f"v{v}", out / f"v{v}.tar")}


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A writable copy of the v1 package folder."""
    return Path(shutil.copytree(ZOO / "v1", tmp_path / "pkg"))


@dataclass
class Broker:
    port: int
    passwords: dict[str, str]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto with the fleet's generated auth: the fleet user and devices dev-a, dev-b."""
    find_mosquitto()
    folder = tmp_path / "broker"
    folder.mkdir()
    passwords = {user: broker_auth.new_password() for user in (broker_auth.FLEET_USER, "dev-a", "dev-b")}
    (folder / "passwd").write_text(
        broker_auth.password_file({u: broker_auth.hash_password(p) for u, p in passwords.items()})
    )
    (folder / "acl").write_text(broker_auth.acl_file())
    broker = ManagedBroker(folder, "127.0.0.1", free_port(), folder / "passwd", folder / "acl")
    broker.start()
    try:
        yield Broker(broker.port, passwords)
    finally:
        broker.stop()
