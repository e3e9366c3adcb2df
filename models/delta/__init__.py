"""Tensor-aware delta codec for model files (see docs/delta-format.md).

`encode` runs on the fleet; `apply` and `info` run anywhere, need no `onnx`, and stream.
"""

from models.delta.apply import DEFAULT_MAX_OUTPUT, apply, info
from models.delta.encode import DEFAULT_LEVEL, encode
from models.delta.errors import DeltaError
from models.delta.format import DeltaInfo

__all__ = ["DEFAULT_LEVEL", "DEFAULT_MAX_OUTPUT", "DeltaError", "DeltaInfo", "apply", "encode", "info"]
