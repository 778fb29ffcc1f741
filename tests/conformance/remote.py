"""Run a framework in the Python of its own virtual environment, driven from this test process.

TensorFlow, PaddlePaddle and MXNet each need packages that cannot share one environment with
the rest (MXNet 1.9.1 needs numpy < 2, paddle2onnx pins onnx <= 1.17, Keras fixes its backend
per process), so the live tests start one ``python -m tests.conformance.worker`` per
environment and call functions in it. A call names ``module:function`` (a module of
``tests.conformance``), sends arrays and JSON keyword arguments, and gets arrays (or JSON) back.
Arrays travel as ``.npz`` (no pickle, so NumPy 1 and 2 read each other); bfloat16 travels as its
uint16 bits. This module imports only NumPy and the standard library: the worker uses it too.

Where each environment's Python is: ``BNREF_PYTHON_<NAME>`` (e.g. ``BNREF_PYTHON_TF``), else
``.venv-<name>/bin/python`` in the repository (``make test-reference`` creates them). Missing:
the tests skip, unless ``BNREF_REQUIRE_REFERENCE=1`` (``make test-reference``) makes it an error.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
REQUIRE_ENV = "BNREF_REQUIRE_REFERENCE"


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:  # a worker environment without ml_dtypes has no bfloat16 either
        return None
    return np.dtype(ml_dtypes.bfloat16)


def encode(arrays, meta: dict) -> bytes:
    """``arrays`` (a sequence) and JSON ``meta`` as one length-prefixed ``.npz`` message."""
    bf16 = _bfloat16()
    payload, dtypes = {}, []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if bf16 is not None and a.dtype == bf16:
            dtypes.append("bfloat16")
            a = a.view(np.uint16)
        else:
            dtypes.append(a.dtype.str)
        payload[f"a{i}"] = a
    payload["meta"] = np.asarray(json.dumps(dict(meta, dtypes=dtypes)))
    buf = io.BytesIO()
    np.savez(buf, **payload)
    data = buf.getvalue()
    return struct.pack("<Q", len(data)) + data


def read_message(stream) -> tuple[list[np.ndarray], dict] | None:
    """The next message on a binary stream: ``(arrays, meta)``, or None at its end."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = json.loads(z["meta"].item())
        arrays = []
        for i, dt in enumerate(meta.pop("dtypes")):
            a = z[f"a{i}"]
            arrays.append(a.view(_bfloat16()) if dt == "bfloat16" else a)
    return arrays, meta


def python_for(name: str) -> Path:
    """The Python of environment ``name``: ``BNREF_PYTHON_<NAME>``, else ``.venv-<name>`` in the
    repository; ``"main"`` is this process's own Python (another process, another backend)."""
    env = os.environ.get(f"BNREF_PYTHON_{name.upper()}")
    if env:
        return Path(env)
    return Path(sys.executable) if name == "main" else ROOT / f".venv-{name}" / "bin" / "python"


class WorkerError(RuntimeError):
    """The function raised in the worker; the message holds the worker's traceback."""


class Worker:
    """One ``tests.conformance.worker`` process in environment ``name``; ``call`` runs a function."""

    def __init__(self, name: str, env: dict | None = None) -> None:
        self.name = name
        self.python = python_for(name)
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        full_env.pop("PYTHONHOME", None)
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "tests.conformance.worker"],
            cwd=ROOT, env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self.versions = self.call("worker:versions")

    def call(self, func: str, *arrays, **kwargs):
        """Run ``tests.conformance.<module>.<function>(*arrays, **kwargs)`` in the worker.

        Returns what it returned: one array, a tuple of arrays, or JSON (a dict or list).
        """
        self.proc.stdin.write(encode(arrays, {"func": func, "kwargs": kwargs}))
        self.proc.stdin.flush()
        msg = read_message(self.proc.stdout)
        if msg is None:
            raise WorkerError(f"the {self.name} worker ({self.python}) exited with code {self.proc.wait()}")
        out, meta = msg
        if "error" in meta:
            raise WorkerError(f"{func} failed in the {self.name} worker:\n{meta['error']}")
        if "json" in meta:
            return meta["json"]
        return out[0] if meta.get("single") else tuple(out)

    def close(self) -> None:
        """End the worker (closing its input ends its loop)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_worker(name: str, env: dict | None = None):
    """A ``Worker`` for ``name``, or ``pytest.skip`` (an error under ``BNREF_REQUIRE_REFERENCE=1``)
    when that environment is missing."""
    import pytest

    py = python_for(name)
    if not py.exists():
        msg = f"no Python for the {name!r} environment at {py} (make test-reference creates it)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {msg}")
        pytest.skip(msg)
    return Worker(name, env)


def remote_impl(worker: Worker, builder: str, **builder_kwargs):
    """A ``bnref.testing.BatchNormImpl`` whose calls run ``builder(**builder_kwargs)``'s in ``worker``.

    ``builder`` is ``module:function`` returning a ``BatchNormImpl`` in the worker; the parts it
    lacks are answered with ``None`` by ``worker:impl_parts`` and left out here.
    """
    from bnref.testing import BatchNormImpl

    parts = worker.call("worker:impl_parts", builder=builder, builder_kwargs=builder_kwargs)

    def part(name):
        def run(*arrays, **kwargs):
            return worker.call("worker:impl_call", *arrays, builder=builder,
                               builder_kwargs=builder_kwargs, method=name, kwargs=kwargs)

        return run if name in parts else None

    return BatchNormImpl(train=part("train"), eval=part("eval"), backward=part("backward"))

