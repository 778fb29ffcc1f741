"""issue 19 item 13: a check_batch_norm failure prints one reproduction that works from the call.

The advice is read from the failure's notes and run exactly as printed: the same
``check_batch_norm`` call with the printed ``reproduce=...`` literal added, under a profile
with no example database (so nothing can be replayed from a previous run), and it must fail
with the same message.
"""

from __future__ import annotations

import ast
import re

import numpy as np
import pytest
from hypothesis import settings

import bnref.testing as bt
from bnref.conventions import PYTORCH
from tests.test_testing_for_users import _user_bn

ADVICE = re.compile(r"^Reproduce this failure: add reproduce=('bnref-case:[^']*') to this "
                    r"check_batch_norm call\.$")


def _notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", []))


@pytest.fixture
def no_database():
    previous = settings.get_current_profile_name()
    settings.register_profile("bnref-no-db", parent=settings.get_profile(previous),
                              database=None, max_examples=30, print_blob=True)
    settings.load_profile("bnref-no-db")
    yield
    settings.load_profile(previous)


@pytest.mark.parametrize("mistake", ["momentum_flipped", "eps_outside_sqrt", "crash"])
def test_printed_reproduction_reproduces_the_failure(no_database, mistake):
    if mistake == "crash":  # an implementation that raises on some shapes, not a Mismatch
        def train(x, *args, **kwargs):
            if x.ndim > 2:
                raise RuntimeError(f"my kernel has no rank-{x.ndim} path")
            return _user_bn(PYTORCH).train(x, *args, **kwargs)
        impl, expected = bt.BatchNormImpl(train=train), RuntimeError
    else:
        impl, expected = _user_bn(PYTORCH, **{mistake: True}), bt.Mismatch
    with pytest.raises(expected) as first:
        bt.check_batch_norm(impl, PYTORCH, np.float32)
    advice = [m for n in _notes(first.value) if (m := ADVICE.match(n))]
    assert len(advice) == 1, _notes(first.value)
    # Exactly one reproduction: hypothesis's @reproduce_failure (which would replay an inner
    # function, not the caller's test) is not printed, even with print_blob=True.
    assert not any("reproduce_failure" in n for n in _notes(first.value)), _notes(first.value)
    literal = ast.literal_eval(advice[0].group(1))
    with pytest.raises(expected) as again:
        bt.check_batch_norm(impl, PYTORCH, np.float32, reproduce=literal)
    assert str(again.value) == str(first.value)


def test_reproduce_of_a_passing_implementation_passes_and_garbage_is_refused():
    from bnref.testing.check import decode_case, encode_case

    rng = np.random.default_rng(0)
    case = bt.BNCase(x=rng.normal(size=(4, 3, 2)).astype(np.float32),
                     scale=rng.uniform(0.5, 2, 3).astype(np.float32),
                     bias=rng.normal(size=3).astype(np.float32),
                     running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
                     dy=rng.normal(size=(4, 3, 2)).astype(np.float32), axis=1)
    back = decode_case(encode_case(case))
    for name in ("x", "scale", "bias", "running_mean", "running_var", "dy"):
        a, b = getattr(case, name), getattr(back, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert back.axis == case.axis
    bt.check_batch_norm(_user_bn(PYTORCH), PYTORCH, np.float32, reproduce=encode_case(case))
    with pytest.raises(ValueError, match="reproduce"):
        bt.check_batch_norm(_user_bn(PYTORCH), PYTORCH, np.float32, reproduce="@seed(3)")
