"""The options of the API and the CLI: their types and values, checked in this one place.

Every public function taking keyword options is wrapped by :func:`checked`: an unknown
keyword raises :class:`~onnx_tools.errors.OptionTypeError` with the closest name ("did you
mean"), a value of the wrong type (``batch_size="64"``, ``batch_size=True``, ``seed=1.0``) an
``OptionTypeError`` naming the argument (never coerced), and a value out of range an
:class:`~onnx_tools.errors.OptionError`, before any work. The estimator and the prior strength
are checked by :func:`check_estimator` and :func:`check_prior_strength`.

Messages speak the language of the interface in use: argument names from Python
(``keep_partial``), flags from the command line (``--keep-partial``), which sets
:func:`cli_interface` around a command; :func:`arg` and :func:`setting` render a name.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np

import bnref
from onnx_tools.errors import OptionError, OptionTypeError

#: The ``provider`` values every function taking one accepts (see :mod:`onnx_tools.session`).
PROVIDERS = ("auto", "cuda", "cpu")

#: API argument -> the command-line flag that sets it (for messages in CLI terms).
CLI_FLAGS = {
    "batch_size": "--batch-size", "num_samples": "--num-samples", "estimator": "--estimator",
    "bessel": "--bessel", "provider": "--provider", "shuffle": "--shuffle", "seed": "--seed",
    "keep_partial": "--keep-partial", "include": "--include", "exclude": "--exclude",
    "shard": "--shard", "prefetch": "--no-prefetch", "in_place": "--in-place",
    "output": "--output", "prior_strength": "--prior-strength", "labels": "--labels",
    "data": "--data", "image_options.crop": "--image-crop",
    "image_options.resize": "--image-resize", "image_options.mode": "--image-mode",
    "image_options.scale": "--image-scale", "image_options.mean": "--image-mean",
    "image_options.std": "--image-std", "image_options.layout": "--image-layout",
    "image_options.threads": "--decode-threads",
    "image_options.skip_bad_images": "--skip-bad-images",
    "image_options.exif_transpose": "--image-exif-transpose",
    "image_options.jpeg_draft": "--no-jpeg-draft",
    "source": "--source", "bn_eps": "--bn-eps", "sites_include": "--sites-include",
    "sites_exclude": "--sites-exclude", "linear_sites": "--linear-sites", "cache_dir": "--cache-dir",
}

_CLI = [False]  # set by cli_interface() around a command-line run


@contextlib.contextmanager
def cli_interface() -> Iterator[None]:
    """Within: messages name command-line flags instead of API arguments."""
    previous, _CLI[0] = _CLI[0], True
    try:
        yield
    finally:
        _CLI[0] = previous


def arg(name: str) -> str:
    """``name`` as the interface in use spells it: ``keep_partial`` or ``--keep-partial``."""
    return CLI_FLAGS.get(name, name) if _CLI[0] else name


def setting(name: str, value: object) -> str:
    """Setting ``name`` to ``value``, as the user would write it: ``prefetch=False``, ``--no-prefetch``."""
    if not _CLI[0] or name not in CLI_FLAGS:
        return f"{name}={value!r}"
    return CLI_FLAGS[name] if isinstance(value, bool) else f"{CLI_FLAGS[name]} {value}"


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)


def _is_bool(v: object) -> bool:
    return isinstance(v, bool | np.bool_)


def _is_shard(v: object) -> bool:
    return isinstance(v, tuple | list) and len(v) == 2 and all(_is_int(x) for x in v)


def _is_path(v: object) -> bool:
    return isinstance(v, str | os.PathLike)


def _is_image_options(v: object) -> bool:
    # By name: onnx_tools.data imports this module (no import cycle).
    return type(v).__name__ == "ImageOptions" and type(v).__module__.startswith("onnx_tools.")


#: Argument name -> (type test, what it must be). None is allowed where the default is None.
TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "batch_size": (_is_int, "an integer"),
    "num_samples": (_is_int, "an integer"),
    "seed": (_is_int, "an integer"),
    "estimator": (lambda v: isinstance(v, str), "a string"),
    "provider": (lambda v: isinstance(v, str), "a string"),
    "include": (lambda v: isinstance(v, str), "a string (a regular expression)"),
    "exclude": (lambda v: isinstance(v, str), "a string (a regular expression)"),
    "bessel": (_is_bool, "True or False"),
    "shuffle": (_is_bool, "True or False"),
    "keep_partial": (_is_bool, "True or False"),
    "prefetch": (_is_bool, "True or False"),
    "progress": (lambda v: v is None or _is_bool(v), "True, False or None"),
    "in_place": (_is_bool, "True or False"),
    "prior_strength": (_is_real, "a number"),
    "shard": (_is_shard, "a pair of integers (I, K)"),
    "image_options": (_is_image_options, "an onnx_tools.data.ImageOptions"),
    "output": (lambda v: _is_path(v) or type(v).__name__ == "OutputPath", "a path"),
    "what": (lambda v: isinstance(v, str), "a string"),
    "input_path": (_is_path, "a path"),
    "like": (lambda v: type(v).__name__ == "LoadedModel", "an onnx_tools.LoadedModel"),
    "labels": (lambda v: _is_path(v) or isinstance(v, np.ndarray | list | tuple),
               "a path or an array of integer labels"),
    "reads": (lambda v: type(v).__name__ == "RunReads", "an onnx_tools.reads.RunReads"),
    "bn_eps": (_is_real, "a number"),
    "sites_include": (lambda v: isinstance(v, str), "a string (a regular expression)"),
    "sites_exclude": (lambda v: isinstance(v, str), "a string (a regular expression)"),
    "linear_sites": (_is_bool, "True or False"),
    "waves": (_is_bool, "True or False"),
    "cache_dir": (_is_path, "a path"),
    "source": (lambda v: _is_path(v) or isinstance(v, np.ndarray | Mapping | list | tuple)
               or hasattr(v, "get_next") or hasattr(v, "batches"),
               "source data: a path, an array, a mapping of arrays or a list of feeds"),
}

#: Argument name -> (test, what it must be) of its value, once its type is right.
VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "num_samples": (lambda v: v >= 1, "at least 1"),
    "seed": (lambda v: v >= 0, "a non-negative integer"),
    "provider": (lambda v: v in PROVIDERS, f"one of {', '.join(PROVIDERS)}"),
    "shard": (lambda v: 0 <= v[0] < v[1], "I/K with 0 <= I < K"),
    "bn_eps": (lambda v: 0 < v < float("inf"), "a finite number > 0"),
}


def type_name(value: object) -> str:
    """``'64' (str)``: the value and its type, for messages."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_option(function: str, name: str, value: object, *, nullable: bool) -> None:
    """Refuse ``value`` for argument ``name`` of ``function`` if its type or value is wrong."""
    if value is None and nullable:
        return
    test, what = TYPES.get(name, (None, ""))
    if test is not None and not test(value):
        raise OptionTypeError(f"{function}(): {name} must be {what}"
                              f"{' or None' if nullable else ''}, got {type_name(value)}")
    check_value = VALUES.get(name)
    if check_value is not None and not check_value[0](value):
        raise OptionError(f"{arg(name)} must be {check_value[1]}, got {value!r}")


F = TypeVar("F", bound=Callable[..., Any])


def checked(extra: Callable[..., Any] | None = None) -> Callable[[F], F]:
    """Decorate a public function: its keyword options are checked (see the module docstring).

    ``extra``: a function whose keyword-only options this one passes on through ``**kwargs``
    (``recalibrate`` passes ``collect``'s); they are checked here too, before any work.
    """

    def decorate(func: F) -> F:
        sig = inspect.signature(func)
        params = dict(sig.parameters)
        if extra is not None:
            params.update((n, p) for n, p in inspect.signature(extra).parameters.items()
                          if p.kind is inspect.Parameter.KEYWORD_ONLY)
        options = {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        positional = [n for n, p in sig.parameters.items()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                    inspect.Parameter.POSITIONAL_OR_KEYWORD)]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check_keywords(func.__name__, kwargs, [*positional[len(args):], *options])
            for name, value in kwargs.items():
                if name in options:
                    check_option(func.__name__, name, value,
                                 nullable=options[name].default is None)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def check_estimator(estimator: str, bessel: bool | None = None) -> str:
    """Return ``estimator`` if it is one of :data:`bnref.ESTIMATORS` and fits ``bessel``.

    Bessel's correction belongs to the population estimator only: ``mean_of_variances``
    already averages unbiased batch variances, so ``bessel=True`` with it is refused rather
    than silently ignored.
    """
    if estimator not in bnref.ESTIMATORS:
        raise OptionError(f"unknown {arg('estimator')} {estimator!r}; expected "
                          f"{', '.join(bnref.ESTIMATORS)}")
    if bessel and estimator != "population":
        raise OptionError(
            f"{arg('bessel')} applies only to the population estimator; {estimator} already "
            "averages unbiased batch variances"
        )
    return estimator


def check_keywords(function: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse keyword arguments ``function`` does not take, naming it (and the closest match)."""
    allowed = list(allowed)
    for name in given:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptionTypeError(f"{function}() got an unexpected keyword argument {name!r}{hint}")


def check_prior_strength(prior_strength: float | None) -> float | None:
    """Return the prior strength ``N0`` (None: no prior) if it is a finite number >= 0."""
    if prior_strength is None:
        return None
    if not _is_real(prior_strength):
        raise OptionTypeError(f"prior_strength must be a number or None, got "
                              f"{type_name(prior_strength)}")
    value = float(prior_strength)
    if not math.isfinite(value) or value < 0:
        raise OptionError(f"{arg('prior_strength')} must be a finite number >= 0, got "
                          f"{prior_strength!r}")
    return value



def _is_ints(value: object) -> bool:
    return _is_int(value) or isinstance(value, tuple | list) and all(_is_int(v) for v in value)


def _reals(value: object) -> bool:
    return isinstance(value, tuple | list | np.ndarray) and all(_is_real(v) for v in value)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


_SIDE = (lambda v: _is_int(v) and v >= 1, "a positive integer")
_FLAG = (_is_bool, "True or False", lambda v: True, "")

#: ImageOptions field -> (kind test, kind, value test, value), for a value other than None.
IMAGE_FIELDS: dict[str, tuple[Callable[[Any], bool], str, Callable[[Any], bool], str]] = {
    "crop": (_is_ints, "an integer or (height, width)",
             lambda v: all(x >= 1 for x in (v if isinstance(v, tuple | list) else (v,)))
             and (_is_int(v) or len(v) == 2), "a positive integer or (height, width)"),
    "resize": (_is_int, "an integer", *_SIDE),
    "threads": (_is_int, "an integer", *_SIDE),
    "mode": (_is_str, "a string", lambda v: v in ("RGB", "L"), "'RGB' or 'L'"),
    "layout": (_is_str, "a string", lambda v: v in ("NCHW", "NHWC"), "'NCHW' or 'NHWC'"),
    "scale": (_is_real, "a number", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "mean": (_reals, "a sequence of numbers",
             lambda v: len(v) > 0 and all(math.isfinite(x) for x in v), "finite numbers"),
    "std": (_reals, "a sequence of numbers",
            lambda v: len(v) > 0 and all(math.isfinite(x) and x > 0 for x in v),
            "finite numbers > 0"),
    "extensions": (lambda v: isinstance(v, tuple | list) and all(_is_str(x) for x in v),
                   "a sequence of file suffixes", lambda v: True, ""),
    "recursive": _FLAG, "exif_transpose": _FLAG, "skip_bad_images": _FLAG, "jpeg_draft": _FLAG,
}


def check_image_options(options: object) -> None:
    """Refuse an ``ImageOptions`` field of the wrong type or value, naming it.

    A value not of the field's kind (a string for ``scale``) is an :class:`OptionTypeError`;
    one of the right kind out of range (``scale=0``, a NaN mean) an :class:`OptionError`,
    named as the interface in use spells it (``--image-scale``).
    """
    for name, (kind, kind_what, valid, valid_what) in IMAGE_FIELDS.items():
        value = getattr(options, name)
        if value is None and name not in ("scale", "extensions", *_BOOL_FIELDS):
            continue
        if not kind(value):
            raise OptionTypeError(f"ImageOptions(): {name} must be {kind_what}, got "
                                  f"{type_name(value)}")
        if not valid(value):
            raise OptionError(f"{arg('image_options.' + name)} must be {valid_what}, got "
                              f"{value!r}")


_BOOL_FIELDS = ("recursive", "exif_transpose", "skip_bad_images", "jpeg_draft")
