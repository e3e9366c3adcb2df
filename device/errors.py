"""Device-side errors, split by who is at fault."""


class DeviceError(Exception):
    """Base class of every device-side error."""


class ConfigError(DeviceError):
    """The device's configuration or data dir is missing or invalid; the message says what to fix."""


class UpdateRejected(DeviceError):
    """An update that failed a check (signature, hash, version, golden vectors). Nothing was installed."""


class EngineError(DeviceError):
    """The engine could not load or run a model."""


class NoBackendAvailable(EngineError):
    """No backend could load the model; `reasons` says why each was passed over."""

    def __init__(self, model: str, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        super().__init__(f"no backend can run {model}: {detail}")


class InferenceInputError(EngineError):
    """The caller's input does not match the model (name, shape or dtype). A 4xx, not the engine's fault."""


class GoldenTestFailed(EngineError):
    """A model gave outputs outside its golden vectors' tolerance, or missed its latency budget."""


class ChunkRefused(DeviceError):
    """The fleet answered that it cannot give a chunk of an update's payload (protocol/frames.py)."""

    def __init__(self, offset: int, reason: str, retry_after_s: float | None) -> None:
        self.offset, self.reason, self.retry_after_s = offset, reason, retry_after_s
        when = "it will not come" if retry_after_s is None else f"ask again in {retry_after_s:g} s"
        super().__init__(f"the fleet cannot give the chunk at offset {offset}: {reason} ({when})")
