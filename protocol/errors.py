"""Errors raised while decoding what arrives over the wire."""


class ProtocolError(ValueError):
    """A message or frame that does not follow the protocol; `reason` says what was wrong."""

    def __init__(self, reason: str, *, topic: str | None = None) -> None:
        self.reason = reason
        self.topic = topic
        where = f" on {topic}" if topic else ""
        super().__init__(f"malformed message{where}: {reason}")
