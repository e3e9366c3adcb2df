"""Errors of the delta codec."""

from models.errors import ModelError


class DeltaError(ModelError):
    """A delta that is truncated, corrupt, over its limits, or built from another base file."""
