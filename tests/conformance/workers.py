"""The worker processes of the reference environments, as session-wide pytest fixtures.

Registered for the whole suite by ``tests/conftest.py`` (``pytest_plugins``), so that
``tests/conformance`` and ``tests/corpus/test_live_exports.py`` share one worker per
environment in a session instead of starting each twice. Each skips (an error under
``BNREF_REQUIRE_REFERENCE=1``) when its environment is missing (``remote.start_worker``).
"""

import pytest


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
