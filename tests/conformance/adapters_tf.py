"""TensorFlow's and Keras's BatchNorms as ``bnref.testing.BatchNormImpl`` (run inside a worker).

Imported by ``tests.conformance.worker`` in the TensorFlow environment (``.venv-tf``: TF 2.21,
tf-keras 2, Keras 3 on the TensorFlow backend) or, for Keras 3 on the torch backend, in the
main one. Signatures as in ``adapters``; momentum in each API's own meaning. Float16 and
bfloat16 parameters go in as float32 where the API keeps them so (fused op's U, tf-keras's
mixed-precision variables); what comes back is cast to the input's dtype by the caller's test.
"""

from __future__ import annotations

import numpy as np

from bnref.testing import BatchNormImpl


def _tf():
    import tensorflow as tf

    return tf


def _param_dtype(dt):
    """float32 for the half types (the fused op's U, Keras's variables), else ``dt``."""
    return np.float32 if np.dtype(dt).itemsize == 2 else dt


def _fused_layout(x, axis):
    """(array, data_format, back) for the fused op: channels last (NHWC/NDHWC) or NCHW."""
    if x.ndim not in (4, 5):
        raise ValueError(f"the fused op takes 4-D or 5-D input, got {x.ndim}-D")
    ax = axis % x.ndim
    if ax == x.ndim - 1:
        return x, "NHWC" if x.ndim == 4 else "NDHWC", lambda a: a
    moved = np.ascontiguousarray(np.moveaxis(x, ax, -1))
    return moved, "NHWC" if x.ndim == 4 else "NDHWC", lambda a: np.moveaxis(a, -1, ax)


def tf_fused(api: str = "raw") -> BatchNormImpl:
    """``tf.raw_ops.FusedBatchNormV3`` (``api="raw"``) or ``tf.compat.v1.nn.fused_batch_norm``
    (``api="v1"``); momentum = ``exponential_avg_factor``, the batch's weight."""
    tf = _tf()

    def run(x, scale, bias, mean, var, *, eps, factor, training, axis):
        xl, fmt, back = _fused_layout(x, axis)
        p = _param_dtype(x.dtype)
        s, b = tf.constant(scale.astype(p)), tf.constant(bias.astype(p))
        m = tf.constant(mean.astype(p)) if mean is not None else tf.zeros([0], p)
        v = tf.constant(var.astype(p)) if var is not None else tf.zeros([0], p)
        if api == "raw":
            out = tf.raw_ops.FusedBatchNormV3(x=xl, scale=s, offset=b, mean=m, variance=v,
                                              epsilon=eps, exponential_avg_factor=factor,
                                              data_format=fmt, is_training=training)
        else:
            out = tf.compat.v1.nn.fused_batch_norm(
                xl, s, b, mean=None if mean is None else m, variance=None if var is None else v,
                epsilon=eps, data_format=fmt, is_training=training, exponential_avg_factor=factor)
        return back(out[0].numpy()), out[1].numpy(), out[2].numpy()

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        if momentum == 1.0:  # the batch statistics themselves; running inputs must be empty
            return run(x, scale, bias, None, None, eps=eps, factor=1.0, training=True, axis=axis)
        return run(x, scale, bias, rm, rv, eps=eps, factor=momentum, training=True, axis=axis)

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        return run(x, scale, bias, mean, var, eps=eps, factor=1.0, training=False, axis=axis)[0]

    def backward(x, scale, bias, dy, *, eps, axis):
        xl, fmt, back = _fused_layout(x, axis)
        dyl = _fused_layout(dy, axis)[0]
        p = _param_dtype(x.dtype)
        xt, s, b = tf.constant(xl), tf.constant(scale.astype(p)), tf.constant(bias.astype(p))
        with tf.GradientTape() as tape:
            tape.watch([xt, s, b])
            if api == "raw":
                y = tf.raw_ops.FusedBatchNormV3(x=xt, scale=s, offset=b, mean=tf.zeros([0], p),
                                                variance=tf.zeros([0], p), epsilon=eps,
                                                data_format=fmt, is_training=True)[0]
            else:
                y = tf.compat.v1.nn.fused_batch_norm(xt, s, b, epsilon=eps, data_format=fmt)[0]
        dx, ds, db = tape.gradient(y, [xt, s, b], output_gradients=tf.constant(dyl))
        return back(dx.numpy()), ds.numpy(), db.numpy()

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


def tf_nn_moments() -> BatchNormImpl:
    """``tf.nn.moments`` + ``tf.nn.batch_normalization``; the running statistics are the user's
    EMA of the moments' output, ``m * old + (1 - m) * batch`` (as Keras writes it)."""
    tf = _tf()

    def normalize(x, scale, bias, axis):
        ax = axis % x.ndim
        red = [i for i in range(x.ndim) if i != ax]
        shp = [-1 if i == ax else 1 for i in range(x.ndim)]
        xt = tf.constant(x)
        mean, var = tf.nn.moments(xt, red, keepdims=True)
        sc, bi = tf.reshape(tf.constant(scale), shp), tf.reshape(tf.constant(bias), shp)
        return xt, mean, var, sc, bi, shp

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        xt, mean, var, sc, bi, _ = normalize(x, scale, bias, axis)
        y = tf.nn.batch_normalization(xt, mean, var, bi, sc, eps)
        m, v = tf.reshape(mean, [-1]).numpy(), tf.reshape(var, [-1]).numpy()
        return y.numpy(), momentum * rm + (1 - momentum) * m, momentum * rv + (1 - momentum) * v

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        _, _, _, sc, bi, shp = normalize(x, scale, bias, axis)
        y = tf.nn.batch_normalization(tf.constant(x), tf.reshape(tf.constant(mean), shp),
                                      tf.reshape(tf.constant(var), shp), bi, sc, eps)
        return y.numpy()

    def backward(x, scale, bias, dy, *, eps, axis):
        ax = axis % x.ndim
        red = [i for i in range(x.ndim) if i != ax]
        shp = [-1 if i == ax else 1 for i in range(x.ndim)]
        xt, s, b = tf.constant(x), tf.constant(scale), tf.constant(bias)
        with tf.GradientTape() as tape:
            tape.watch([xt, s, b])
            mean, var = tf.nn.moments(xt, red, keepdims=True)
            y = tf.nn.batch_normalization(xt, mean, var, tf.reshape(b, shp), tf.reshape(s, shp), eps)
        dx, ds, db = tape.gradient(y, [xt, s, b], output_gradients=tf.constant(dy))
        return dx.numpy(), ds.numpy(), db.numpy()

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


# -- Keras layers (tf-keras 2; Keras 3 on the TensorFlow or torch backend) -----------------------


def _keras(module: str):
    if module == "tf_keras":
        import tf_keras

        return tf_keras
    import keras

    return keras


def _layer(module, x, scale, bias, rm, rv, *, eps, momentum, axis, **kw):
    k = _keras(module)
    dt = np.dtype(x.dtype).name
    layer = k.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=eps, dtype=dt, **kw)
    layer.build(x.shape)
    p = _param_dtype(x.dtype) if module == "tf_keras" else x.dtype
    layer.set_weights([a.astype(p) for a in (scale, bias, rm, rv)])
    return layer


def _grads(module, layer, x, dy):
    """d<y, dy>/d(x, gamma, beta) of ``layer(x, training=True)``, with the backend's autodiff."""
    backend = "tensorflow" if module == "tf_keras" else _keras(module).backend.backend()
    if backend == "tensorflow":
        tf = _tf()
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=True)
        dx, ds, db = tape.gradient(y, [xt, layer.gamma, layer.beta], output_gradients=tf.constant(dy))
        return dx.numpy(), ds.numpy(), db.numpy()
    if backend == "torch":
        import torch

        xt = torch.from_numpy(_torchable(x)).requires_grad_(True)
        y = layer(xt, training=True)
        y.backward(torch.from_numpy(_torchable(dy)))
        g = [xt.grad, layer.gamma.value.grad, layer.beta.value.grad]
        return tuple(t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
                     for t in g)
    raise ValueError(f"no gradient route for the {backend!r} backend")


def _torchable(a):
    """bfloat16 NumPy arrays (ml_dtypes) have no torch counterpart: send them as float32."""
    return np.ascontiguousarray(a.astype(np.float32) if a.dtype.name == "bfloat16" else a)


def _np(t):
    """A NumPy copy (torch's ``.numpy()`` shares memory with a variable the next call updates)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        t = t.float() if str(t.dtype) == "torch.bfloat16" else t
    return np.array(t, copy=True)


def keras_layer(module: str = "keras") -> BatchNormImpl:
    """``BatchNormalization`` of ``module`` (``"keras"``: Keras 3 on the process's backend,
    ``"tf_keras"``: tf-keras 2), weights set with ``set_weights``, moving statistics read back."""

    def train(x, scale, bias, rm, rv, *, eps, momentum, axis):
        layer = _layer(module, x, scale, bias, rm, rv, eps=eps, momentum=momentum, axis=axis)
        y = layer(_input(module, x), training=True)
        return _np(y), _np(layer.moving_mean.value if module == "keras" else layer.moving_mean), \
            _np(layer.moving_variance.value if module == "keras" else layer.moving_variance)

    def eval_(x, scale, bias, mean, var, *, eps, axis):
        layer = _layer(module, x, scale, bias, mean, var, eps=eps, momentum=0.99, axis=axis)
        return _np(layer(_input(module, x), training=False))

    def backward(x, scale, bias, dy, *, eps, axis):
        layer = _layer(module, x, scale, bias, np.zeros_like(scale), np.ones_like(scale), eps=eps,
                       momentum=0.99, axis=axis)
        return _grads(module, layer, x, dy)

    return BatchNormImpl(train=train, eval=eval_, backward=backward)


def _input(module, x):
    if module == "keras" and _keras(module).backend.backend() == "torch":
        import torch

        return torch.from_numpy(_torchable(x))
    return x


def keras_defaults(module: str = "keras") -> dict:
    """The layer's default momentum, epsilon and axis, and the backend it runs on."""
    k = _keras(module)
    bn = k.layers.BatchNormalization()
    backend = k.backend.backend() if module == "keras" else "tensorflow"
    return {"momentum": bn.momentum, "epsilon": bn.epsilon, "axis": bn.axis, "backend": backend,
            "fused": getattr(bn, "fused", None)}


def keras_updates(*xs, module: str = "keras", momentum: float = 0.99):
    """Moving statistics after each of several ``training=True`` calls of one fresh layer."""
    k = _keras(module)
    layer = k.layers.BatchNormalization(momentum=momentum)
    layer.build(xs[0].shape)
    means, variances = [], []
    for x in xs:
        layer(_input(module, x), training=True)
        means.append(_np(layer.moving_mean.value if module == "keras" else layer.moving_mean))
        variances.append(_np(layer.moving_variance.value if module == "keras" else layer.moving_variance))
    return np.stack(means), np.stack(variances)
