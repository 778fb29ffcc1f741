"""Forward kernels (``normalize_affine``, ``train_forward``) and the bounds their y meets.

Notation as in ``bnref/_kernels/stats.py`` (v = 2**-53) and ``bnref/_kernels/float32.py``
(u = 2**-24, mh, r, rho); x_hat = (x - mu) * inv_std, natural scale
S = |scale| (1 + |x_hat|) + |bias|.

Float64 path (every y unless ``tuning(float32_forward=True)``): computed in float64, rounded
once to the input dtype, as ``y = (x - mean) * (scale * inv_std) + bias``. The mean is
subtracted first, so |mean| >> std costs nothing; it is carried as ``mean + mean_lo`` (its
rounding residual, from the block sums), folded into the bias, so float64 outputs stay
ulp-accurate when |mean| >> std.

For float32 / float16 output, channels with ``|mean| * inv_std <= 2**16`` skip the
subtraction: ``y = fl(fl(x * a) + b')`` in float64 with ``b' = bias - a * (mean + mean_lo)``.
Its float64 error is at most ~3 eps64 (|a||x| + |b'| + |y|) <= 3 eps64 (1 + 2**17) S
(|x| <= |x - mu| + |mu|), below 2**-10 * eps32 * S, so the result is still the float64
answer rounded once up to that: ``|y - y64| <= (0.5 + 2**-10) eps32 S``.

Fused training forward (row mode, one pass per channel, ``bnref/_kernels/layout.py``): the
scratch holds d = fl(x - K) with s <= 2, and ``y = fl(fl(a * d) + fl(bias - a * c/n))``
(mu - K = c/n up to the statistics' error), in float64 and rounded once: d's rounding costs
v |scale| (|x_hat| + s), the product and offset v |scale| (|x_hat| + 2 s) + v |bias|, the sum
v |y|, so y64 is within ~10 v S plus the statistics' own error, and a float32 / float16
result is still the float64 answer rounded once (0.5 eps32 S + O(v)).

Float32 path (float32 input with ``tuning(float32_forward=True)`` only, because bnref
promises float32 y as the float64 answer rounded once, which no float32 evaluation can
match): ``y = fl32(fl32(t * a32) + fl32(b))`` with t = fl32(x - mh), a32 = fl32(a),
b = bias - a32 * r. Summing the roundings (first order in u): the product and t contribute
u|scale|(|x_hat| + rho) (2u instead of u when t is inexact, where rho <= 2u|x_hat|),
fl32(b) u(|bias| + |scale| rho), the slope rounding u|scale||x_hat|, the final addition
u(|scale||x_hat| + |bias|). With the guard **rho <= 1** (else the channel takes the float64
path): ``|y - y64| <= 3u S`` when t is exact and ``<= 4u S`` otherwise, so
``|y - y64| <= 2 * eps32 * S`` (+ O(u**2)), within the numerical contract (docs/guarantees.md) (4 eps32).

So y: float32 input <= 0.5 eps32 S + O(eps64) (<= 2 eps32 S on the float32 path; observed on
adversarial data 0.46 eps32, or 0.97 on the float32 path); float16 input: the float64 result
rounded once; float64 input ``<= 8 * eps64 * S`` (observed <= 3.7 eps64). NaN anywhere in a
channel propagates to that channel's outputs.
"""

from __future__ import annotations

import math

import numpy as np

from bnref._kernels.blocks import Block
from bnref._kernels.config import settings
from bnref._kernels.float32 import f32_safe, split_mean
from bnref._kernels.layout import Layout, whole_channels
from bnref._kernels.memory import empty_result, load, load_minus, scratch, scratch32, store
from bnref._kernels.stats import centred, channel_stats, sample_mean, too_far, two_sum


def normalize_affine(
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    mean_lo: np.ndarray | None = None,
) -> np.ndarray:
    """``y = (x - mean) * (scale * inv_std) + bias``, returned in x.dtype.

    Computed in float64 and rounded once to x.dtype: mean subtracted first, ``mean_lo`` (the
    mean's rounding residual, if known) folded into the bias; for float32 / float16 output
    and |mean| <= 2**16 std, as ``x*a + (bias - a*mean)`` (module doc). With
    ``float32_forward``, float32 input takes the float32 path ``(x - mean_hi) * a32 + b32``
    with float64-derived per-channel constants (module doc).
    """
    if x.size == 0:
        return empty_result(x)
    L = Layout(x, axis)
    y, vy = L.empty_like_x(x.dtype)
    a = inv_std * scale
    vx = L.x
    take_f32 = take_fused = np.zeros(L.C if L.row_mode else 1, dtype=bool)
    if x.dtype == np.float32 and settings["float32_forward"]:
        with np.errstate(all="ignore"):  # NaN / inf constants: those channels use float64
            mh, r = split_mean(mean, mean_lo)
            a32 = a.astype(np.float32)
            # Fold: a*(x - mu) + bias = a32*(x - mh) + (bias - a32*r) + (a - a32)*(x - mu).
            b = bias - a32.astype(np.float64) * r
            ok = (np.abs(r) * inv_std <= 1.0) & f32_safe(a) & f32_safe(b, zero_small=True)
        take_f32 = L.channel_mask(ok)
    b64 = bias if mean_lo is None else bias - a * mean_lo
    if x.dtype.itemsize < 8:
        # float32 / float16 output: with |mean| * inv_std <= 2**16, y = x*a + (b64 - a*mean) in
        # float64 is within 2**-10 * eps32 of the natural scale (module doc), so one op less
        # per element and still the float64 answer rounded once.
        with np.errstate(all="ignore"):
            take_fused = L.channel_mask(np.abs(mean) * inv_std <= 2.0**16) & ~take_f32
            bf = b64 - a * mean
    take_plain = ~(take_f32 | take_fused)
    # Constants of the paths some block takes (in column mode, exactly one path).
    if np.any(take_f32):
        kmh, ka32, kb32 = (L.const(v, np.float32) for v in (mh, a32, b))
    if np.any(take_fused):
        ka, kbf = L.const(a), L.const(bf)
    if np.any(take_plain):
        ka, kb, km = L.const(a), L.const(b64), L.const(mean)
    whole_rows = L.tiled  # output blocks are contiguous: no scratch needed for float32 results

    def work(blk: Block, bufs: tuple[np.ndarray, ...]) -> None:
        src, dst = vx[blk.idx], vy[blk.idx]
        if L.takes(take_f32, blk):
            # In a contiguous scratch when the block is strided (row mode): NumPy's loops run
            # ~1.4x faster than in place on a (runs, run) view of the output.
            t = dst if whole_rows else scratch32(bufs[0], blk.shape)
            np.subtract(src, L.at(kmh, blk), out=t)  # exact when x is within 2x of mean_hi
            np.multiply(t, L.at(ka32, blk), out=t)
            np.add(t, L.at(kb32, blk), out=dst)
            return
        if L.takes(take_fused, blk):
            t = load(bufs[0], src)
            np.multiply(t, L.at(ka, blk), out=t)
            np.add(t, L.at(kbf, blk), out=t)
            store(dst, t)
            return
        if dst.dtype == np.float64:
            t = dst
            np.subtract(src, L.at(km, blk), out=t)
        else:
            t = load_minus(bufs[0], src, L.at(km, blk))
        np.multiply(t, L.at(ka, blk), out=t)
        np.add(t, L.at(kb, blk), out=t)
        store(dst, t)

    L.run(work, bufs=1, sums=False)
    return y


def train_forward(
    x: np.ndarray, axis: int, scale: np.ndarray, bias: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode forward: ``(y, mean, mean_lo, M2, inv_std)``, statistics as ``channel_stats``.

    In row mode with channels that fit in scratch, one pass per channel: shifted sums, then
    ``y = a*(x - K) + (bias - a*(mean - K))`` from the same float64 scratch (module doc).
    Otherwise ``channel_stats`` followed by ``normalize_affine``.
    """
    L = whole_channels(x, axis)
    count = x.size // x.shape[axis]
    if L is None:
        mean, mean_lo, m2 = channel_stats(x, axis)
        inv_std = 1.0 / np.sqrt(m2 / count + eps)
        y = normalize_affine(x, axis, mean, inv_std, scale, bias, mean_lo=mean_lo)
        return y, mean, mean_lo, m2, inv_std
    y, vy = L.empty_like_x(x.dtype)
    shift = sample_mean(L).tolist()
    out = np.empty((4, L.C))  # mean, mean_lo, M2, inv_std
    vx = L.x
    scale_l, bias_l = scale.tolist(), bias.tolist()

    def work(blk: Block, bufs: tuple[np.ndarray, ...]) -> None:
        c = blk.vidx
        k = shift[c]
        d = load_minus(bufs[0], vx[blk.idx], k)
        cn, m2 = centred(*sums_of(L, d, bufs[1]), count)
        if too_far(cn, m2, count):  # as channel_stats: once more around the mean
            k = k + cn
            d = load_minus(bufs[0], vx[blk.idx], k)
            cn, m2 = centred(*sums_of(L, d, bufs[1]), count)
        mean, mean_lo = two_sum(k, cn)
        m2 = max(m2, 0.0)
        var_eps = m2 / count + eps
        inv_std = 1.0 / math.sqrt(var_eps) if var_eps != 0 else math.inf  # as NumPy: 1/0 = inf
        a = scale_l[c] * inv_std
        # y = a*(x - mu) + bias = a*d + (bias - a*(mu - K)), mu - K = cn (module doc)
        np.multiply(d, a, out=d)
        np.add(d, bias_l[c] - a * cn, out=d)
        store(vy[blk.idx], d)
        out[:, c] = (mean, mean_lo, m2, inv_std)

    with np.errstate(all="ignore"):  # NaN / inf data: those channels are NaN
        L.run(work, bufs=2)
    return y, out[0], out[1], out[2], out[3]


def sums_of(L: Layout, d: np.ndarray, buf: np.ndarray) -> tuple[float, float]:
    """``(sum(d), sum(d*d))`` of a loaded row-mode block as ``shifted_sums`` (``d`` kept)."""
    return float(L.block_sum(d)), float(L.block_dot(d, d, out=scratch(buf, d.shape)))
