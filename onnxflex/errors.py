"""Typed errors. Every message says what went wrong, where, and how to fix it.

Each class carries the exit code the CLI ends with when it reaches the top (onnxflex.exits lists
them all): bad input of any kind is 2, as click's usage errors are; an emitted model that fails
verification is a failed check, 1. Anything else that escapes a command is an internal error, 3.
"""


class OnnxflexError(Exception):
    """Base class of every error onnxflex raises on purpose: bad input, exit code 2."""

    exit_code = 2


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


class ClusterError(OnnxflexError):
    """The Ray cluster at --ray-address cannot be reached, or refused this process."""


class VerificationError(OnnxflexError):
    """The emitted model failed a check it must pass: a failed check, exit code 1. ``result`` is the
    whole api.QuantResult when the model was built and only its comparison with the simulation failed
    (its report holds the figures), so that the caller can keep it (the CLI writes it as
    ``<output>.unverified.onnx``); None when there is no model worth keeping."""

    exit_code = 1

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


class OutputError(OnnxflexError):
    """The output path cannot be written, or writing it would destroy an input."""


class DiskSpaceError(OnnxflexError):
    """The disk holding a folder the run writes to has too little free space for it."""


class RegistryError(OnnxflexError, KeyError):
    """A registry name is unknown or registered twice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
