"""The worker protocol that runs frameworks in their own environments (``remote``, ``worker``),
checked with a worker in this very environment (NumPy only, so it runs everywhere)."""

import ml_dtypes
import numpy as np
import pytest

from tests.conformance.remote import Worker, WorkerError


@pytest.fixture(scope="module")
def worker():
    w = Worker("main")
    yield w
    w.close()


def test_arrays_round_trip_exactly(worker):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 3)).astype(dt) for dt in (np.float64, np.float32, np.float16)]
    arrays.append(rng.standard_normal(5).astype(ml_dtypes.bfloat16))  # sent as its uint16 bits
    back = worker.call("worker:echo", *arrays)
    assert len(back) == 4
    for a, b in zip(arrays, back, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8))
    single = worker.call("worker:echo", arrays[0])
    assert isinstance(single, np.ndarray)
    assert worker.call("worker:echo", *arrays, as_json=True) == ["float64", "float32", "float16", "bfloat16"]


def test_errors_come_back_and_the_worker_goes_on(worker):
    with pytest.raises(WorkerError, match="echo was asked to fail"):
        worker.call("worker:echo", np.zeros(1), fail=True)
    with pytest.raises(WorkerError, match="AttributeError"):
        worker.call("worker:no_such_function")
    assert worker.call("worker:echo", np.ones(2)).tolist() == [1.0, 1.0]
    assert worker.versions["numpy"] == np.__version__
