"""Errors raised by ``onnx_tools``.

Every problem caused by user input (model, data, options, files) raises a subclass of
:class:`BnrefOnnxError` that is also the built-in exception it is a kind of, so plain
``except ValueError`` / ``except OSError`` work:

* :class:`ModelError` (``ValueError``): the model is missing, corrupt or unsupported;
* :class:`DataError` (``ValueError``): calibration data cannot be read or does not fit;
* :class:`StatsError` (``ValueError``): a STATS file is corrupt, incompatible or foreign;
* :class:`OptionError` (``ValueError``): an argument has a value it cannot take;
* :class:`OptionTypeError` (``TypeError``): an argument has the wrong type, or is unknown;
* :class:`ProviderError` (``RuntimeError``): the requested execution provider cannot run;
* :class:`OutputError` (``OSError``): an output cannot be written, or would overwrite an
  input or another output.

Messages speak the interface's language: API arguments from Python (``batch_size``), flags
from the command line (``--batch-size``, see :func:`onnx_tools.options.arg`), which prints
them as ``bnref-onnx: error: ...`` with exit status 1 (``docs/errors.md`` lists them). :class:`Interrupted` (SIGINT/SIGTERM) is a
``KeyboardInterrupt``, not an ``Exception``: no ``except Exception`` on the way (a data
reader, a session run) can swallow it. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BnrefOnnxError(Exception):
    """Base class of all user-facing errors of ``bnref-onnx``."""


class ModelError(BnrefOnnxError, ValueError):
    """The model is missing, corrupt, unsupported, or has no usable BatchNormalization."""


class DataError(BnrefOnnxError, ValueError):
    """The calibration data cannot be read, does not fit the model, or is not finite."""


class StatsError(BnrefOnnxError, ValueError):
    """A STATS file is corrupt, incompatible with another, or belongs to another model."""


class ProviderError(BnrefOnnxError, RuntimeError):
    """The requested onnxruntime execution provider cannot run."""


class OutputError(BnrefOnnxError, OSError):
    """An output file cannot be written, or would overwrite an input or another output."""


class OptionError(BnrefOnnxError, ValueError):
    """An argument of the API (an option of the CLI) has a value it cannot take."""


class OptionTypeError(BnrefOnnxError, TypeError):
    """An argument of the API has the wrong type, or a keyword argument is unknown."""


class Interrupted(KeyboardInterrupt):  # noqa: N818 - the name reads as the event it is
    """The run was stopped by SIGINT or SIGTERM; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


def short_message(exc: BaseException, limit: int = 400) -> str:
    """``exc`` as one line of at most ``limit`` characters (onnxruntime's messages are long)."""
    text = " ".join(str(exc).split())
    return text if len(text) < limit else text[:limit] + "..."
