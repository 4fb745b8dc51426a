"""The emitter: a fixed sequence of named stages, each ModelProto → ModelProto."""
from onnxflex.emit.qdq import STAGES, emit

__all__ = ["STAGES", "emit"]
