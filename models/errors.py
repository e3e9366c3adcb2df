"""Errors about model artifacts, split by who is at fault."""


class ModelError(Exception):
    """Base class of every error in `models`."""


class ManifestError(ModelError):
    """A manifest that is missing, not JSON, or outside the schema. The message names the field."""


class PackageError(ModelError):
    """A package whose files are missing, oversized, unsafe or do not match the manifest."""


class SignatureError(ModelError):
    """Metadata whose signature does not verify with a trusted key, or that has expired."""
