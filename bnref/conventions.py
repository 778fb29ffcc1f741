"""Each framework's BatchNorm conventions as data: one frozen record per framework.

The math lives once in bnref; a ``Convention`` only says how a framework parameterizes it:

* ``momentum`` — the framework's default, *in its own meaning*. ``momentum_weights`` says
  what it multiplies: ``"batch"`` (PyTorch: ``new = (1 - m) * old + m * batch``) or
  ``"running"`` (Keras, Flax, ONNX, MXNet, Paddle: ``new = m * old + (1 - m) * batch``).
* ``eps`` — default epsilon, always added inside the square root; ``min_eps`` is a floor the
  framework silently applies (none of the recorded ones does: TF 2.21's fused batch norm no
  longer clamps to 1.001e-5 on the CPU).
* ``unbiased_running_var`` — whether the batch variance that enters the running variance is
  Bessel-corrected (n / (n - 1)). Normalization itself always uses the biased variance.
* ``channel_axis`` — default channel axis for the framework's N-d layer.
* ``fast_variance`` — the framework's default computes the batch variance as
  ``E[x**2] - E[x]**2`` (clipped at 0) instead of two-pass; differs from bnref only by that
  formula's cancellation error (large when |mean| >> std).

``convert`` ports a layer's parameters from one convention to another with identical inference
outputs (its arithmetic is ``bnref.porting``; the traps it handles are in docs/porting.md).

Sources are in each record's ``source`` and in the conventions table of docs/conventions.md; every value
is checked against the live framework by the conformance suite (``tests/conformance``, whose
results are in ``docs/conformance.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from bnref._validation import check_eps
from bnref.moments import Moments
from bnref.porting import Converted, absorb_eps, check_parameters, convert_momentum

__all__ = [
    "Convention",
    "PYTORCH",
    "KERAS",
    "TF_KERAS2",
    "TF_FUSED",
    "FLAX",
    "ONNX",
    "MXNET",
    "PADDLE",
    "ALL",
    "by_name",
    "convert",
    "Converted",
]


def _running_dtype(a: np.ndarray) -> np.dtype:
    return a.dtype if a.dtype.kind == "f" else np.dtype(np.float64)


@dataclass(frozen=True)
class Convention:
    """How one framework parameterizes BatchNorm's running statistics (see module docstring)."""

    name: str
    momentum: float
    momentum_weights: Literal["batch", "running"]
    eps: float
    unbiased_running_var: bool
    channel_axis: int
    source: str
    fast_variance: bool = False
    min_eps: float = 0.0
    notes: str = ""

    def batch_weight(self, momentum: float | None = None) -> float:
        """Weight of the batch statistic in one update, from ``momentum`` in this framework's meaning."""
        m = self.momentum if momentum is None else float(momentum)
        if not 0.0 <= m <= 1.0 or np.isnan(m):
            raise ValueError(f"momentum must be in [0, 1] for {self.name}, got {momentum}")
        return m if self.momentum_weights == "batch" else 1.0 - m

    def effective_eps(self, eps: float | None = None) -> float:
        """The eps the framework really uses (its default, floored at ``min_eps``).

        A given ``eps`` must be finite and >= 0 (a negative one is refused, not floored).
        """
        e = self.eps if eps is None else check_eps(eps)
        return max(e, self.min_eps)

    def batch_var_for_running(self, batch: Moments) -> np.ndarray:
        """The batch variance that enters the running variance (Bessel-corrected or not)."""
        # PyTorch's BN normalizes by the biased variance but updates the EMA by the unbiased one.
        return batch.var(ddof=1 if self.unbiased_running_var else 0)

    def update(
        self,
        running_mean: np.ndarray,
        running_var: np.ndarray,
        batch_moments: Moments,
        momentum: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One exponential-moving-average update of the running statistics.

        ``new = (1 - w) * old + w * batch`` with ``w = batch_weight(momentum)``; computed in
        float64, returned in the running arrays' dtype (float64 if they are not floating).
        """
        w = self.batch_weight(momentum)
        rm, rv = _check_running(running_mean, running_var, batch_moments)
        new_mean = (1.0 - w) * rm.astype(np.float64) + w * batch_moments.mean
        new_var = (1.0 - w) * rv.astype(np.float64) + w * self.batch_var_for_running(batch_moments)
        return new_mean.astype(_running_dtype(rm)), new_var.astype(_running_dtype(rv))

    def update_cumulative(
        self,
        running_mean: np.ndarray,
        running_var: np.ndarray,
        batch_moments: Moments,
        num_batches_tracked: int,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """PyTorch's ``momentum=None``: cumulative moving average over batches.

        ``num_batches_tracked`` is the count *before* this batch; it is incremented first and
        the batch gets weight ``1 / num_batches_tracked`` (so the first batch replaces the
        initial values). Returns ``(mean, var, num_batches_tracked + 1)``. Every batch counts
        equally whatever its size: after one pass from any start this is the
        ``mean_of_variances`` Precise BN estimate (what ``torch.optim.swa_utils.update_bn`` does).
        """
        k = int(num_batches_tracked)
        if k < 0:
            raise ValueError(f"num_batches_tracked must be >= 0, got {num_batches_tracked}")
        k += 1
        w = 1.0 / k
        rm, rv = _check_running(running_mean, running_var, batch_moments)
        new_mean = (1.0 - w) * rm.astype(np.float64) + w * batch_moments.mean
        new_var = (1.0 - w) * rv.astype(np.float64) + w * self.batch_var_for_running(batch_moments)
        return new_mean.astype(_running_dtype(rm)), new_var.astype(_running_dtype(rv)), k

    def train_step(
        self,
        x: np.ndarray,
        scale: np.ndarray | None,
        bias: np.ndarray | None,
        running_mean: np.ndarray,
        running_var: np.ndarray,
        *,
        momentum: float | None = None,
        eps: float | None = None,
        axis: int | None = None,
    ):
        """What this framework's BN layer does in one training step, with its defaults.

        Returns ``(y, cache, new_running_mean, new_running_var)``. ``fast_variance`` is not
        emulated: bnref's exact variance is the reference the framework approximates.
        """
        from bnref.forward import batch_norm_train

        y, cache = batch_norm_train(
            x,
            scale,
            bias,
            eps=self.effective_eps(eps),
            axis=self.channel_axis if axis is None else axis,
        )
        mean, var = self.update(running_mean, running_var, cache.moments, momentum=momentum)
        return y, cache, mean, var


def _check_running(rm, rv, batch: Moments) -> tuple[np.ndarray, np.ndarray]:
    rm = np.asarray(rm)
    rv = np.asarray(rv)
    c = batch.num_channels
    for name, a in (("running_mean", rm), ("running_var", rv)):
        if a.shape != (c,):
            raise ValueError(f"{name} must have shape ({c},) like the batch moments, got {a.shape}")
    return rm, rv


PYTORCH = Convention(
    name="pytorch",
    momentum=0.1,
    momentum_weights="batch",
    eps=1e-5,
    unbiased_running_var=True,
    channel_axis=1,
    source="torch.nn.BatchNorm2d docs; aten/src/ATen/native/Normalization.cpp (batch_norm_cpu_update_stats_template: unbiased var n/(n-1))",
    notes="momentum=None is a cumulative average: use update_cumulative.",
)
KERAS = Convention(
    name="keras",
    momentum=0.99,
    momentum_weights="running",
    eps=1e-3,
    unbiased_running_var=False,
    channel_axis=-1,
    source="keras/src/layers/normalization/batch_normalization.py (Keras 3): moving = moving*momentum + batch*(1-momentum), ops.moments biased",
    notes="Keras 3 has no virtual_batch_size; see bnref.ghost for ghost BN.",
)
TF_KERAS2 = Convention(
    name="tf_keras2",
    momentum=0.99,
    momentum_weights="running",
    eps=1e-3,
    unbiased_running_var=True,
    channel_axis=-1,
    source=(
        "tf_keras/src/layers/normalization/batch_normalization.py 2.21: the fused path (4-D/5-D "
        "input, the default there) passes exponential_avg_factor=1-momentum to the fused op, whose "
        "Bessel-corrected batch variance enters the moving variance (_bessels_correction_test_only"
        "=True skips the (n-1)/n); measured in tests/conformance/test_tensorflow.py"
    ),
    notes=(
        "2-D/3-D inputs, fused=False, renorm or virtual_batch_size take the plain path: biased "
        "(use KERAS there). virtual_batch_size = ghost BN (bnref.ghost_batch_norm_train)."
    ),
)
TF_FUSED = Convention(
    name="tf_fused",
    momentum=1.0,
    momentum_weights="batch",
    eps=1e-3,
    unbiased_running_var=True,
    channel_axis=-1,
    source="tensorflow/python/ops/nn_impl.py fused_batch_norm (2.21: exponential_avg_factor=1.0, no eps floor); core/kernels/fused_batch_norm_op.cc (Bessel-corrected batch var)",
    notes=(
        "momentum here is exponential_avg_factor: the weight of the batch. The raw op's default "
        "epsilon is 1e-4. TF 2.21 applies no eps floor on the CPU (earlier wrappers clamped to "
        "1.001e-5 for cuDNN; measured in tests/conformance/test_tensorflow.py)."
    ),
)
FLAX = Convention(
    name="flax",
    momentum=0.99,
    momentum_weights="running",
    eps=1e-5,
    unbiased_running_var=False,
    channel_axis=-1,
    fast_variance=True,
    source="flax/linen/normalization.py (_compute_stats, BatchNorm.__call__: ra = momentum*ra + (1-momentum)*batch); flax/nnx/nn/normalization.py",
    notes="use_fast_variance=True (default): var = E[x^2]-E[x]^2 clipped at 0, in at least float32.",
)
ONNX = Convention(
    name="onnx",
    momentum=0.9,
    momentum_weights="running",
    eps=1e-5,
    unbiased_running_var=False,
    channel_axis=1,
    source="onnx/docs/Operators.md BatchNormalization-15: running = running*momentum + current*(1-momentum), var 'does not use N-1'",
    notes=(
        "torch.onnx exports PyTorch momentum 0.1 as ONNX momentum 0.9. epsilon and momentum are "
        "float attributes: a float64 graph really uses float32(1e-5) = 9.99999974738e-06."
    ),
)
MXNET = Convention(
    name="mxnet",
    momentum=0.9,
    momentum_weights="running",
    eps=1e-5,
    unbiased_running_var=False,
    channel_axis=1,
    source="src/operator/nn/batch_norm.cc (CPU: biased var); gluon nn.BatchNorm epsilon=1e-5 (symbol BatchNorm eps=1e-3, fix_gamma=True); measured with 1.9.1 in tests/conformance/test_mxnet.py",
    notes=(
        "cuDNN path updates with the unbiased variance (not run here). The moving statistics "
        "move in the backward pass: a training-mode forward alone leaves them unchanged."
    ),
)
PADDLE = Convention(
    name="paddle",
    momentum=0.9,
    momentum_weights="running",
    eps=1e-5,
    unbiased_running_var=False,
    channel_axis=1,
    source="python/paddle/nn/layer/norm.py (_BatchNormBase: momentum=0.9, epsilon=1e-05); CPU kernel biased var",
)

ALL: tuple[Convention, ...] = (PYTORCH, KERAS, TF_KERAS2, TF_FUSED, FLAX, ONNX, MXNET, PADDLE)


def by_name(name: str) -> Convention:
    """Look a convention up by its ``name`` (case-insensitive)."""
    for c in ALL:
        if c.name == name.lower():
            return c
    raise ValueError(f"unknown convention {name!r}; known: {', '.join(c.name for c in ALL)}")


_SOURCE_DEFAULT = object()  # "omitted": distinct from None, PyTorch's cumulative average


def _resolve(c: Convention | str, name: str) -> Convention:
    if isinstance(c, Convention):
        return c
    if isinstance(c, str):
        return by_name(c)
    raise TypeError(f"{name} must be a Convention or its name, got {type(c).__name__}")


def convert(
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    *,
    source: Convention | str,
    target: Convention | str,
    source_eps: float | None = None,
    target_eps: float | None = None,
    source_momentum: float | None | object = _SOURCE_DEFAULT,
) -> Converted:
    """Port a BN layer's ``(C,)`` parameters from ``source``'s convention to ``target``'s.

    Returns ``Converted(scale, bias, mean, var, eps, momentum)`` such that the target's
    inference output ``(x - mean) / sqrt(var + eps) * scale + bias`` equals the source's, per
    channel (float64: within 8 ulp of ``|scale| (1 + |x_hat|) + |bias|``; the arrays come back
    in their input dtypes). ``eps`` is ``target_eps`` (default ``target.eps``) as the target
    really uses it (floored at the convention's ``min_eps``, if any); the source's eps is likewise
    ``source.effective_eps(source_eps)``. The eps difference goes into ``var`` where it stays
    >= 0, else into ``scale``, per channel (``bnref.porting.absorb_eps``). ``mean`` and
    ``bias`` are unchanged, and the stored variance is otherwise carried as it is (biased or
    unbiased storage matters to the update rule, not to inference).

    ``momentum`` is ``source_momentum`` (omitted: the source's default) in the target's
    meaning: PyTorch's 0.1 is ONNX's/Keras' 0.9. ``source_momentum=None`` is PyTorch's
    cumulative average (``BatchNorm2d(momentum=None)``), which has no EMA equivalent: refused.
    Training-mode outputs cannot match when the eps differs (docs/porting.md).
    """
    src, tgt = _resolve(source, "source"), _resolve(target, "target")
    if source_momentum is None:
        raise ValueError(
            f"source_momentum=None is a cumulative moving average ({src.name} momentum=None): no "
            f"exponential-moving-average momentum of {tgt.name} reproduces it; pass a number"
        )
    m_s = src.momentum if source_momentum is _SOURCE_DEFAULT else source_momentum
    if not isinstance(m_s, (int, float, np.floating, np.integer)) or isinstance(m_s, bool):
        raise TypeError(f"source_momentum must be a number, got {type(m_s).__name__}")
    momentum = convert_momentum(src.batch_weight(m_s), tgt.momentum_weights)
    scale, bias, mean, var = check_parameters(scale, bias, mean, var)
    e_s, e_t = src.effective_eps(source_eps), tgt.effective_eps(target_eps)
    scale_t, var_t = absorb_eps(scale, var, e_s, e_t)
    return Converted(scale_t, bias, mean, var_t, e_t, momentum)
