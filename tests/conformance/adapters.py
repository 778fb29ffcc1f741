"""Each framework's BatchNorm wrapped as a ``bnref.testing.BatchNormImpl`` (NumPy in, NumPy out).

These are exactly what a user would write to test their own BN with ``bnref.testing``; the
conformance tests and ``tests/golden/generate.py`` share them. Frameworks are imported inside
the builders, so importing this module needs none of them.

Signatures (from ``bnref.testing.BatchNormImpl``):
``train(x, scale, bias, running_mean, running_var, *, eps, momentum, axis) -> (y, mean, var)``,
``eval(x, scale, bias, mean, var, *, eps, axis) -> y``,
``backward(x, scale, bias, dy, *, eps, axis) -> (dx, dscale, dbias)``; momentum in the
framework's own meaning.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from bnref.testing import BatchNormImpl

# -- PyTorch --------------------------------------------------------------------------------------


def _t(a, grad=False):
    import torch

    if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: through float32 (exact both ways)
        t = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32))).to(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.requires_grad_(True) if grad else t


def _n(t):
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.detach().float().numpy().astype(ml_dtypes.bfloat16)
    return t.detach().numpy()


def torch_functional() -> BatchNormImpl:
    """``torch.nn.functional.batch_norm`` (channels at dim 1: other axes are moved there)."""
    import torch.nn.functional as F

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        rm_t, rv_t = _t(rm.copy()), _t(rv.copy())
        y = F.batch_norm(_t(np.moveaxis(x, axis, 1)), rm_t, rv_t, _t(scale), _t(bias),
                         training=True, momentum=momentum, eps=eps)
        return np.moveaxis(_n(y), 1, axis), _n(rm_t), _n(rv_t)

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        y = F.batch_norm(_t(np.moveaxis(x, axis, 1)), _t(mean), _t(var), _t(scale), _t(bias),
                         training=False, eps=eps)
        return np.moveaxis(_n(y), 1, axis)

    def backward(x, scale, bias, dy, *, eps, axis):
        xt, st, bt = _t(np.moveaxis(x, axis, 1), True), _t(scale, True), _t(bias, True)
        y = F.batch_norm(xt, None, None, st, bt, training=True, eps=eps)
        y.backward(_t(np.moveaxis(dy, axis, 1)))
        return np.moveaxis(_n(xt.grad), 1, axis), _n(st.grad), _n(bt.grad)

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


def torch_module_for(x_ndim: int, channels: int, dtype, *, eps: float, momentum):
    """``nn.BatchNorm1d/2d/3d`` matching a channels-at-dim-1 input of rank ``x_ndim``."""
    import torch

    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[x_ndim]
    return cls(channels, eps=eps, momentum=momentum, dtype=getattr(torch, np.dtype(dtype).name))  # bfloat16 too


def torch_module() -> BatchNormImpl:
    """``nn.BatchNorm1d/2d/3d`` chosen by rank, parameters and buffers set from the case."""
    import torch

    def make(x, scale, bias, rm, rv, eps, momentum):
        m = torch_module_for(x.ndim, x.shape[1], x.dtype, eps=eps, momentum=momentum)
        with torch.no_grad():
            m.weight.copy_(_t(scale))
            m.bias.copy_(_t(bias))
            m.running_mean.copy_(_t(rm))
            m.running_var.copy_(_t(rv))
        return m

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        xc = np.moveaxis(x, axis, 1)
        m = make(xc, scale, bias, rm, rv, eps, momentum).train()
        with torch.no_grad():
            y = m(_t(xc))
        return np.moveaxis(_n(y), 1, axis), _n(m.running_mean), _n(m.running_var)

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        xc = np.moveaxis(x, axis, 1)
        m = make(xc, scale, bias, mean, var, eps, 0.1).eval()
        with torch.no_grad():
            return np.moveaxis(_n(m(_t(xc))), 1, axis)

    def backward(x, scale, bias, dy, *, eps, axis):
        xc = np.moveaxis(x, axis, 1)
        m = make(xc, scale, bias, np.zeros_like(scale), np.ones_like(scale), eps, 0.1).train()
        xt = _t(xc, True)
        m(xt).backward(_t(np.moveaxis(dy, axis, 1)))
        return np.moveaxis(_n(xt.grad), 1, axis), _n(m.weight.grad), _n(m.bias.grad)

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


# -- Flax linen / nnx -----------------------------------------------------------------------------


@functools.cache
def _linen_fns(axis, momentum, eps, fast):
    import flax.linen as nn
    import jax

    def mod(train):
        return nn.BatchNorm(use_running_average=not train, axis=axis, momentum=momentum,
                            epsilon=eps, use_fast_variance=fast)

    def v(scale, bias, rm, rv):
        return {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": rm, "var": rv}}

    @jax.jit
    def train(x, scale, bias, rm, rv):
        y, upd = mod(True).apply(v(scale, bias, rm, rv), x, mutable=["batch_stats"])
        return y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]

    @jax.jit
    def eval_(x, scale, bias, rm, rv):
        return mod(False).apply(v(scale, bias, rm, rv), x)

    @jax.jit
    def backward(x, scale, bias, dy):
        rm = rv = jax.numpy.zeros_like(scale)

        def f(x, s, b):
            return mod(True).apply(v(s, b, rm, rv), x, mutable=["batch_stats"])[0]

        return jax.vjp(f, x, scale, bias)[1](dy)

    return train, eval_, backward


def flax_linen(use_fast_variance: bool = True) -> BatchNormImpl:
    """``flax.linen.BatchNorm`` (jitted per configuration; params in the input's dtype)."""

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        f = _linen_fns(axis, float(momentum), float(eps), use_fast_variance)[0]
        return tuple(np.asarray(a) for a in f(x, scale, bias, rm, rv))

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        return np.asarray(_linen_fns(axis, 0.99, float(eps), use_fast_variance)[1](x, scale, bias, mean, var))

    def backward(x, scale, bias, dy, *, eps, axis):
        f = _linen_fns(axis, 0.99, float(eps), use_fast_variance)[2]
        return tuple(np.asarray(a) for a in f(x, scale, bias, dy))

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


def flax_nnx(use_fast_variance: bool = True) -> BatchNormImpl:
    """``flax.nnx.BatchNorm`` (eager; gradients through ``nnx.split``/``merge`` and ``jax.vjp``)."""
    import jax.numpy as jnp
    from flax import nnx

    def make(x, scale, bias, rm, rv, eps, momentum, axis):
        bn = nnx.BatchNorm(x.shape[axis], axis=axis, momentum=momentum, epsilon=eps,
                           use_fast_variance=use_fast_variance, dtype=x.dtype,
                           param_dtype=x.dtype, rngs=nnx.Rngs(0))
        bn.scale[...] = jnp.asarray(scale)
        bn.bias[...] = jnp.asarray(bias)
        bn.mean[...] = jnp.asarray(rm)
        bn.var[...] = jnp.asarray(rv)
        return bn

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        bn = make(x, scale, bias, rm, rv, eps, momentum, axis)
        y = bn(jnp.asarray(x), use_running_average=False)
        return np.asarray(y), np.asarray(bn.mean[...]), np.asarray(bn.var[...])

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        bn = make(x, scale, bias, mean, var, eps, 0.99, axis)
        return np.asarray(bn(jnp.asarray(x), use_running_average=True))

    def backward(x, scale, bias, dy, *, eps, axis):
        bn = make(x, scale, bias, np.zeros_like(scale), np.ones_like(scale), eps, 0.99, axis)
        dyj = jnp.asarray(dy)

        def inner(m, x):  # <y, dy>: its gradient is the VJP of y with upstream dy
            return jnp.sum(m(x, use_running_average=False).astype(jnp.float32) * dyj)

        gm, gx = nnx.grad(inner, argnums=(0, 1))(bn, jnp.asarray(x))
        return np.asarray(gx), np.asarray(gm["scale"][...]), np.asarray(gm["bias"][...])

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


# -- Keras 3 (JAX backend) ------------------------------------------------------------------------


@functools.cache
def _keras_fns(shape, dtype, axis, eps, momentum):
    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"keras backend is {keras.backend.backend()!r}; set KERAS_BACKEND=jax")
    layer = keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=eps, dtype=dtype)
    layer.build(shape)
    # stateless_call(trainable=[gamma, beta], non_trainable=[moving_mean, moving_variance], x)
    assert [v.name for v in layer.non_trainable_variables] == ["moving_mean", "moving_variance"]

    @jax.jit
    def train(x, g, b, rm, rv):
        y, (m, v) = layer.stateless_call([g, b], [rm, rv], x, training=True)
        return y, m, v

    @jax.jit
    def eval_(x, g, b, rm, rv):
        return layer.stateless_call([g, b], [rm, rv], x, training=False)[0]

    @jax.jit
    def backward(x, g, b, dy):
        rm, rv = jax.numpy.zeros_like(g), jax.numpy.ones_like(g)

        def f(x, g, b):
            return layer.stateless_call([g, b], [rm, rv], x, training=True)[0]

        return jax.vjp(f, x, g, b)[1](dy)

    return train, eval_, backward


def keras_bn() -> BatchNormImpl:
    """``keras.layers.BatchNormalization`` on the JAX backend through ``stateless_call``, jitted
    (layer dtype = input dtype; variables passed in, updated moving statistics returned)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")

    def fns(x, eps, momentum, axis):
        return _keras_fns(tuple(x.shape), np.dtype(x.dtype).name, axis, float(eps), float(momentum))

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        return tuple(np.asarray(a) for a in fns(x, eps, momentum, axis)[0](x, scale, bias, rm, rv))

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        return np.asarray(fns(x, eps, 0.99, axis)[1](x, scale, bias, mean, var))

    def backward(x, scale, bias, dy, *, eps, axis):
        return tuple(np.asarray(a) for a in fns(x, eps, 0.99, axis)[2](x, scale, bias, dy))

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


# -- ONNX: ReferenceEvaluator and onnxruntime ----------------------------------------------------


def onnx_bn_model(dtype, *, eps: float, momentum: float, training: bool, opset: int = 15):
    """A one-node BatchNormalization model; X/scale/B/mean/var are graph inputs (not
    initializers, so onnxruntime's training-mode aliasing of running stats cannot bite).
    Parameters and statistics are float32 for float16 X (opset 15's T1/T2, as mixed-precision
    exports have them), otherwise X's dtype."""
    from onnx import TensorProto, helper

    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    pt = TensorProto.FLOAT if np.dtype(dtype) == np.float16 else et
    outs = ["Y", "running_mean", "running_var"] if training else ["Y"]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], outs,
                            epsilon=eps, momentum=momentum, training_mode=int(training))
    ins = [helper.make_tensor_value_info(n, et if n == "X" else pt, None)
           for n in ["X", "scale", "B", "mean", "var"]]
    outv = [helper.make_tensor_value_info(o, et if o == "Y" else pt, None) for o in outs]
    g = helper.make_graph([node], "bn", ins, outv)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _onnx_impl(run_factory) -> BatchNormImpl:
    def feed(x, scale, bias, m, v, axis):
        f32 = np.float32 if x.dtype == np.float16 else x.dtype
        return {"X": np.ascontiguousarray(np.moveaxis(x, axis, 1)), "scale": scale.astype(f32),
                "B": bias.astype(f32), "mean": m.astype(f32), "var": v.astype(f32)}

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        run = run_factory(x.dtype, float(eps), float(momentum), True)
        y, m, v = run(feed(x, scale, bias, rm, rv, axis))
        return np.moveaxis(y, 1, axis), m, v

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        run = run_factory(x.dtype, float(eps), 0.9, False)
        return np.moveaxis(run(feed(x, scale, bias, mean, var, axis))[0], 1, axis)

    return BatchNormImpl(train=train, eval=eval_)


def onnx_reference() -> BatchNormImpl:
    """``onnx.reference.ReferenceEvaluator`` on a one-node model (training_mode 0 and 1)."""
    from onnx.reference import ReferenceEvaluator

    @functools.cache
    def factory(dtype, eps, momentum, training):
        ev = ReferenceEvaluator(onnx_bn_model(dtype, eps=eps, momentum=momentum, training=training))
        return lambda feeds: ev.run(None, feeds)

    return _onnx_impl(factory)


def onnxruntime_cpu(training: bool = False) -> BatchNormImpl:
    """onnxruntime CPU EP; training mode only with running stats fed as inputs (see FACTS)."""
    import onnxruntime as ort

    @functools.cache
    def factory(dtype, eps, momentum, train):
        m = onnx_bn_model(dtype, eps=eps, momentum=momentum, training=train)
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return lambda feeds: s.run(None, feeds)

    impl = _onnx_impl(factory)
    return impl if training else BatchNormImpl(eval=impl.eval)
