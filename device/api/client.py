"""Calling a device's local API as a field engineer's tool does: HTTPS checked against the fleet CA,
with the device id as the expected host name, whatever address the device has on the plant network.

The device's certificate names its id (CN and DNS SAN; fleet/ca.py), so the TLS handshake is made
with SNI = the device id and the usual host-name check applies to it: a laptop pointed at the
wrong box, or at a box showing another device's certificate, is refused before a token is sent.
"""

import json
import ssl
from pathlib import Path
from typing import Any

import httpx


class LocalApi:
    def __init__(
        self,
        url: str,
        device_id: str,
        token: str,
        ca_file: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        """`url`: https://<address>:<port> (or http:// for a device serving without TLS, when
        `ca_file` is not needed). `token`: a field token or the device's break-glass credential."""
        self.url = url.rstrip("/")
        self.device_id = device_id
        verify: ssl.SSLContext | bool = True
        if self.url.startswith("https://"):
            if ca_file is None:
                raise ValueError("an https:// device API is checked against the fleet CA: give ca_file")
            verify = ssl.create_default_context(cafile=str(ca_file))
            verify.minimum_version = ssl.TLSVersion.TLSv1_2
        self._http = httpx.Client(
            base_url=self.url, verify=verify, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        extensions = {"sni_hostname": self.device_id} if self.url.startswith("https://") else None
        return self._http.request(method, path, extensions=extensions, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LocalApi":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def for_data_dir(root: Path, token: str | None = None) -> LocalApi:
    """A client of the agent running on this data dir (what the demo and tests use)."""
    url = (root / "api-url").read_text().strip()
    config = json.loads((root / "device.json").read_text())
    token = token if token is not None else (root / "secrets" / "api-token").read_text().strip()
    return LocalApi(url, config["device_id"], token, ca_file=root / "fleet-ca.pem")
