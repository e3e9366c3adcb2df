"""A small client of the fleet JSON API, used by the CLI and the demo."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx


class FleetApiError(RuntimeError):
    pass


class FleetClient:
    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise FleetApiError(f"fleet at {self._http.base_url} did not answer: {e}") from e
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = response.text
            raise FleetApiError(f"{method} {path} -> {response.status_code}: {detail}")
        return response.json()

    def add_device(self, device_id: str) -> dict[str, Any]:
        return dict(self._call("POST", "/api/devices", json={"device_id": device_id}))

    def new_token(self, device_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/devices/{device_id}/token"))

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/devices/{device_id}/revoke"))

    def certificates(self, device_id: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/api/devices/{device_id}/certificates"))

    def devices(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/devices"))

    def device(self, device_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/devices/{device_id}"))

    def telemetry(self, device_id: str, kind: str | None = None, limit: int = 100) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if kind:
            params["kind"] = kind
        return dict(self._call("GET", f"/api/devices/{device_id}/telemetry", params=params))

    def stats(self) -> dict[str, Any]:
        return dict(self._call("GET", "/api/fleet/stats"))

    def push_model(
        self,
        archive: Path,
        progress: Callable[[int, int], None] | None = None,
        block_size: int = 256 * 1024,
    ) -> dict[str, Any]:
        """Register a package archive, streamed in blocks so a large one never sits in memory.

        `progress(sent, total)` is called after each block went to the connection; `sent` grows to
        the file's size. The answer comes once the fleet has verified the whole package."""
        try:
            total = archive.stat().st_size
            f = archive.open("rb")
        except OSError as e:
            raise FleetApiError(f"cannot read the package archive {archive}: {e}") from e

        def blocks() -> Iterator[bytes]:
            sent = 0
            while sent < total:
                block = f.read(min(block_size, total - sent))
                if not block:  # the Content-Length promised more: the fleet would wait for it
                    raise FleetApiError(
                        f"{archive} shrank to {sent} bytes while it was sent; "
                        "push it again once it is complete"
                    )
                yield block
                sent += len(block)
                if progress is not None:
                    progress(sent, total)

        # Verifying a large package takes the fleet a while after the last byte: wait for its answer.
        base = self._http.timeout
        timeout = httpx.Timeout(
            connect=base.connect, read=max(base.read or 0.0, 600.0), write=base.write, pool=base.pool
        )
        with f:
            return dict(
                self._call(
                    "POST",
                    "/api/models",
                    content=blocks(),
                    # A length, not chunked encoding: some reverse proxies before a fleet refuse that.
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(total)},
                    timeout=timeout,
                )
            )

    def models(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/models"))

    def start_update(self, model_name: str, version: int, device_ids: list[str]) -> list[dict[str, Any]]:
        body = {"model_name": model_name, "version": version, "device_ids": device_ids}
        return list(self._call("POST", "/api/updates", json=body))

    def update(self, update_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/updates/{update_id}"))

    def updates(self, device_id: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/updates", params={"device_id": device_id} if device_id else None))

    def roll_back(self, device_id: str, model_name: str, to_version: int, reason: str = "") -> dict[str, Any]:
        body = {"model_name": model_name, "to_version": to_version, "reason": reason}
        return dict(self._call("POST", f"/api/devices/{device_id}/rollback", json=body))

    def set_labels(self, device_id: str, groups: list[str], tags: list[str]) -> dict[str, Any]:
        body = {"groups": groups, "tags": tags}
        return dict(self._call("PUT", f"/api/devices/{device_id}/labels", json=body))

    def start_rollout(
        self,
        model_name: str,
        version: int,
        target: dict[str, list[str]],
        phases: list[dict[str, Any]] | None = None,
        seed: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "model_name": model_name,
            "version": version,
            "target": target,
            "phases": phases,
            "seed": seed,
        }
        return dict(self._call("POST", "/api/rollouts", json=body))

    def rollouts(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/rollouts"))

    def rollout(self, campaign_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/rollouts/{campaign_id}"))

    def rollout_action(self, campaign_id: str, action: str, reason: str = "") -> dict[str, Any]:
        return dict(self._call("POST", f"/api/rollouts/{campaign_id}/{action}", json={"reason": reason}))

    def windows(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/maintenance-windows"))

    def add_window(self, group: str, cron: str, duration_minutes: int, tz: str) -> list[dict[str, Any]]:
        body = {"group": group, "cron": cron, "duration_minutes": duration_minutes, "tz": tz}
        return list(self._call("POST", "/api/maintenance-windows", json=body))

    def remove_window(self, window_id: int) -> None:
        try:
            response = self._http.request("DELETE", f"/api/maintenance-windows/{window_id}")
        except httpx.HTTPError as e:
            raise FleetApiError(f"fleet at {self._http.base_url} did not answer: {e}") from e
        if response.status_code >= 400:
            raise FleetApiError(f"DELETE window {window_id} -> {response.status_code}: {response.text}")

    def keys(self) -> dict[str, Any]:
        return dict(self._call("GET", "/api/keys"))

    def rotate_keys(self, **what: Any) -> dict[str, Any]:
        return dict(self._call("POST", "/api/keys/rotate", json=what))

    def issue_field_token(self, engineer: str, role: str, devices: list[str], hours: float) -> dict[str, Any]:
        body = {"engineer": engineer, "role": role, "devices": devices, "hours": hours}
        return dict(self._call("POST", "/api/field-tokens", json=body))

    def field_tokens(self, include_expired: bool = False) -> list[dict[str, Any]]:
        params = {"include_expired": "true"} if include_expired else None
        return list(self._call("GET", "/api/field-tokens", params=params))

    def revoke_field_token(self, jti: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/field-tokens/{jti}/revoke"))
