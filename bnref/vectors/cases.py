"""The cases the vectors hold: ordinary inputs and the hard ones, per convention and dtype.

Every case is drawn from a generator seeded by (convention, dtype, case name) alone, so a
case's content does not depend on which others are written. Each channel's batch is
standardized to exactly the mean and std the case asks for (in float64) before rounding to
the dtype; the expected values are then computed from the rounded inputs.

Hard cases (``HARD``): |mean| >> std (cancellation: ``E[x**2] - E[x]**2`` fails), one value per
channel (variance 0, no unbiased variance), variances far below eps (and a constant channel),
huge variances, variances at 0.1, 1 and 10 times eps, and for float16/bfloat16 the largest and
smallest std that keep every result finite and normal (``bnref.testing.ranges.std_range``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from bnref.conventions import Convention
from bnref.testing.ranges import float_info, gradient_rms, headroom, std_range
from bnref.testing.strategies import BNCase

#: Base seed of every case; changing it changes every file (bump ``FORMAT_VERSION`` then).
SEED = 20240524

#: |mean| / std of the ``large_mean`` case, per dtype: as large as the dtype can represent
#: the batch with (rounding moves a channel's std by at most a few percent).
LARGE_MEAN = {"float64": 1e6, "float32": 1e4, "float16": 100.0, "bfloat16": 30.0}
#: std of the ``huge_variance`` case (float16: its range ends near 90, ``_range``).
HUGE_STD = {"float64": 1e6, "float32": 1e5, "float16": 50.0, "bfloat16": 1e15}


@dataclass(frozen=True, eq=False)
class Case(BNCase):
    """A ``BNCase`` (inputs in the case's dtype) with its name, eps, momentum and Precise-BN batches.

    ``precise_x`` stacks the Precise-BN batches (None: no Precise-BN statistics expected).
    """

    name: str
    description: str
    eps: float
    momentum: float
    precise_x: np.ndarray | None
    omitted: dict[str, str]  # quantity -> why this case has no expected value for it


def _rng(convention: str, dtype: str, name: str) -> np.random.Generator:
    key = zlib.crc32(f"{convention}|{dtype}|{name}".encode())
    return np.random.default_rng([SEED, key])


def _shape(rank: int, axis: int, channels: int) -> tuple[int, ...]:
    rest = {2: [8], 3: [4, 5], 4: [4, 3, 3], 5: [2, 3, 2, 2]}[rank]
    ax = axis % rank
    return tuple(channels if i == ax else rest.pop(0) for i in range(rank))


def _batch(rng, shape, axis, mean, std) -> np.ndarray:
    """float64 values with exactly ``mean`` and (biased) ``std`` per channel along ``axis``."""
    ax = axis % len(shape)
    z = np.moveaxis(rng.standard_normal(shape), ax, -1)
    if z.size // z.shape[-1] > 1:
        z = (z - z.mean(axis=tuple(range(z.ndim - 1)))) / z.std(axis=tuple(range(z.ndim - 1)))
    else:
        z = np.zeros_like(z)
    return np.moveaxis(z * std + mean, -1, ax)


class _Builder:
    """Draws the parameters, running statistics and dy of a case around given batch moments."""

    def __init__(self, conv: Convention, dtype: np.dtype, name: str) -> None:
        self.conv, self.dtype, self.name = conv, dtype, name
        self.rng = _rng(conv.name, dtype.name, name)

    def make(self, description, shape, mean, std, *, no_precise: str = "") -> Case:
        rng, dt, axis = self.rng, self.dtype, self.conv.channel_axis
        mean, std = np.broadcast_arrays(np.asarray(mean, float), np.asarray(std, float))
        c = mean.size
        x = _batch(rng, shape, axis, mean, std).astype(dt)
        n = x.size // c
        omitted, precise_x = {}, None
        if n == 1:
            no_precise = "Precise BN needs at least 2 values per channel in a batch"
        if no_precise:
            omitted = {q: no_precise for q in ("precise_mean", "precise_var", "precise_var_batch_avg")}
        else:
            precise_x = np.stack([_batch(rng, shape, axis, mean + 0.3 * std * rng.standard_normal(c),
                                         std * rng.uniform(0.7, 1.3, c)) for _ in range(3)]).astype(dt)
        rms = gradient_rms(dt, n)
        # 16-bit: a running variance below 64 x the smallest normal would be subnormal
        floor = 64 * float_info(dt)[1] if dt.itemsize == 2 else 0.0
        return Case(
            name=self.name,
            description=description,
            x=x,
            scale=(rng.uniform(0.2, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype(dt),
            bias=np.clip(rng.standard_normal(c), -4, 4).astype(dt),
            running_mean=(mean + 0.1 * std * rng.standard_normal(c)).astype(dt),
            running_var=(np.maximum(std**2 + (std == 0), floor) * rng.uniform(0.5, 2.0, c)).astype(dt),
            dy=(rng.standard_normal(shape) * rms).astype(dt),
            axis=axis,
            eps=self.conv.effective_eps(),
            momentum=self.conv.momentum,
            precise_x=precise_x,
            omitted=omitted,
        )


def _ordinary(b: _Builder, rank: int, channels: int) -> Case:
    lo, hi = std_range(b.dtype, int(np.prod(_shape(rank, 1, channels))) // channels, 3.0,
                       lo=0.05, hi=20.0)
    std = np.exp(b.rng.uniform(np.log(lo), np.log(hi), channels))
    mean = b.rng.uniform(-3, 3, channels) * std
    return b.make(f"rank {rank}, channels at axis {b.conv.channel_axis}, |mean| <= 3 std",
                  _shape(rank, b.conv.channel_axis, channels), mean, std)


def _large_mean(b: _Builder) -> Case:
    m = LARGE_MEAN[b.dtype.name]
    return b.make(f"|mean| = {m:g} std: E[x^2] - E[x]^2 cancels", _shape(4, b.conv.channel_axis, 3),
                  m * np.array([1.0, -1.0, 0.5]), np.array([1.0, 2.0, 0.5]))


def _tiny_variance(b: _Builder) -> Case:
    e = b.conv.effective_eps()
    shape = _shape(4, b.conv.channel_axis, 3)
    if b.dtype.itemsize > 2:
        return b.make("variance 0 (a constant channel), 1e-6 and 1e-3 times eps", shape,
                      [1.0, 0.0, -0.5], np.array([0.0, 1e-3, 3e-2]) * np.sqrt(e))
    # 16-bit: values around 0 (subnormal inputs included); such a variance is itself
    # subnormal in float16, so no Precise-BN statistics are expected
    return b.make("variance 0 (a constant channel), 1e-3 and 1e-2 times eps, mean 0", shape,
                  0.0, np.array([0.0, 0.03, 0.1]) * np.sqrt(e),
                  no_precise="a variance far below eps is subnormal in 16-bit dtypes")


def _huge_variance(b: _Builder) -> Case:
    shape = _shape(4, b.conv.channel_axis, 3)
    s = HUGE_STD[b.dtype.name]
    return b.make(f"std {s:.3g}: variance far above eps", shape, [0.5 * s, -s, 0.0], [s, 0.5 * s, s])


def _eps_edge(b: _Builder) -> Case:
    e = b.conv.effective_eps()
    return b.make(f"variance 0.1, 1 and 10 times eps = {e:g}", _shape(4, b.conv.channel_axis, 3),
                  [0.1, -0.2, 0.0], np.sqrt(e * np.array([0.1, 1.0, 10.0])))


def _one_value(b: _Builder) -> Case:
    return b.make("one value per channel (batch of 1 after a linear layer): variance 0",
                  (1, 4), b.rng.standard_normal(4), np.zeros(4))


def _range(b: _Builder, top: bool) -> Case:
    shape = _shape(4, b.conv.channel_axis, 3)
    lo, hi = std_range(b.dtype, 36, 1.0, lo=1e-30, hi=1e30)
    tiny = float_info(b.dtype)[1]
    if b.dtype.name == "bfloat16":  # float32's range: float32 sums of squares bound it
        hi = min(hi, np.sqrt(headroom(b.dtype) / (2 * 36)))
    # bottom: the variance itself stays a normal number of the dtype
    s = 0.9 * hi if top else max(1.1 * lo, 8 * np.sqrt(tiny))
    where = "top" if top else "bottom"
    return b.make(f"std {s:.3g}, near the {where} of the dtype's range (results and variances "
                  "finite and normal: bnref.testing.ranges.std_range)",
                  shape, [s, -0.5 * s, 0.0], [s, s, 0.5 * s])


#: Names of the cases every (convention, dtype) gets, then the 16-bit range cases.
ORDINARY = ("rank2", "rank3", "rank4", "rank5")
HARD = ("large_mean", "one_value_per_channel", "tiny_variance", "huge_variance", "eps_edge")
RANGE = ("range_top", "range_bottom")


def build_cases(conv: Convention, dtype) -> list[Case]:
    """Every case for one convention and dtype (float16/bfloat16 also get ``RANGE``)."""
    dtype = np.dtype(dtype)
    out = [_ordinary(_Builder(conv, dtype, f"rank{r}"), r, 3 if r > 2 else 4) for r in (2, 3, 4, 5)]
    makers = {"large_mean": _large_mean, "one_value_per_channel": _one_value,
              "tiny_variance": _tiny_variance, "huge_variance": _huge_variance,
              "eps_edge": _eps_edge}
    for name in HARD:
        out.append(makers[name](_Builder(conv, dtype, name)))
    if dtype.itemsize == 2:
        out += [_range(_Builder(conv, dtype, n), n == "range_top") for n in RANGE]
    return out
