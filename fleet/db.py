"""The fleet's tables (SQLAlchemy 2.0). SQLite in one file by default; the same models run on PostgreSQL.

Schema changes will go through Alembic migrations once there is a deployed schema to migrate.
"""

import time
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, UniqueConstraint, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}  # noqa: RUF012 (SQLAlchemy reads it off the class)


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[float] = mapped_column(default=time.time)
    mqtt_password_hash: Mapped[str] = mapped_column(String(256))
    online: Mapped[bool] = mapped_column(default=False)
    last_seen: Mapped[float | None] = mapped_column(default=None)
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    last_health: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    health_seq: Mapped[int] = mapped_column(default=-1)
    public_key: Mapped[str | None] = mapped_column(String(512), default=None)  # pinned on first sight


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int]
    path: Mapped[str] = mapped_column(String(1024))
    manifest: Mapped[dict[str, Any]]
    created: Mapped[float] = mapped_column(default=time.time)


class Update(Base):
    """One model version offered to one device, and where it stands."""

    __tablename__ = "updates"
    __table_args__ = (Index("ix_updates_device", "device_id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    state: Mapped[str] = mapped_column(String(32), default="pending")
    reason: Mapped[str] = mapped_column(String(2048), default="")
    created: Mapped[float] = mapped_column(default=time.time)
    updated: Mapped[float] = mapped_column(default=time.time)
    offer: Mapped[dict[str, Any]]


class UpdateEvent(Base):
    __tablename__ = "update_events"
    __table_args__ = (Index("ix_events_update", "update_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    update_id: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(2048), default="")
    ts: Mapped[float]
    received: Mapped[float] = mapped_column(default=time.time)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class TelemetryRecordRow(Base):
    """One opened telemetry record; (device, seq) is unique, which is what drops duplicates."""

    __tablename__ = "telemetry"
    __table_args__ = (
        UniqueConstraint("device_id", "seq"),
        Index("ix_telemetry_device_kind", "device_id", "kind"),
        Index("ix_telemetry_kind_received", "kind", "received"),  # the retention's age pass
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int]
    kind: Mapped[str] = mapped_column(String(16))
    ts: Mapped[float]
    received: Mapped[float] = mapped_column(default=time.time)
    body: Mapped[dict[str, Any]]


def open_database(url_or_path: str | Path) -> sessionmaker[Any]:
    url = str(url_or_path)
    if "://" not in url:
        url = f"sqlite:///{url}"
    # The API's threads and the MQTT worker write concurrently; wait for a lock instead of failing.
    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    # Their tables live on the same Base; importing the modules registers them.
    from fleet import enrollment, field_tokens, rollout_db  # noqa: F401

    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _sqlite_pragmas(connection: Any, _: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


__all__ = [
    "Base",
    "Device",
    "Engine",
    "ModelVersion",
    "TelemetryRecordRow",
    "Update",
    "UpdateEvent",
    "open_database",
]
