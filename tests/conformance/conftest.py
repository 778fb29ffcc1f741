"""The session-wide conformance matrix: tests record into it, the session writes it to JSON.

Set ``BNREF_CONFORMANCE_JSON=path`` (``scripts/make_conformance.py`` does) to keep the results;
otherwise they are only asserted. The worker fixtures (``tf_worker``, ``paddle_worker``, ...) are
in ``workers``, registered for the whole suite by ``tests/conftest.py``.
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

