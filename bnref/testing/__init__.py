"""Test *your* BatchNorm against the oracle: hypothesis strategies, tolerances and a harness.

Typical use, in another project's test suite::

    import numpy as np
    import bnref.testing as bt
    from bnref.conventions import PYTORCH

    def my_train(x, scale, bias, running_mean, running_var, *, eps, momentum, axis):
        ...  # your BN in training mode
        return y, new_running_mean, new_running_var

    def test_my_bn():
        bt.check_batch_norm(bt.BatchNormImpl(train=my_train), PYTORCH, dtype=np.float32)

``check_batch_norm`` runs hypothesis over shapes, layouts and per-channel scales spanning up to
six orders of magnitude (so eps placement and the Bessel factor are visible), compares every
quantity with bnref, and on failure raises ``Mismatch`` (an ``AssertionError``) naming the
quantity, the channel, the worst element and the case (hypothesis adds the falsifying example).
It takes your current hypothesis profile (only ``deadline`` is set to None, and
``max_examples`` where you pass it) and saves failures to its example database.

Or draw the cases in your own ``@given`` test, with your own settings::

    from hypothesis import given, settings

    @settings(max_examples=200)
    @given(case=bt.bn_cases(np.float16))
    def test_my_bn_float16(case):
        bt.check_case(bt.BatchNormImpl(train=my_train, eval=my_eval, backward=my_backward),
                      PYTORCH, case)   # tolerance from case.x.dtype; raises bt.Mismatch

hypothesis then shrinks, prints and saves the falsifying example as for any of your tests
(``@reproduce_failure`` with ``print_blob=True``), and replays it first on the next run.

Every drawn case stays in range for its dtype: float16 cases keep y, the running statistics
(any convention, any momentum), dx, dscale and dbias finite and out of the subnormals, so a
correct float16 implementation (float32 arithmetic, rounded once) passes under every
convention (``ranges``: the bounds and their derivation).
bfloat16 (``ml_dtypes.bfloat16``, e.g. ``bn_cases(ml_dtypes.bfloat16)``) works the same way:
its range is float32's, so its cases keep the default std range, and its tolerance is
float16's ``k`` = 8 over bfloat16's eps 2**-7 (6.3e-2 of the natural scale): a correct
bfloat16 implementation (float32 arithmetic, rounded to bfloat16) passes under every convention.

Where each part lives:

* ``bnref.testing.strategies`` — ``shapes_and_axes``, ``bn_cases`` and the ``BNCase`` they draw.
* ``bnref.testing.ranges``     — ``std_range``: the per-dtype bounds ``bn_cases`` draws within.
* ``bnref.testing.tolerances`` — ``Tolerance`` (its table of ``k`` per dtype), the natural
  scale of each quantity, ``assert_within`` and its ``Mismatch``, ``output_scale``.
* ``bnref.testing.check``      — ``BatchNormImpl``, ``check_case``, ``check_batch_norm``.

Every name is importable from ``bnref.testing`` itself.
"""

from bnref.testing.check import (
    BackwardFn,
    BatchNormImpl,
    EvalFn,
    TrainFn,
    check_batch_norm,
    check_case,
)
from bnref.testing.ranges import std_range
from bnref.testing.strategies import BNCase, bn_cases, shapes_and_axes
from bnref.testing.tolerances import Mismatch, Tolerance, assert_within, output_scale

__all__ = [
    "Tolerance",
    "Mismatch",
    "assert_within",
    "output_scale",
    "BNCase",
    "shapes_and_axes",
    "bn_cases",
    "std_range",
    "TrainFn",
    "EvalFn",
    "BackwardFn",
    "BatchNormImpl",
    "check_case",
    "check_batch_norm",
]
