"""MXNet 1.9.1's BatchNorm as ``bnref.testing.BatchNormImpl`` (run inside a worker, ``.venv-mxnet``).

The ``BatchNorm`` operator (``mx.nd.BatchNorm``, what ``mx.sym.BatchNorm`` and gluon's
``nn.BatchNorm`` run) with ``fix_gamma=False`` (the operator's default ``True`` ignores gamma),
updating its ``moving_mean``/``moving_var`` inputs in place in training mode. CPU only.
"""

from __future__ import annotations

import numpy as np

from bnref.testing import BatchNormImpl


def _nd(a):
    import mxnet as mx

    return mx.nd.array(np.ascontiguousarray(a), dtype=a.dtype)


def operator() -> BatchNormImpl:
    """``mx.nd.BatchNorm(fix_gamma=False)`` under ``autograd.record(train_mode=...)``.

    MXNet updates the moving statistics in the *backward* pass (measured: a training-mode
    forward alone leaves them unchanged), so ``train`` runs a backward too.
    """
    import mxnet as mx
    from mxnet import autograd

    def params(x, *arrays):  # float16 data takes float32 gamma, beta and statistics
        p = np.float32 if x.dtype == np.float16 else x.dtype
        return [_nd(a.astype(p)) for a in arrays]

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        g, b, mm, mv = params(x, scale, bias, rm, rv)
        xs = _nd(x)
        xs.attach_grad()
        with autograd.record(train_mode=True):
            y = mx.nd.BatchNorm(xs, g, b, mm, mv, eps=eps, momentum=momentum, fix_gamma=False,
                                axis=axis % x.ndim)
        out = y.asnumpy()
        y.backward(mx.nd.ones_like(y))
        return out, mm.asnumpy(), mv.asnumpy()

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        g, b, mm, mv = params(x, scale, bias, mean, var)
        with autograd.predict_mode():
            y = mx.nd.BatchNorm(_nd(x), g, b, mm, mv, eps=eps, fix_gamma=False, axis=axis % x.ndim)
        return y.asnumpy()

    def backward(x, scale, bias, dy, *, eps, axis):
        g, b, mm, mv = params(x, scale, bias, np.zeros_like(scale), np.ones_like(scale))
        xs = _nd(x)
        for t in (xs, g, b):
            t.attach_grad()
        with autograd.record(train_mode=True):
            y = mx.nd.BatchNorm(xs, g, b, mm, mv, eps=eps, fix_gamma=False, axis=axis % x.ndim)
        y.backward(_nd(dy))
        return xs.grad.asnumpy(), g.grad.asnumpy(), b.grad.asnumpy()

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


def forward_only_update(x):
    """Moving statistics after a training-mode forward with no backward (they stay at 0 and 1)."""
    import mxnet as mx
    from mxnet import autograd

    c = x.shape[1]
    mm, mv = mx.nd.zeros(c, dtype=x.dtype), mx.nd.ones(c, dtype=x.dtype)
    with autograd.record(train_mode=True):
        mx.nd.BatchNorm(_nd(x), mx.nd.ones(c, dtype=x.dtype), mx.nd.zeros(c, dtype=x.dtype), mm, mv,
                        fix_gamma=False).wait_to_read()
    return mm.asnumpy(), mv.asnumpy()


def defaults() -> dict:
    """Defaults of gluon's ``nn.BatchNorm`` and of the operator (``mx.sym``/``mx.nd``)."""
    import inspect

    from mxnet import gluon

    bn = gluon.nn.BatchNorm()
    doc = inspect.getdoc(gluon.nn.BatchNorm) or ""
    op_doc = __import__("mxnet").nd.BatchNorm.__doc__
    return {"gluon": {k: bn._kwargs[k] for k in ("axis", "eps", "momentum", "fix_gamma")},
            "gluon_doc_ok": "epsilon" in doc,
            "operator_doc": [ln.strip() for ln in op_doc.splitlines()
                             if ln.strip().startswith(("eps :", "momentum :", "fix_gamma :", "axis :"))]}


def gluon_updates(*xs, momentum: float = 0.9):
    """gluon ``nn.BatchNorm``'s running statistics after each of several training-mode calls."""
    import mxnet as mx
    from mxnet import autograd, gluon

    bn = gluon.nn.BatchNorm(momentum=momentum, in_channels=xs[0].shape[1])
    bn.initialize()
    means, variances = [], []
    for x in xs:
        with autograd.record(train_mode=True):
            y = bn(mx.nd.array(x, dtype=x.dtype))
        y.backward()  # the moving statistics move in the backward pass
        means.append(bn.running_mean.data().asnumpy().copy())
        variances.append(bn.running_var.data().asnumpy().copy())
    return np.stack(means), np.stack(variances)
