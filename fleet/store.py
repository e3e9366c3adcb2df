"""The fleet's data dir: database, artifacts, keys and secrets, each in its own place."""

import secrets
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fleet.ca import FleetCA
from models.fsutil import write_private


class FleetDataDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.database = root / "fleet.sqlite"
        self.artifacts = root / "artifacts"  # the folder artifact store (fleet/artifacts.py)
        self.artifact_cache = root / "artifact-cache"  # the S3 store's local copies, bounded
        self.broker = root / "broker"
        self.secrets = root / "secrets"
        self.telemetry_key_path = self.secrets / "telemetry-x25519.pem"
        self.password_file = self.broker / "passwd"
        self.acl_file = self.broker / "acl"
        # The fleet CA: its key, certificate and CRL, and the broker's and workers' own certificates.
        self.ca_dir = self.secrets / "ca"

    def make_dirs(self) -> None:
        for folder in (self.root, self.artifacts, self.broker):
            folder.mkdir(parents=True, exist_ok=True)
        self.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)

    def telemetry_key(self) -> X25519PrivateKey:
        """The key devices seal telemetry to (HPKE); made on first start, kept 0600."""
        if not self.telemetry_key_path.exists():
            key = X25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            write_private(self.telemetry_key_path, pem)
        loaded = serialization.load_pem_private_key(self.telemetry_key_path.read_bytes(), password=None)
        if not isinstance(loaded, X25519PrivateKey):
            raise ValueError(f"{self.telemetry_key_path} is not an X25519 private key")
        return loaded

    def ca(self) -> FleetCA:
        """The fleet's CA, made on first use (keys 0600 under secrets/ca/)."""
        self.make_dirs()
        return FleetCA(self.ca_dir)

    def secret(self, name: str) -> str:
        """A generated secret, made on first use and kept 0600 in the data dir."""
        path = self.secrets / name
        if not path.exists():
            write_private(path, secrets.token_urlsafe(32).encode())
        return path.read_text().strip()
