"""Names of update payloads in the fleet's TUF targets: both sides derive them, neither sends them."""


def archive_target_name(model: str, version: int) -> str:
    """The whole package archive of `model` v`version`."""
    return f"{model}/{version}.tar"


def delta_target_name(model: str, from_version: int, to_version: int) -> str:
    """The package delta (models/package_delta.py) that turns v`from_version` into v`to_version`."""
    return f"{model}/deltas/{from_version}-{to_version}.pdelta"


# The fleet's keys document (fleet/keyring.py, protocol/keys_document.py). No model target can
# take this name: a model's targets are `<model>/<digits>.tar` and `<model>/deltas/...`.
KEYS_TARGET = "edgefleet/keys.json"
