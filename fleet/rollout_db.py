"""Tables of rollout campaigns, device labels and maintenance windows, on the fleet's one `Base`.

They live beside fleet/db.py instead of inside it so the campaign logic stays in one place; importing
this module registers them, so `open_database` creates them when it is imported first.
"""

import re
import time
from typing import Any, Literal

from sqlalchemy import JSON, ForeignKey, Index, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from fleet.db import Base, Device
from fleet.errors import InvalidRequest, NotFound

LabelKind = Literal["group", "tag"]
LABEL_KINDS: tuple[LabelKind, ...] = ("group", "tag")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class DeviceLabel(Base):
    """One group membership or one tag of a device; a device has any number of both."""

    __tablename__ = "device_labels"
    __table_args__ = (Index("ix_device_labels_value", "kind", "value"),)

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    value: Mapped[str] = mapped_column(String(64), primary_key=True)


class Campaign(Base):
    """One model version rolled out in phases to a resolved set of devices."""

    __tablename__ = "campaigns"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    # As the operator gave it ({"devices": [...], "groups": [...], "tags": [...]}); the resolved
    # devices are the CampaignDevice rows, fixed at creation so a relabel cannot move a running phase.
    target: Mapped[dict[str, Any]]
    phases: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    seed: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="running")
    current_phase: Mapped[int] = mapped_column(default=0)
    next_phase_at: Mapped[float] = mapped_column(default=0.0)  # a phase's hold delays the next one
    reason: Mapped[str] = mapped_column(String(2048), default="")
    created: Mapped[float] = mapped_column(default=time.time)
    updated: Mapped[float] = mapped_column(default=time.time)
    finished: Mapped[float | None] = mapped_column(default=None)


class CampaignDevice(Base):
    """A device's place in a campaign: its phase, the update it got, how that ended, what it ran before."""

    __tablename__ = "campaign_devices"
    __table_args__ = (
        Index("ix_campaign_devices_phase", "campaign_id", "phase_index", "position"),
        Index("ix_campaign_devices_update", "update_id"),
        Index("ix_campaign_devices_rollback_update", "rollback_update_id"),
    )

    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    phase_index: Mapped[int]  # -1: skipped, it already runs this version or a newer one
    position: Mapped[int]  # the seeded order; the first positions are the canaries
    update_id: Mapped[str | None] = mapped_column(String(64), default=None)
    outcome: Mapped[str | None] = mapped_column(String(32), default=None)
    outcome_at: Mapped[float | None] = mapped_column(default=None)
    installed_version: Mapped[int | None] = mapped_column(default=None)
    previous_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), default=None)
    agreement: Mapped[float | None] = mapped_column(default=None)
    p95_ms_old: Mapped[float | None] = mapped_column(default=None)
    p95_ms_new: Mapped[float | None] = mapped_column(default=None)
    # "" until a rollback; then "requested" (its previous version is to be offered), "awaiting" (still
    # updating: rolled back if it commits), "unavailable" (the fleet lacks its previous version), or the
    # rollback update's own end: committed, failed, rolled_back.
    rollback: Mapped[str] = mapped_column(String(16), default="")
    rollback_update_id: Mapped[str | None] = mapped_column(String(64), default=None)


class MaintenanceWindow(Base):
    """When a group's devices may switch to a new model: a cron start, a duration, a time zone."""

    __tablename__ = "maintenance_windows"
    __table_args__ = (Index("ix_maintenance_windows_group", "group_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    group_name: Mapped[str] = mapped_column(String(64))
    cron: Mapped[str] = mapped_column(String(128))
    duration_minutes: Mapped[int]
    tz: Mapped[str] = mapped_column(String(64))
    created: Mapped[float] = mapped_column(default=time.time)


def check_label(value: str) -> str:
    if not _LABEL.match(value):
        raise InvalidRequest(
            f"invalid label {value!r}: 1-64 characters, letters, digits, '.', '_', ':', '-', "
            "starting with a letter or digit"
        )
    return value


def set_labels(session: Session, device_id: str, groups: list[str], tags: list[str]) -> None:
    """Replace a device's groups and tags."""
    if session.get(Device, device_id) is None:
        raise NotFound(f"no device {device_id!r}")
    wanted = {("group", check_label(g)) for g in groups} | {("tag", check_label(t)) for t in tags}
    session.execute(delete(DeviceLabel).where(DeviceLabel.device_id == device_id))
    session.add_all(DeviceLabel(device_id=device_id, kind=k, value=v) for k, v in sorted(wanted))
    session.flush()


def labels_of(session: Session, device_id: str) -> dict[str, list[str]]:
    rows = session.scalars(
        select(DeviceLabel).where(DeviceLabel.device_id == device_id).order_by(DeviceLabel.value)
    )
    out: dict[str, list[str]] = {"groups": [], "tags": []}
    for row in rows:
        out["groups" if row.kind == "group" else "tags"].append(row.value)
    return out


def devices_labelled(session: Session, kind: LabelKind, values: list[str]) -> set[str]:
    """Ids of the devices carrying any of `values` as a label of `kind`."""
    if not values:
        return set()
    query = select(DeviceLabel.device_id).where(DeviceLabel.kind == kind, DeviceLabel.value.in_(values))
    return set(session.scalars(query))


__all__ = [
    "LABEL_KINDS",
    "Campaign",
    "CampaignDevice",
    "DeviceLabel",
    "LabelKind",
    "MaintenanceWindow",
    "check_label",
    "devices_labelled",
    "labels_of",
    "set_labels",
]
