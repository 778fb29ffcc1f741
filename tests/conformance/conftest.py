"""The session-wide conformance matrix: tests record into it, the session writes it to JSON.

Set ``BNREF_CONFORMANCE_JSON=path`` (``scripts/make_conformance.py`` does) to keep the results;
otherwise they are only asserted.
"""

import os

import pytest

from tests.conformance._lib import JSON_ENV, Matrix


@pytest.fixture(scope="session")
def matrix():
    m = Matrix()
    yield m
    path = os.environ.get(JSON_ENV)
    if path:
        m.dump(path)


def _worker(name, **env):
    from tests.conformance.remote import start_worker

    w = start_worker(name, {"TF_CPP_MIN_LOG_LEVEL": "3", **env})
    yield w
    w.close()


@pytest.fixture(scope="session")
def tf_worker():
    """TensorFlow 2.21, tf-keras 2 and Keras 3 on the TensorFlow backend (``.venv-tf``)."""
    yield from _worker("tf", KERAS_BACKEND="tensorflow")


@pytest.fixture(scope="session")
def keras_torch_worker():
    """Keras 3 on the torch backend, in the main environment (the backend is fixed per process)."""
    import importlib.util

    # find_spec, not import: importing keras here would fix this process's backend
    missing = [m for m in ("torch", "keras") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"Keras on torch needs {missing} in this environment")
    yield from _worker("main", KERAS_BACKEND="torch")


@pytest.fixture(scope="session")
def paddle_worker():
    """PaddlePaddle 3 (``.venv-paddle``)."""
    yield from _worker("paddle")


@pytest.fixture(scope="session")
def mxnet_worker():
    """MXNet 1.9.1 with numpy < 2 (``.venv-mxnet``)."""
    yield from _worker("mxnet")
