"""The device's local HTTP API for field engineers (FastAPI)."""

from device.api.app import create_app

__all__ = ["create_app"]
