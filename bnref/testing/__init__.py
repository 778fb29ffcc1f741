"""Test *your* BatchNorm against the oracle: hypothesis strategies, tolerances and a harness.

Typical use, in another project's test suite::

    import bnref.testing as bt
    from bnref.conventions import PYTORCH

    def my_train(x, scale, bias, running_mean, running_var, *, eps, momentum, axis):
        ...  # your BN in training mode
        return y, new_running_mean, new_running_var

    def test_my_bn():
        bt.check_batch_norm(bt.BatchNormImpl(train=my_train), PYTORCH, dtype=np.float32)

``check_batch_norm`` runs hypothesis over shapes, layouts and per-channel scales spanning six
orders of magnitude (so eps placement and the Bessel factor are visible), compares every
quantity with bnref, and on failure raises ``AssertionError`` naming the quantity, the
channel, the worst element, and the falsifying example (hypothesis prints its reproduction).

Where each part lives:

* ``bnref.testing.strategies`` — ``shapes_and_axes``, ``bn_cases`` and the ``BNCase`` they draw.
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
    "TrainFn",
    "EvalFn",
    "BackwardFn",
    "BatchNormImpl",
    "check_case",
    "check_batch_norm",
]
