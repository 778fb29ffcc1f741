"""The process ``remote.Worker`` talks to: runs ``tests.conformance`` functions in this Python.

Started as ``python -m tests.conformance.worker`` with the repository on ``PYTHONPATH``, in the
virtual environment of one framework. Reads messages (``remote.encode``) on stdin, answers each
on stdout; a function's exception is sent back as its traceback and the loop goes on.
"""

from __future__ import annotations

import functools
import importlib
import json
import platform
import sys
import traceback

import numpy as np

from tests.conformance.remote import encode, read_message


def _resolve(name: str):
    module, _, func = name.partition(":")
    return getattr(importlib.import_module(f"tests.conformance.{module}"), func)


@functools.cache
def _impl(builder: str, builder_kwargs: str):
    return _resolve(builder)(**json.loads(builder_kwargs))


def impl_parts(*, builder: str, builder_kwargs: dict) -> list[str]:
    """Which of train/eval/backward ``builder(**builder_kwargs)`` provides."""
    impl = _impl(builder, json.dumps(builder_kwargs, sort_keys=True))
    return [p for p in ("train", "eval", "backward") if getattr(impl, p) is not None]


def impl_call(*arrays, builder: str, builder_kwargs: dict, method: str, kwargs: dict):
    """``builder(**builder_kwargs).<method>(*arrays, **kwargs)`` (the builder built once)."""
    impl = _impl(builder, json.dumps(builder_kwargs, sort_keys=True))
    return getattr(impl, method)(*arrays, **kwargs)


def echo(*arrays, fail: bool = False, as_json: bool = False):
    """The arrays back (one array alone, several as a tuple), their dtypes as JSON, or a
    ``ValueError``: what ``test_remote`` checks the protocol with."""
    if fail:
        raise ValueError("echo was asked to fail")
    if as_json:
        return [a.dtype.name for a in arrays]
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


def versions() -> dict:
    """Python, NumPy and the framework packages this environment has."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "numpy": np.__version__}
    for pkg in ("tensorflow-cpu", "tensorflow", "tf-keras", "keras", "torch", "paddlepaddle",
                "paddle2onnx", "mxnet", "onnx", "ml_dtypes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _answer(result) -> bytes:
    if isinstance(result, (dict, list, str)):
        return encode([], {"json": result})
    if isinstance(result, tuple):
        return encode([np.asarray(r) for r in result], {})
    return encode([np.asarray(result)], {"single": True})


def main() -> None:
    """Answer calls until stdin closes."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # frameworks' prints must not corrupt the message stream
    while (msg := read_message(stdin)) is not None:
        arrays, meta = msg
        try:
            reply = _answer(_resolve(meta["func"])(*arrays, **meta["kwargs"]))
        except Exception:  # noqa: BLE001 - every failure goes back to the test that called
            reply = encode([], {"error": traceback.format_exc()})
        stdout.write(reply)
        stdout.flush()


if __name__ == "__main__":
    main()
