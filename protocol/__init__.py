"""The device <-> fleet contract: MQTT topic names, message schemas and binary frames.

Imports nothing from `device` or `fleet`; both sides import this package.
"""

from protocol.errors import ProtocolError
from protocol.messages import (
    ChunkRequest,
    DeviceState,
    Health,
    ModelHealth,
    TelemetryAck,
    TelemetryRecord,
    UpdateMetadata,
    UpdateOffer,
    UpdateState,
    UpdateStatus,
    decode,
    encode,
)

__all__ = [
    "ChunkRequest",
    "DeviceState",
    "Health",
    "ModelHealth",
    "ProtocolError",
    "TelemetryAck",
    "TelemetryRecord",
    "UpdateMetadata",
    "UpdateOffer",
    "UpdateState",
    "UpdateStatus",
    "decode",
    "encode",
]
