"""The MQTT topic tree, versioned: `edgefleet/v1/<device-id>/...`.

What a device publishes lives directly under its id; what it receives lives under `cmd/`.
A broker ACL of `pattern readwrite edgefleet/v1/%u/#` therefore confines a device to its own subtree.
"""

import re

PREFIX = "edgefleet/v1"
FLEET_SHARE_GROUP = "edgefleet-fleet"
_DEVICE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

# Leaf names of the device's subtree.
STATE = "state"  # retained online/offline, set by the Last Will on an unclean disconnect
HEALTH = "health"  # readable live summary, QoS 0, for dashboards on the broker side
TELEMETRY = "telemetry"  # sealed records from the device's durable outbox, QoS 1
UPDATE_STATUS = "update/status"
CHUNK_REQUEST = "update/chunk-req"
METADATA_REQUEST = "update/meta-req"  # a TUF metadata file, by name
CMD_UPDATE = "cmd/update"
CMD_CHUNK = "cmd/chunk"
CMD_ROLLBACK = "cmd/rollback"  # go back to the version the other slot holds
CMD_METADATA = "cmd/meta"  # the file asked for, as a chunk frame named after it (total 0: no such file)
CMD_TELEMETRY_ACK = "cmd/telemetry-ack"  # the fleet's end-to-end receipt for sealed records
CMD_KEYS = "cmd/keys"  # the fleet's keys document changed: refresh TUF metadata


def is_valid_device_id(device_id: str) -> bool:
    """Device ids are lowercase and topic-safe: no `/`, `+`, `#` or `$` can reach the topic tree."""
    return bool(_DEVICE_ID.match(device_id))


def require_device_id(device_id: str) -> str:
    if not is_valid_device_id(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: use 1-63 characters of a-z, 0-9, '-' or '_', "
            "starting with a letter or digit"
        )
    return device_id


def device_topic(device_id: str, leaf: str) -> str:
    return f"{PREFIX}/{require_device_id(device_id)}/{leaf}"


def all_devices(leaf: str) -> str:
    """The wildcard filter for one leaf across every device."""
    return f"{PREFIX}/+/{leaf}"


def shared(topic_filter: str, group: str = FLEET_SHARE_GROUP) -> str:
    """An MQTT 5 shared subscription, so several fleet workers split the messages of one filter."""
    return f"$share/{group}/{topic_filter}"


def split_device_topic(topic: str) -> tuple[str, str]:
    """Return (device_id, leaf) for a topic in the tree; raise ValueError for anything else."""
    prefix = PREFIX + "/"
    if not topic.startswith(prefix):
        raise ValueError(f"topic {topic!r} is outside {PREFIX}/")
    device_id, _, leaf = topic[len(prefix) :].partition("/")
    if not leaf or not is_valid_device_id(device_id):
        raise ValueError(f"topic {topic!r} does not name a device and a leaf")
    return device_id, leaf
