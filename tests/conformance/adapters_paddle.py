"""PaddlePaddle's BatchNorms as ``bnref.testing.BatchNormImpl`` (run inside a worker, ``.venv-paddle``).

``paddle.nn.functional.batch_norm`` updates the running-statistics tensors it is given in place;
``paddle.nn.BatchNorm1D/2D/3D`` keep them as ``_mean``/``_variance``. Channels at axis 1 use the
channels-first layouts (NC, NCL, NCHW, NCDHW), the last axis the channels-last ones (NLC, NHWC,
NDHWC); any other axis is moved to 1. Momentum in Paddle's meaning (the running value's weight).
"""

from __future__ import annotations

import numpy as np

from bnref.testing import BatchNormImpl

_FIRST = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
_LAST = {3: "NLC", 4: "NHWC", 5: "NDHWC"}


def _layout(x, axis):
    """(array, data_format, back): channels first or last as Paddle names them."""
    ax = axis % x.ndim
    if ax == x.ndim - 1 and x.ndim in _LAST:
        return x, _LAST[x.ndim], lambda a: a
    if ax == 1:
        return x, _FIRST[x.ndim], lambda a: a
    return np.ascontiguousarray(np.moveaxis(x, ax, 1)), _FIRST[x.ndim], lambda a: np.moveaxis(a, 1, ax)


def _t(a, grad=False):
    import paddle

    t = paddle.to_tensor(np.ascontiguousarray(a))
    t.stop_gradient = not grad
    return t


def functional(use_global_stats: bool | None = None) -> BatchNormImpl:
    """``paddle.nn.functional.batch_norm`` (``use_global_stats`` passed through)."""
    import paddle.nn.functional as F

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        xl, fmt, back = _layout(x, axis)
        rm_t, rv_t = _t(rm.copy()), _t(rv.copy())
        y = F.batch_norm(_t(xl), rm_t, rv_t, _t(scale), _t(bias), training=True, momentum=momentum,
                         epsilon=eps, data_format=fmt, use_global_stats=use_global_stats)
        return back(y.numpy()), rm_t.numpy(), rv_t.numpy()

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        xl, fmt, back = _layout(x, axis)
        y = F.batch_norm(_t(xl), _t(mean), _t(var), _t(scale), _t(bias), training=False,
                         epsilon=eps, data_format=fmt)
        return back(y.numpy())

    def backward(x, scale, bias, dy, *, eps, axis):
        xl, fmt, back = _layout(x, axis)
        xt, st, bt = _t(xl, True), _t(scale, True), _t(bias, True)
        y = F.batch_norm(xt, _t(np.zeros_like(scale)), _t(np.ones_like(scale)), st, bt, training=True,
                         epsilon=eps, data_format=fmt)
        y.backward(_t(_layout(dy, axis)[0]))
        return back(xt.grad.numpy()), st.grad.numpy(), bt.grad.numpy()

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


def _module(x, fmt, scale, bias, rm, rv, eps, momentum):
    import paddle

    cls = {2: paddle.nn.BatchNorm1D, 3: paddle.nn.BatchNorm1D, 4: paddle.nn.BatchNorm2D,
           5: paddle.nn.BatchNorm3D}[x.ndim]
    m = cls(scale.shape[0], momentum=momentum, epsilon=eps, data_format=fmt)
    if x.dtype == np.float64:
        m = m.to(dtype="float64")
    m.weight.set_value(scale)
    m.bias.set_value(bias)
    m._mean.set_value(rm)
    m._variance.set_value(rv)
    return m


def module() -> BatchNormImpl:
    """``paddle.nn.BatchNorm1D/2D/3D`` chosen by rank, parameters and statistics set from the case."""
    import paddle

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        xl, fmt, back = _layout(x, axis)
        m = _module(xl, fmt, scale, bias, rm, rv, eps, momentum)
        m.train()
        with paddle.no_grad():
            y = m(_t(xl))
        return back(y.numpy()), m._mean.numpy(), m._variance.numpy()

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        xl, fmt, back = _layout(x, axis)
        m = _module(xl, fmt, scale, bias, mean, var, eps, 0.9)
        m.eval()
        with paddle.no_grad():
            return back(m(_t(xl)).numpy())

    def backward(x, scale, bias, dy, *, eps, axis):
        xl, fmt, back = _layout(x, axis)
        m = _module(xl, fmt, scale, bias, np.zeros_like(scale), np.ones_like(scale), eps, 0.9)
        m.train()
        xt = _t(xl, True)
        m(xt).backward(_t(_layout(dy, axis)[0]))
        return back(xt.grad.numpy()), m.weight.grad.numpy(), m.bias.grad.numpy()

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


def defaults() -> dict:
    """``BatchNorm2D``'s default momentum, epsilon and data format."""
    import paddle

    bn = paddle.nn.BatchNorm2D(3)
    return {"momentum": bn._momentum, "epsilon": bn._epsilon, "data_format": bn._data_format}


def updates(*xs, momentum: float = 0.9):
    """``BatchNorm2D``'s running statistics after each of several training calls."""
    import paddle

    bn = paddle.nn.BatchNorm2D(xs[0].shape[1], momentum=momentum)
    bn.train()
    means, variances = [], []
    for x in xs:
        with paddle.no_grad():
            bn(_t(x))
        means.append(bn._mean.numpy().copy())
        variances.append(bn._variance.numpy().copy())
    return np.stack(means), np.stack(variances)


def dtype_refused(dtype: str) -> str:
    """The error ``batch_norm`` raises on the CPU for ``dtype`` (``""`` when it runs)."""
    import paddle
    import paddle.nn.functional as F

    x = paddle.to_tensor(np.ones((4, 3), np.float32)).astype(dtype)
    try:
        F.batch_norm(x, paddle.zeros([3]), paddle.ones([3]), training=True)
    except Exception as e:  # noqa: BLE001 - the message is the answer
        return str(e).splitlines()[0]
    return ""
