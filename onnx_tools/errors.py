"""Errors raised by ``onnx_tools``.

Every problem caused by user input (model, data, options, files) raises a subclass of
:class:`BnrefOnnxError`; the command line turns it into one line
``bnref-onnx: error: ...`` and exit status 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BnrefOnnxError(Exception):
    """Base class of all user-facing errors of ``bnref-onnx``."""


class ModelError(BnrefOnnxError):
    """The model is missing, corrupt, unsupported, or has no usable BatchNormalization."""


class DataError(BnrefOnnxError):
    """The calibration data cannot be read, does not fit the model, or is not finite."""


class StatsError(BnrefOnnxError):
    """A STATS file is corrupt, incompatible with another, or belongs to another model."""


class ProviderError(BnrefOnnxError):
    """The requested onnxruntime execution provider cannot run."""


class OutputError(BnrefOnnxError):
    """An output file cannot be written."""


class OptionError(BnrefOnnxError, ValueError):
    """An argument of the API (an option of the CLI) has a value it cannot take."""


class Interrupted(BnrefOnnxError):  # noqa: N818 - the name reads as the event it is
    """The run was stopped by SIGINT or SIGTERM; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def short_message(exc: BaseException, limit: int = 400) -> str:
    """``exc`` as one line of at most ``limit`` characters (onnxruntime's messages are long)."""
    text = " ".join(str(exc).split())
    return text if len(text) < limit else text[:limit] + "..."
