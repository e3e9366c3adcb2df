"""Message schemas for every JSON payload on the topic tree.

Every model forbids unknown fields, so a message from a newer or a broken peer fails loudly
instead of being half-understood. `decode` is the one entry point for untrusted bytes.
"""

import json
import math
import time
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.errors import ProtocolError

# No JSON message of the protocol comes near this; anything bigger is hostile or broken.
MAX_JSON_PAYLOAD = 256 * 1024

ModelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpdateState(StrEnum):
    """The device's update state machine (see docs/architecture.md)."""

    IDLE = "idle"
    OFFERED = "offered"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    APPLYING = "applying"
    STAGED = "staged"
    TESTING = "testing"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (UpdateState.COMMITTED, UpdateState.ROLLED_BACK, UpdateState.FAILED)


class DeviceState(Message):
    """Retained on `<id>/state`; the Last Will publishes the offline form."""

    device_id: str
    online: bool
    agent_version: str = ""
    ts: float = Field(default_factory=time.time)
    # The device's Ed25519 public key (PEM) that signs its sealed telemetry; the fleet pins the first
    # one it sees over the device's authenticated broker session.
    public_key: str | None = Field(default=None, max_length=512)


class ModelHealth(Message):
    name: str
    version: int
    slot: str
    backend: str
    inferences: int = 0
    errors: int = 0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    latency_ms_p99: float | None = None


# Caps on the lists a Health carries. A Health at every cap stays far below MAX_JSON_PAYLOAD
# (tests/protocol/test_health_message.py builds one); the device truncates to them, never fails.
HEALTH_MAX_MODELS = 64
HEALTH_MAX_LINKS = 32
HEALTH_MAX_ADDRESSES = 16
HEALTH_MAX_TEMPERATURES = 64
HEALTH_MAX_GPUS = 16
HEALTH_MAX_POWER_RAILS = 16
HEALTH_NAME_MAX = 64

HealthName = Annotated[str, Field(min_length=1, max_length=HEALTH_NAME_MAX)]
Counter64 = Annotated[int, Field(ge=0)]


class LoadAverage(Message):
    """The kernel's run-queue averages over 1, 5 and 15 minutes; `cpus` to read them against."""

    load1: float = Field(ge=0)
    load5: float = Field(ge=0)
    load15: float = Field(ge=0)
    cpus: int | None = Field(default=None, ge=1)


class Temperature(Message):
    """One sensor: a thermal zone's `type`, or `<hwmon chip>/<label or tempN>`."""

    sensor: HealthName
    celsius: float = Field(ge=-273.15, le=1000)
    source: Literal["thermal", "hwmon"]


class LinkHealth(Message):
    """One network link as netlink reports it; counters are the kernel's 64-bit totals since boot."""

    name: str = Field(min_length=1, max_length=15)  # IFNAMSIZ - 1
    operstate: str = Field(max_length=16)
    mac: str | None = Field(default=None, max_length=64)
    mtu: int | None = Field(default=None, ge=0)
    rx_bytes: Counter64 = 0
    tx_bytes: Counter64 = 0
    rx_packets: Counter64 = 0
    tx_packets: Counter64 = 0
    rx_errors: Counter64 = 0
    tx_errors: Counter64 = 0
    rx_dropped: Counter64 = 0
    tx_dropped: Counter64 = 0
    # "address/prefixlen", IPv4 and IPv6.
    addresses: list[Annotated[str, Field(max_length=64)]] = Field(default=[], max_length=HEALTH_MAX_ADDRESSES)


class GpuHealth(Message):
    """One GPU. On a Jetson (`tegrastats`) the GPU shares system RAM, so `memory_*` are RAM's figures."""

    index: int = Field(ge=0)
    name: str = Field(max_length=96)
    source: Literal["nvidia-smi", "tegrastats"]
    utilization_percent: float | None = Field(default=None, ge=0, le=100)
    memory_used_bytes: int | None = Field(default=None, ge=0)
    memory_total_bytes: int | None = Field(default=None, ge=0)
    memory_shared: bool = False
    temperature_c: float | None = Field(default=None, ge=-273.15, le=1000)
    power_w: float | None = Field(default=None, ge=0)
    clock_mhz: float | None = Field(default=None, ge=0)


class PowerRail(Message):
    """A power monitor's rail (a Jetson's INA3221 channels as tegrastats names them)."""

    name: HealthName
    milliwatts: float = Field(ge=0)
    average_milliwatts: float | None = Field(default=None, ge=0)


class Health(Message):
    """A device's health snapshot, every `health_interval_s`.

    It goes two ways. The sealed copy (telemetry outbox, HPKE to the fleet) carries every field and is
    the one the fleet stores. The plain copy on `edgefleet/v1/<id>/health` (QoS 0) is readable by
    whoever may read the device's subtree on the broker, so that broker-side dashboards (Grafana's
    MQTT source, Node-RED, mosquitto_sub) can chart a device without the fleet's key: it is
    `broker_view()`, which is everything except each link's `addresses` and `mac`. Nothing in Health
    is a secret (no credentials, no keys, no payload data); the addresses are left out of the plain copy
    because they map the plant's network, which dashboards do not need (operstate and counters suffice)
    and the fleet has anyway.

    Every field added after the first release has a default, so a Health from an older agent parses.
    """

    device_id: str
    seq: int = Field(ge=0)
    ts: float
    uptime_s: float
    cpu_percent: float
    memory_percent: float
    disk_free_bytes: int
    disk_percent: float
    models: list[ModelHealth] = Field(default=[], max_length=HEALTH_MAX_MODELS)
    update_state: UpdateState = UpdateState.IDLE
    telemetry_pending: int = 0
    telemetry_evicted: dict[str, int] = {}
    # Absent (None / empty) where the source is not on the machine or failed this time.
    load: LoadAverage | None = None
    temperatures: list[Temperature] = Field(default=[], max_length=HEALTH_MAX_TEMPERATURES)
    links: list[LinkHealth] = Field(default=[], max_length=HEALTH_MAX_LINKS)
    gpus: list[GpuHealth] = Field(default=[], max_length=HEALTH_MAX_GPUS)
    power_rails: list[PowerRail] = Field(default=[], max_length=HEALTH_MAX_POWER_RAILS)

    def broker_view(self) -> "Health":
        """The copy for the plain health topic: links without their addresses and MAC."""
        links = [link.model_copy(update={"addresses": [], "mac": None}) for link in self.links]
        return self.model_copy(update={"links": links})


class TelemetryRecord(Message):
    """The plaintext inside a sealed telemetry envelope."""

    kind: Literal["health", "metric"]
    ts: float
    body: dict[str, Any]


class TelemetryAck(Message):
    """The fleet's receipt: these seqs are stored (or were already), or were refused for good.

    The device deletes a record from its outbox only on this receipt, not on the broker's PUBACK.
    """

    stored: list[int] = Field(default=[], max_length=10_000)
    refused: list[int] = Field(default=[], max_length=10_000)
    # Sealed to a fleet key the fleet no longer holds (rotated away): the device refreshes the keys
    # document and sends these again, re-sealed; they stay in its outbox meanwhile.
    rekey: list[int] = Field(default=[], max_length=10_000)


class KeysNotice(Message):
    """Sent by the fleet on `<id>/cmd/keys` when its keys document changed (a key rotated, a field
    token revoked): the device refreshes its TUF metadata now rather than at its next periodic
    refresh. It carries no key; the signed document is the only source of those."""

    serial: int = Field(ge=1)


class DeltaPayload(Message):
    """The same update, smaller: the new package as per-file deltas against the version named here.

    A device whose active package's manifest.json hashes to `base_manifest_sha256` may fetch this
    instead of the whole package; the rebuilt package's manifest.json must hash to
    `manifest_sha256` (and the manifest names every file's sha256), so the result is as well
    pinned as the whole package. The fleet's TUF targets carry the same three hashes.
    """

    base_version: int = Field(ge=1)
    base_manifest_sha256: Sha256Hex
    sha256: Sha256Hex
    size: int = Field(gt=0)
    manifest_sha256: Sha256Hex


class UpdateMetadata(Message):
    """An update as the fleet offers it: which model version, and the bytes of its payloads.

    The offer is not trusted by itself: before acting on it the device refreshes the fleet's TUF
    metadata and requires every field here to match the signed targets `<model>/<version>.tar`
    (and `<model>/deltas/<from>-<to>.efd` for the delta). Freshness, expiry and rollback
    protection come from TUF's timestamp, snapshot and targets roles.
    """

    update_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    model_name: ModelName
    version: int = Field(ge=1)
    format: str = "package-tar"
    sha256: Sha256Hex
    size: int = Field(gt=0)
    created: float
    delta: DeltaPayload | None = None


MAX_SWITCH_WINDOWS = 256
SwitchWindow = tuple[float, float]


class UpdateOffer(Message):
    """Published by the fleet on `<id>/cmd/update`.

    `switch_windows` are `[start, end)` pairs in UTC epoch seconds, computed by the fleet from the
    device's maintenance windows: outside all of them the device downloads, verifies, applies and
    proves the model, then waits before the switch. Empty (or absent) means any time. They are not
    part of the signed targets: a forged window can only delay or hasten a switch the signed
    metadata already allows.
    """

    update: UpdateMetadata
    chunk_size: int = Field(default=256 * 1024, ge=1024, le=4 * 1024 * 1024)
    switch_windows: list[SwitchWindow] = Field(default=[], max_length=MAX_SWITCH_WINDOWS)

    @field_validator("switch_windows")
    @classmethod
    def _windows_are_intervals(cls, windows: list[SwitchWindow]) -> list[SwitchWindow]:
        for start, end in windows:
            if not (math.isfinite(start) and math.isfinite(end)) or end <= start:
                raise ValueError(f"switch window [{start}, {end}] must be finite with end > start")
        return sorted(windows)


class RollbackCommand(Message):
    """Published by the fleet on `<id>/cmd/rollback`: serve again the version the other slot holds.

    A rollback installs nothing new: the inactive slot still holds the package that was active
    before the last update, verified again before the switch. The device answers with an
    `UpdateStatus` under `request_id`: `rolled_back`, or `failed` with the reason (e.g. the other
    slot holds another version).
    """

    request_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    model_name: ModelName
    to_version: int = Field(ge=1)
    reason: str = Field(default="", max_length=1024)


class MetadataRequest(Message):
    """Published by the device on `<id>/update/meta-req`: one TUF metadata file, by name."""

    name: str = Field(pattern=r"^([0-9]{1,10}\.)?(root|timestamp|snapshot|targets)\.json$")


class ChunkRequest(Message):
    """Published by the device on `<id>/update/chunk-req`; the fleet answers on `<id>/cmd/chunk`."""

    update_id: str = Field(min_length=1, max_length=64)
    offset: int = Field(ge=0)
    length: int = Field(gt=0, le=4 * 1024 * 1024)
    payload: Literal["package", "delta"] = "package"


class UpdateStatus(Message):
    """Published by the device on `<id>/update/status` at every transition, with the reason."""

    device_id: str
    update_id: str
    model_name: str
    version: int
    state: UpdateState
    reason: str = ""
    ts: float = Field(default_factory=time.time)
    detail: dict[str, Any] = {}


M = TypeVar("M", bound=BaseModel)


def decode(model: type[M], payload: bytes | bytearray | str, *, topic: str | None = None) -> M:
    """Parse untrusted bytes into `model`; any problem becomes a ProtocolError naming what was wrong."""
    if len(payload) > MAX_JSON_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_JSON_PAYLOAD}", topic=topic)
    try:
        raw = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"not valid JSON ({e})", topic=topic) from e
    except RecursionError as e:
        raise ProtocolError("JSON nested too deeply", topic=topic) from e
    if not isinstance(raw, dict):
        raise ProtocolError(f"expected a JSON object, got {type(raw).__name__}", topic=topic)
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise ProtocolError(f"not a valid {model.__name__} ({problems})", topic=topic) from e


def encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()
