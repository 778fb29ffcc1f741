"""Backward kernels (``grad_sums``, ``train_input_grad``, ``eval_backward``, ``train_backward``).

Notation as in ``bnref/_kernels/stats.py`` (v = 2**-53) and ``bnref/_kernels/float32.py``
(u = 2**-24, mh, r, rho); k = scale * inv_std, x_hat = (x - mu) * inv_std.

Gradient sums ``sum(dy)`` and ``sum(dy * (x - mean))``: float64, pairwise for float64 input;
for float32 / float16 input, whose sums are rounded to float32 / float16, the row-mode dot
product takes one fused pass (one accumulator per SIMD lane; error ~ n u, far below eps32).

Float64 path of dx (float64 / float16 input, float32 channels the guards below reject, and
the fused training backward for every dtype): ``dx = k*dy - (k * inv_std * dscale / n) *
(x - mean) - k * dbias / n`` in float64, mean subtracted first (carried as ``mean + mean_lo``,
folded into the constants), rounded once. Fused (row mode, one pass per channel over x and
dy in scratch): float32 dx rounded once, <= 0.5 eps32 + O(v) of its natural scale, tighter
than the float32 path's 2.5 eps32.

Training dx, float32 path: ``dx = fl32(fl32(k32 * dy) + fl32(fl32(t * c1_32) + e32))`` with
``c1 = -k * inv_std * g``, g = sum(dy * x_hat) / n, h = sum(dy) / n, and the folded offset
``e = -k*h - c1_32 * r`` (float64). Natural scale (the tests'):
S_dx = |k| (|dy| + H + |x_hat| G), H = sum|dy| / n >= |h|, G = sum|dy * x_hat| / n >= |g|.
Roundings: k32*dy 2u|k||dy|; t*c1_32 2u|k||g|(|x_hat| + rho); e32 u|k|(|h| + |g| rho);
slope u|k||g||x_hat|; the two additions u|k|(|g||x_hat| + |h|) and u|k|(|dy| + |g||x_hat|
+ |h|). Total u|k| (3|dy| + 3|h| + 5|g||x_hat| + 3|g| rho). The rho term is not covered by
S_dx where x_hat ~ 0, but G <= max|x_hat| H <= sqrt(n - 1) H (Samuelson), so the guard
**rho * sqrt(n) <= 1/3** gives 3|g| rho <= H and ``|dx - dx64| <= 5u S_dx = 2.5 eps32 S_dx``.
The float64 sums g and h add O(log2(n) eps64) relative.

Inference dx, float32: ``fl32(k32 * dy)``, ``<= eps32 * |k| |dy|``.

Bounds (tests/test_accuracy_contract.py checks them against an extended-precision reference):
float32 input: training dx <= 2.5 eps32 S_dx, inference dx <= 1 eps32 (observed on adversarial
data: training dx 1.01 eps32); dscale, dbias: float64 sums rounded once, <= 1 eps32 (observed
<= 0.5); all within the numerical contract (docs/guarantees.md) (4 eps32). float16 input: the float64
result rounded once. float64 input: dx ``<= 8 * eps64 * scale`` (observed <= 3.7 eps64);
dscale and dbias within ``2 * log2(n) * eps64 * sum|dy * x_hat|`` (resp. ``sum|dy|``).
"""

from __future__ import annotations

import numpy as np

from bnref._kernels.blocks import Block
from bnref._kernels.float32 import f32_safe, split_mean
from bnref._kernels.layout import Layout, whole_channels
from bnref._kernels.memory import as_float64, empty_result, load, load_minus, scratch, scratch32, store


def grad_sums(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    mean_lo: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(dbias, dscale) = (sum(dy), inv_std * sum(dy * (x - mean)))`` per channel, float64.

    With ``mean_lo``, the mean is ``mean + mean_lo``: ``sum(dy*(x-mean)) - mean_lo * sum(dy)``.
    """
    L = Layout(x, axis)
    exact = x.dtype == np.float64  # float32/float16 sums are rounded to their dtype
    sdy, sdx = np.empty(L.part_shape), np.empty(L.part_shape)
    vdy, vx, km = L.view(dy), L.x, L.const(mean)

    def work(blk: Block, bufs: tuple[np.ndarray, ...]) -> None:
        d = load_minus(bufs[0], vx[blk.idx], L.at(km, blk))
        g = as_float64(bufs[1], vdy[blk.idx], contiguous_ok=not L.row_mode)
        L.put(sdy, blk, L.block_sum(g))
        L.put(sdx, blk, L.block_dot(g, d, pairwise=exact))

    L.run(work, bufs=2)
    dbias = L.channel_totals(sdy)
    return dbias, dscale_of(L.channel_totals(sdx), dbias, mean_lo, inv_std)


# Shared by the blocked backward (per-channel arrays) and the fused one (one channel's floats).


def dscale_of(sxd, dbias, mean_lo, inv_std):
    """``dscale = inv_std * sum(dy * (x - mu))`` from ``sxd = sum(dy * (x - mean))``, mu = mean + mean_lo.

    ``mean_lo`` None: mu = mean (no ``0 * dbias`` term, which is NaN for an infinite dbias).
    """
    return (sxd if mean_lo is None else sxd - mean_lo * dbias) * inv_std


def dx_line(k, inv_std, dscale, dbias, count: int):
    """``(c1, c0)`` of ``dx = k*dy + c1*(x - mu) - c0``: ``c1 = -k*inv_std*dscale/n``, ``c0 = k*dbias/n``."""
    return -k * inv_std * dscale / count, k * dbias / count


def train_input_grad(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
    count: int,
    dbias: np.ndarray,
    dscale: np.ndarray,
    mean_lo: np.ndarray | None = None,
) -> np.ndarray:
    """``dx = k * (dy - dbias/n - x_hat * dscale/n)``, ``k = scale * inv_std``; in x.dtype.

    Evaluated as ``k*dy + (x - mean) * c1 - c0`` with ``c1 = -k*inv_std*dscale/n`` and
    ``c0 = k*dbias/n + c1*mean_lo``: in float64, mean subtracted first, rounded once; or, for
    float32 input, in float32 as ``k32*dy + ((x - mean_hi)*c1_32 + c0_32)`` (module doc).
    """
    if x.size == 0:
        return empty_result(x)
    L = Layout(x, axis)
    dx, vdx = L.empty_like_x(x.dtype)
    k = scale * inv_std
    c1, c0 = dx_line(k, inv_std, dscale, dbias, count)
    vx, vdy = L.x, L.view(dy)
    f32 = None
    if x.dtype == np.float32:
        with np.errstate(all="ignore"):  # NaN / inf constants: those channels use float64
            mh, r = split_mean(mean, mean_lo)
            c1_32 = c1.astype(np.float32)
            # Fold: c1*(x - mu) - c0 = c1_32*(x - mh) + (-c0 - c1_32*r) + (c1 - c1_32)*(x - mu).
            e = -c0 - c1_32.astype(np.float64) * r
            rho = np.abs(r) * inv_std
            ok = (rho * np.sqrt(count) <= 1 / 3) & f32_safe(k) & f32_safe(c1)
            ok &= f32_safe(e, zero_small=True)
        f32 = L.channel_mask(ok)
        if np.any(f32):  # (in column mode, the float32 path or the float64 one: one tile set)
            kmh, kk32, kc1_32, ke32 = (L.const(v, np.float32) for v in (mh, k, c1_32, e))
    if not (f32 is not None and np.all(f32)):
        if mean_lo is not None:
            c0 = c0 + c1 * mean_lo
        kk, kc1, kc0, km = (L.const(v) for v in (k, c1, c0, mean))
    whole_rows = L.tiled

    def work(blk: Block, bufs: tuple[np.ndarray, ...]) -> None:
        idx = blk.idx
        dst = vdx[idx]
        if f32 is not None and L.takes(f32, blk):
            t = scratch32(bufs[0], blk.shape)
            u = dst if whole_rows else scratch32(bufs[1], blk.shape)
            np.subtract(vx[idx], L.at(kmh, blk), out=t)  # exact when x is within 2x of mean_hi
            np.multiply(t, L.at(kc1_32, blk), out=t)
            np.add(t, L.at(ke32, blk), out=t)
            np.multiply(vdy[idx], L.at(kk32, blk), out=u)
            np.add(u, t, out=dst)
            return
        t = load_minus(bufs[0], vx[idx], L.at(km, blk))
        np.multiply(t, L.at(kc1, blk), out=t)
        if dst.dtype == np.float64:
            u = dst
            np.multiply(vdy[idx], L.at(kk, blk), out=u)
        else:
            u = load(bufs[1], vdy[idx])
            np.multiply(u, L.at(kk, blk), out=u)
        np.add(u, t, out=u)
        np.subtract(u, L.at(kc0, blk), out=u)
        store(dst, u)

    L.run(work, bufs=2, sums=False)
    return dx


def eval_backward(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inference-mode gradients in one pass over dy and x.

    ``dx = dy * scale * inv_std`` (in x.dtype) and
    ``(dbias, dscale) = (sum(dy), inv_std * sum(dy * (x - mean)))`` in float64.
    """
    if x.size == 0:
        z = np.zeros(x.shape[axis])
        return empty_result(x), z, z.copy()
    L = Layout(x, axis)
    exact = x.dtype == np.float64  # float32/float16 sums are rounded to their dtype
    dx, vdx = L.empty_like_x(x.dtype)
    sdy, sdx = np.empty(L.part_shape), np.empty(L.part_shape)
    k = scale * inv_std
    vdy, vx, km = L.view(dy), L.x, L.const(mean)
    # float32: dx = float32(k) * dy in float32, two roundings (|error| <= eps32 * |k * dy|).
    with np.errstate(all="ignore"):
        f32 = x.dtype == np.float32 and bool(np.all(f32_safe(k)))
    kk = L.const(k, np.float32 if f32 else np.float64)

    def work(blk: Block, bufs: tuple[np.ndarray, ...]) -> None:
        idx = blk.idx
        dst = vdx[idx]
        if f32:
            np.multiply(vdy[idx], L.at(kk, blk), out=dst)
        g = as_float64(bufs[1], vdy[idx], contiguous_ok=not L.row_mode)
        if not f32:
            u = dst if dst.dtype == np.float64 else scratch(bufs[0], blk.shape)
            np.multiply(g, L.at(kk, blk), out=u)
            store(dst, u)
        d = load_minus(bufs[0], vx[idx], L.at(km, blk))
        L.put(sdy, blk, L.block_sum(g))
        L.put(sdx, blk, L.block_dot(g, d, pairwise=exact))

    L.run(work, bufs=2)
    dbias = L.channel_totals(sdy)
    dscale = L.channel_totals(sdx) * inv_std
    return dx, dbias, dscale


def train_backward(
    dy: np.ndarray,
    x: np.ndarray,
    axis: int,
    mean: np.ndarray,
    inv_std: np.ndarray,
    scale: np.ndarray,
    count: int,
    mean_lo: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode gradients ``(dx, dbias, dscale)``; dbias, dscale in float64.

    In row mode with channels that fit in scratch, one pass per channel over x and dy: the
    sums, then ``dx = k*dy + c1*(x - mean) - c0`` in float64 from the same scratch, rounded
    once (the float32 path of ``train_input_grad`` would read x and dy again, strided: slower
    here). Otherwise ``grad_sums`` followed by ``train_input_grad``.
    """
    L = whole_channels(x, axis)
    if L is None or x.size == 0:
        dbias, dscale = grad_sums(dy, x, axis, mean, inv_std, mean_lo=mean_lo)
        dx = train_input_grad(dy, x, axis, mean, inv_std, scale, count, dbias, dscale, mean_lo)
        return dx, dbias, dscale
    exact = x.dtype == np.float64  # float32/float16 sums are rounded to their dtype
    dx, vdx = L.empty_like_x(x.dtype)
    vdy, vx = L.view(dy), L.x
    out = np.empty((2, L.C))  # dbias, dscale
    mean_l, inv_l, scale_l = mean.tolist(), inv_std.tolist(), scale.tolist()
    lo_l = [None] * L.C if mean_lo is None else mean_lo.tolist()

    def work(blk: Block, bufs: tuple[np.ndarray, ...]) -> None:
        c = blk.vidx
        d = load_minus(bufs[0], vx[blk.idx], mean_l[c])
        g = load(bufs[1], vdy[blk.idx])
        dbias = float(L.block_sum(g))
        sxd = float(L.block_dot(g, d, pairwise=exact))  # as grad_sums
        if exact:  # the pairwise dot wrote the products over d: again (x is in cache now)
            d = load_minus(bufs[0], vx[blk.idx], mean_l[c])
        inv = inv_l[c]
        dscale = dscale_of(sxd, dbias, lo_l[c], inv)
        k = scale_l[c] * inv
        c1, c0 = dx_line(k, inv, dscale, dbias, count)
        if lo_l[c] is not None:
            c0 = c0 + c1 * lo_l[c]
        out[0, c], out[1, c] = dbias, dscale
        np.multiply(d, c1, out=d)
        np.multiply(g, k, out=g)
        np.add(g, d, out=g)
        np.subtract(g, c0, out=g)
        store(vdx[blk.idx], g)

    with np.errstate(all="ignore"):
        L.run(work, bufs=2)
    return dx, out[0], out[1]
