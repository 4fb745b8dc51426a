"""Typed errors. Every message says what went wrong, where, and how to fix it.

The CLI maps any `OnnxflexError` to exit code 1; click's usage errors keep 2.
"""


class OnnxflexError(Exception):
    """Base class of every error onnxflex raises on purpose."""


class ConfigError(OnnxflexError, ValueError):
    """A configuration value is out of range or unknown."""


class ModelLoadError(OnnxflexError):
    """The model file is missing, unreadable or not a valid ONNX model."""


class UnsupportedModelError(OnnxflexError):
    """The model contains something onnxflex cannot quantize as asked."""


class CalibrationError(OnnxflexError):
    """Calibration data is missing or does not match the model's inputs."""


class DeviceError(OnnxflexError):
    """The requested compute device is not available."""


class VerificationError(OnnxflexError):
    """The emitted model failed a check it must pass."""


class RegistryError(OnnxflexError, KeyError):
    """A registry name is unknown or registered twice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
