"""The HTTP answer for each error the local API reports: `{"error": message}` with its status."""

from starlette.exceptions import HTTPException as StarletteHTTPException

from device.api.limits import BodyTooLarge, UnsupportedEncoding
from device.api.v2 import RequestSchemaError
from device.engine.batcher import Unavailable
from device.errors import EngineError, InferenceInputError

MAX_BODY_BYTES = 16 * 1024 * 1024
RETRY_AFTER_OVERLOAD_S = 1


def error_status(e: Exception) -> tuple[int, str, dict[str, str]] | None:
    """The HTTP status, message and headers for an error we answer; None for a bug (a plain 500)."""
    if isinstance(e, StarletteHTTPException):
        return e.status_code, str(e.detail), dict(e.headers or {})
    if isinstance(e, InferenceInputError):
        return 422 if isinstance(e, RequestSchemaError) else 400, str(e), {}
    if isinstance(e, Unavailable):  # a full queue, or a model being reconfigured or shut down
        return 503, str(e), {"Retry-After": str(RETRY_AFTER_OVERLOAD_S)}
    if isinstance(e, EngineError):
        return 500, str(e), {}  # the model failed, not the caller; other models keep serving
    if isinstance(e, BodyTooLarge):
        return 413, f"request body exceeds {MAX_BODY_BYTES} bytes", {}
    if isinstance(e, UnsupportedEncoding):
        return 415, str(e), {}
    return None
