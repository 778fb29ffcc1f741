"""Every code path of the blocked kernels (bnref/_kernels/), against independent references.

Each structure the layout code can choose is built on purpose with a small ``block_elems``
(``bnref.runtime.tuning``), and the structure is asserted twice: ``bnref._kernels.layout.plan``
for the case must have the expected shape (modes, blocks, units), and a spy on ``Layout.run``
checks that every blocked pass of every kernel actually ran on that plan, so each test
provably covers the path it names:

* row mode (B >= ROW_MODE_MIN_RUN) with several blocks per channel: runs split in pieces,
  and several runs per block with a ragged last block;
* tiled column mode: several blocks per unit (``first=False`` blocks add into the unit's
  partial sums), a last unit shorter than the others and a ragged last block; blocks taller
  than GROUP_ROWS (grouped ``column_sums`` with and without a remainder group); 1 < B < 64;
* general column mode (rows too wide for the block): column slices, ragged ones, slices that
  split a channel's B columns, several row groups;
* channels-last layouts (B == 1), sliced and negative-stride inputs (copied once), dy laid out
  differently from x;
* the fused row-mode training kernels (``train_forward`` / ``train_backward``: one pass per
  whole channel when it fits in FUSE_MAX_BLOCKS blocks), at a small and the default block size.

Outputs are compared with the extended-precision references of tests/test_accuracy_contract.py
(statistics: 1e-12; outputs: the bounds bnref/_kernels/forward.py and backward.py prove), with
|mean| >> std in some cases and random upstream gradients. Also: bitwise independence of the
thread count, the second pass of ``channel_stats`` and of the fused forward (forced by a zero
shift, ``tuning(sampled_shift=False)``, on data far from zero), the float32 paths' guards, the
per-thread constants arena, the layout cache, NaN propagation (one channel only), and empty
inputs.
"""

from __future__ import annotations

import gc
import math
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

import bnref
from bnref import runtime
from bnref._kernels import config, memory, stats
from bnref._kernels import forward as kernel_forward
from bnref._kernels import layout as kernel_layout
from tests.test_accuracy_contract import (
    EPS64,
    _centered,
    _columns,
    bounds_for,
    check,
    check_all,
    ref_eval,
    ref_train,
)

EPS = 1e-5
DTYPES = [np.float32, np.float64]


# -- layouts ----------------------------------------------------------------------------------------


def arrange(a: np.ndarray, layout: str, axis: int) -> np.ndarray:
    """``a``'s values and shape in the memory layout ``layout``."""
    if layout == "c":
        return np.ascontiguousarray(a)
    if layout == "cl":  # channels last: the channel axis innermost in memory
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, axis, -1)), -1, axis)
    if layout == "f":  # every axis reversed in memory (a transposed view)
        out = np.asfortranarray(a)
        assert not out.flags.c_contiguous
        return out
    if layout == "sliced":  # every other element of a larger array: not a permuted contiguous one
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "reversed":  # negative strides along the last axis
        return np.flip(np.ascontiguousarray(np.flip(a, -1)), -1)
    raise AssertionError(layout)


def plan_of(x: np.ndarray, axis: int, block: int) -> kernel_layout.Layout:
    return kernel_layout.plan(x.shape, x.strides, x.itemsize, axis % x.ndim, block)


def unit_rows(unit) -> int:
    return sum(b.shape[0] for b in unit)


# -- expected structures ----------------------------------------------------------------------------


def blocks_per_channel(p) -> int:
    return sum(1 for b in p.blocks if b.vidx == 0)


def expect_row_split_runs(p):
    # Runs longer than a block: each run in several pieces, one run per block.
    assert p.row_mode and not p.tiled and p.B >= config.ROW_MODE_MIN_RUN
    assert any(b.shape[1] < p.B for b in p.blocks)
    assert all(b.shape[0] == 1 for b in p.blocks)
    assert blocks_per_channel(p) > p.A


def expect_row_many_runs(p):
    # Several whole runs per block, the last block of a channel with fewer runs.
    assert p.row_mode and not p.tiled
    assert all(b.shape[1] == p.B for b in p.blocks)
    runs = [b.shape[0] for b in p.blocks if b.vidx == 0]
    assert len(runs) >= 3 and max(runs) > 1 and runs[-1] < runs[0]


def expect_tiled_units(p):
    # Several blocks per unit (first=False blocks accumulate), a shorter last unit, ragged last block.
    assert not p.row_mode and p.tiled and p.rows < config.GROUP_ROWS
    assert len(p.units) >= 3
    first = p.units[0]
    assert len(first) >= 3
    assert [b.first for b in first] == [True] + [False] * (len(first) - 1)
    assert all(unit_rows(u) == unit_rows(first) for u in p.units[:-1])
    assert unit_rows(p.units[-1]) < unit_rows(first)
    assert len(p.units[-1]) >= 2 and not p.units[-1][-1].first
    assert p.units[-1][-1].shape[0] < p.rows
    assert sorted(b.pidx[0] for b in p.blocks if b.first) == list(range(len(p.units)))
    assert p.part_shape == (len(p.units), p.C * p.B)


def expect_tiled_tall(p):
    # Blocks taller than GROUP_ROWS: column_sums groups them, with and without a remainder.
    g = config.GROUP_ROWS
    assert not p.row_mode and p.tiled and p.rows > g
    heights = [b.shape[0] for b in p.blocks]
    assert len(heights) >= 3 and all(len(u) == 1 for u in p.units)
    assert any(h > g and h % g for h in heights)  # a remainder group
    assert any(h > g and h % g == 0 for h in heights)  # groups only


def expect_general(p):
    # Rows too wide for a block: blocks of up to GROUP_ROWS rows and part of the columns.
    W = p.C * p.B
    assert not p.row_mode and not p.tiled
    widths = {b.shape[1] for b in p.blocks}
    heights = {b.shape[0] for b in p.blocks}
    assert max(widths) < W and len(widths) >= 2  # column slices, a ragged last one
    assert max(heights) == config.GROUP_ROWS and len(heights) >= 2  # row groups, a short last one
    assert p.part_shape[0] >= 3
    if p.B > 1:  # some slice boundary falls inside a channel's B columns
        assert any(b.vidx.start % p.B for b in p.blocks)


def both(*checks: Callable) -> Callable:
    def run(p):
        for c in checks:
            c(p)

    return run


def is_copy(p):
    assert p.copy


def channels_last(p):
    assert p.B == 1


def short_runs(p):
    assert 1 < p.B < config.ROW_MODE_MIN_RUN


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    axis: int
    layout: str
    block: int
    expect: Callable
    dy_other: str  # a dy layout different from x's
    fused: bool = False  # training mode takes the fused whole-channel row-mode kernels

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("row_split_runs", (6, 3, 10, 10), 1, "c", 30, expect_row_split_runs, "cl"),
    # 40 runs of 64, 3 per block: 14 blocks per channel, the last with 1 run.
    Case("row_many_runs", (40, 2, 8, 8), 1, "c", 200, expect_row_many_runs, "f"),
    # Channels of 10 * 64 values, at most FUSE_MAX_BLOCKS blocks: training in one pass per
    # channel (whole-channel blocks); statistics and inference mode blocked as above.
    Case("row_fused_training", (10, 3, 8, 8), 1, "c", 200, expect_row_many_runs, "cl", fused=True),
    # A = 5*19*2 = 190 rows of W = 8: blocks of 20 rows, units of 80 rows; last unit 20 + 10.
    Case("tiled_units_channels_last", (5, 8, 19, 2), 1, "cl", 160, both(expect_tiled_units, channels_last), "c"),
    # B = 20, W = 60: blocks of 20 rows, units of 80; A = 190: last unit 20 + 10 rows.
    Case("tiled_units_short_runs", (190, 3, 4, 5), 1, "c", 1200, both(expect_tiled_units, short_runs), "cl"),
    # 428 rows of 8: blocks (= units) of 150, 150, 128 rows.
    Case("tiled_tall_blocks", (428, 8), -1, "c", 1200, both(expect_tiled_tall, channels_last), "f"),
    # 150 rows of 300: row groups 64, 64, 22; column slices of 17 (last 11).
    Case("general_channels_last", (150, 300), -1, "c", 1100, both(expect_general, channels_last), "f"),
    # B = 10, W = 300: slices of 17 columns cut through channels.
    Case("general_short_runs", (150, 30, 2, 5), 1, "c", 1100, both(expect_general, short_runs), "cl"),
    # Sliced: copied, then B = 42 column mode, blocks of 16 rows: units of 64 and 36 (16, 16, 4).
    Case("sliced_copy_column", (100, 5, 6, 7), 1, "sliced", 210 * 16, both(is_copy, short_runs), "c"),
    # Sliced and fused: copied, then whole channels of 10 runs of 64 (blocked: 3, 3, 3, 1 runs).
    Case("row_fused_sliced_copy", (10, 3, 8, 8), 1, "sliced", 200, both(is_copy, expect_row_many_runs), "cl",
         fused=True),
    # Negative strides: copied, then row mode with runs of 80 in two pieces.
    Case("reversed_copy_row", (4, 3, 8, 10), 1, "reversed", 50, both(is_copy, expect_row_split_runs), "cl"),
]
CASE_IDS = [c.name for c in CASES]
# |mean| / std: 0; 1e4 (float32: the fused forward and float32 dx paths); 3e6 (float32: the
# plain forward path, dx on the float64 path); "mixed": channels at 1e4, -3e6, 0, 1e4, ... (row
# mode: each channel its own path; column mode: the path all channels allow).
LOCS = [0.0, 1e4, -3e6, "mixed"]
MIXED = np.array([1e4, -3e6, 0.0])


@pytest.fixture
def ran(monkeypatch):
    """The layout of every blocked pass the kernels run (``Layout.run``), in order."""
    seen = []
    orig = kernel_layout.Layout.run

    def spy(self, work, bufs, **kw):
        seen.append(self)
        return orig(self, work, bufs, **kw)

    monkeypatch.setattr(kernel_layout.Layout, "run", spy)
    return seen


@pytest.fixture
def handoffs(monkeypatch):
    """Per blocked pass (``Layout.run``), how many workers it handed to a thread pool.

    Counted at ``ThreadPoolExecutor.submit``: the pool's workers are the threads beyond the
    calling one, so a pass on n threads submits n - 1.
    """
    per_pass, submits = [], []
    orig_submit, orig_run = ThreadPoolExecutor.submit, kernel_layout.Layout.run

    def submit(self, fn, /, *args, **kwargs):
        submits.append(fn)
        return orig_submit(self, fn, *args, **kwargs)

    def run(self, work, bufs, **kw):
        before = len(submits)
        orig_run(self, work, bufs, **kw)
        per_pass.append(len(submits) - before)

    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit)
    monkeypatch.setattr(kernel_layout.Layout, "run", run)
    return per_pass


def fuses(x: np.ndarray, axis: int, block: int) -> bool:
    """Whether training mode takes the fused one-pass row-mode kernels (whole channels)."""
    n = x.size // x.shape[axis]
    return plan_of(x, axis, block).row_mode and n <= config.FUSE_MAX_BLOCKS * block


def whole_channels(L) -> bool:
    return L.row_mode and len(L.blocks) == L.C and all(b.shape == (L.A, L.B) for b in L.blocks)


def assert_ran(ran, plan, fused: bool):
    """Every pass ran on ``plan``'s blocks, or (training, ``fused``) on whole channels."""
    assert len(ran) >= 5
    mine = [L for L in ran if L.blocks is plan.blocks]
    whole = [L for L in ran if L.blocks is not plan.blocks]
    if fused:
        assert len(whole) == 2 and all(whole_channels(L) for L in whole), "fused training passes"
        assert len(mine) >= 3
    else:
        assert not whole, "every pass on the expected structure"


# -- data and the runs ------------------------------------------------------------------------------


@dataclass
class Data:
    x: np.ndarray
    dy: np.ndarray
    axis: int
    scale: np.ndarray
    bias: np.ndarray
    emean: np.ndarray  # inference-mode statistics
    evar: np.ndarray


def make_data(shape, axis, dtype, loc, std, seed, layout="c", dy_layout="c") -> Data:
    rng = np.random.default_rng(seed)
    axis = axis % len(shape)
    C = shape[axis]
    bshape = [C if i == axis else 1 for i in range(len(shape))]
    if isinstance(loc, str):
        assert loc == "mixed"
        base = MIXED[np.arange(C) % MIXED.size]
    else:  # one location for every channel, or one per channel
        base = np.broadcast_to(np.asarray(loc, np.float64), (C,))
    ch_loc = base * (1 + 0.1 * rng.standard_normal(C))
    x = (rng.standard_normal(shape) * std + ch_loc.reshape(bshape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    scale = (rng.standard_normal(C) * 2).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    cols = _columns(x, axis).astype(np.float64)
    emean = cols.mean(axis=0) + rng.standard_normal(C) * std
    evar = rng.uniform(0.1, 4.0, C) * cols.std(axis=0) ** 2
    return Data(arrange(x, layout, axis), arrange(dy, dy_layout, axis), axis, scale, bias, emean, evar)


def run_all(d: Data, block: int | None, threads: int = 1, fast: bool = False, **knobs) -> dict:
    """Statistics, training forward/backward and inference forward/backward, in bnref."""
    with runtime.tuning(block_elems=block, threads=threads, parallel_min=0, float32_forward=fast, **knobs):
        return run_untuned(d)


def run_untuned(d: Data) -> dict:
    """``run_all`` with the tuning as it is (``tuning`` changes module-wide settings)."""
    moments = bnref.Moments.from_array(d.x, d.axis)  # channel_stats alone
    y, cache = bnref.batch_norm_train(d.x, d.scale, d.bias, eps=EPS, axis=d.axis)
    dx, dscale, dbias = bnref.batch_norm_train_backward(d.dy, cache)
    ey = bnref.batch_norm_eval(d.x, d.scale, d.bias, d.emean, d.evar, EPS, d.axis)
    edx, edscale, edbias = bnref.batch_norm_eval_backward(d.dy, d.x, d.scale, d.emean, d.evar, EPS, d.axis)
    return {
        "mean": cache.mean, "mean_lo": cache.mean_residual, "m2": cache.moments.m2,
        "stats": (moments.mean, moments.m2),
        "train": {"y": y, "dx": dx, "dscale": dscale, "dbias": dbias},
        "eval": {"y": ey, "dx": edx, "dscale": edscale, "dbias": edbias},
    }


def check_stats(x, axis, mean, m2, mean_lo=None):
    """The statistics contract (1e-12), and mean + mean_lo within 1e-12 * std of the exact mean."""
    _, ref_mean, ref_m2 = _centered(x, axis)
    n = _columns(x, axis).shape[0]
    std = np.sqrt(np.asarray(ref_m2 / n, np.float64))
    mean64 = np.asarray(ref_mean, np.float64)
    check("mean", mean, mean64, np.abs(mean64) + std, 1e-12)
    floor = n * (4 * EPS64 * np.abs(mean64)) ** 2
    check("M2", m2, ref_m2, np.asarray(ref_m2, np.float64) + floor, 1e-12)
    if mean_lo is not None:
        lp = type(ref_mean[0])
        err = np.abs((np.asarray(mean, lp) + np.asarray(mean_lo, lp)) - ref_mean)
        check("mean + mean_lo", np.asarray(err, np.float64), 0.0, std, 1e-12)


def check_run(d: Data, out: dict, fast: bool = False):
    check_stats(d.x, d.axis, out["mean"], out["m2"], out["mean_lo"])
    check_stats(d.x, d.axis, *out["stats"])
    dt = d.x.dtype
    for v in (*out["train"].values(), *out["eval"].values()):
        assert v.dtype == dt
    want, scales, n = ref_train(d.x, d.dy, d.scale, d.bias, EPS, d.axis)
    check_all(out["train"], want, scales, bounds_for(dt, n, float32_forward=fast), d.axis)
    want, scales = ref_eval(d.x, d.dy, d.scale, d.bias, d.emean, d.evar, EPS, d.axis)
    check_all(out["eval"], want, scales, bounds_for(dt, n, "eval", float32_forward=fast), d.axis)


def flat(out: dict) -> list[np.ndarray]:
    return [out["mean"], out["mean_lo"], out["m2"], *out["stats"], *out["train"].values(),
            *out["eval"].values()]


def assert_bitwise(a: dict, b: dict):
    for u, v in zip(flat(a), flat(b), strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()


# -- 1. each structure against the references -------------------------------------------------------


@pytest.mark.parametrize("loc", LOCS)
@pytest.mark.parametrize("dy_same", [True, False], ids=["dy_same_layout", "dy_other_layout"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_structure_matches_references(case, dtype, dy_same, loc, ran):
    dy_layout = case.layout if dy_same else case.dy_other
    d = make_data(case.shape, case.axis, dtype, loc, 1.0, seed=10 * CASES.index(case) + LOCS.index(loc),
                  layout=case.layout, dy_layout=dy_layout)
    if not dy_same:
        assert d.dy.strides != d.x.strides
    plan = plan_of(d.x, case.axis, case.block)
    case.expect(plan)
    assert fuses(d.x, case.axis, case.block) == case.fused
    out = run_all(d, case.block)
    assert_ran(ran, plan, case.fused)
    check_run(d, out)
    if dtype == np.float32:  # the opt-in float32 forward path too
        ran.clear()
        fast = run_all(d, case.block, fast=True)
        assert_ran(ran, plan, case.fused)
        check_run(d, fast, fast=True)


# -- 2. thread count ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bitwise_independent_of_thread_count(case, dtype, handoffs):
    d = make_data(case.shape, case.axis, dtype, "mixed", 1.0, seed=7, layout=case.layout, dy_layout=case.dy_other)
    plan = plan_of(d.x, case.axis, case.block)
    case.expect(plan)
    assert len(plan.units) >= 2  # work for more than one thread
    outs = {}
    for threads in (1, 2, 3):  # run_all: under runtime.tuning(threads=threads)
        handoffs.clear()
        outs[threads] = [run_all(d, case.block, threads=threads, fast=f) for f in (False, True)]
        # The pool ran (with up to threads - 1 workers, one per unit at most) iff threads > 1.
        pools = [w for w in handoffs if w]
        assert len(handoffs) >= 10 and (len(pools) > 0) == (threads > 1)
        assert all(1 <= w <= threads - 1 for w in pools)
        if threads > 1:
            assert min(threads, len(plan.units)) - 1 in pools
    # Below parallel_min: the calling thread only, whatever the thread count.
    handoffs.clear()
    with runtime.tuning(block_elems=case.block, threads=3, parallel_min=d.x.size + 1):
        small = run_untuned(d)
    assert handoffs and not any(handoffs)
    check_run(d, outs[1][0])
    for threads in (2, 3):
        for a, b in zip(outs[1], outs[threads], strict=True):
            assert_bitwise(a, b)
    assert_bitwise(outs[1][0], small)


def test_set_num_threads_is_what_the_kernels_use(handoffs):
    d = make_data((150, 30, 2, 5), 1, np.float64, 1e4, 1.0, seed=8)
    old = runtime.num_threads()
    try:
        runtime.set_num_threads(3)
        assert runtime.num_threads() == 3 == runtime.settings()["threads"]
        with runtime.tuning(block_elems=1100, parallel_min=0):
            assert runtime.num_threads() == 3
            out = run_untuned(d)
        assert 2 in handoffs and all(w <= 2 for w in handoffs)
        with pytest.raises(ValueError, match="positive int"):
            runtime.set_num_threads(0)
    finally:
        runtime.set_num_threads(old)
    assert runtime.num_threads() == old
    check_run(d, out)


# -- 3. the second pass of channel_stats --------------------------------------------------------------

SECOND_PASS_CASES = [c for c in CASES if c.name in ("row_split_runs", "row_fused_training",
                                                    "tiled_units_short_runs", "tiled_tall_blocks",
                                                    "general_short_runs")]


@pytest.mark.parametrize("bad", ["far_all", "far_one", "zero_at_1e8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SECOND_PASS_CASES, ids=[c.name for c in SECOND_PASS_CASES])
def test_second_pass_meets_contract(case, dtype, bad, monkeypatch):
    # tuning(sampled_shift=False): every channel is shifted by 0, so the channels whose mean is
    # far from 0 (|mean| / std: 1e6, one channel at 1e4 among channels at 0, or 1e8) are summed
    # twice, the second time around their mean.
    C = case.shape[case.axis]
    if bad == "zero_at_1e8":
        # float32 at 1e8 has a spacing of 8: std 100 keeps the data non-degenerate.
        loc, std = 1e8, (100.0 if dtype == np.float32 else 1.0)
    elif bad == "far_all":
        loc, std = 1e6, 1.0
    else:
        loc, std = np.where(np.arange(C) == 1, 1e4, 0.0), 1.0
    d = make_data(case.shape, case.axis, dtype, loc, std, seed=11, layout=case.layout)
    case.expect(plan_of(d.x, case.axis, case.block))
    _, ref_mean, ref_m2 = _centered(d.x, d.axis)
    n = _columns(d.x, d.axis).shape[0]
    mean64 = np.asarray(ref_mean, np.float64)
    std64 = np.sqrt(np.asarray(ref_m2, np.float64) / n)
    far = np.arange(C) == 1 if bad == "far_one" else np.ones(C, bool)
    assert np.array_equal(np.abs(mean64) > 100 * std64, far)
    assert np.all(np.abs(mean64[~far]) < 0.5 * std64[~far])  # near 0: one pass
    shift = np.zeros(C)
    shifts = []
    orig = stats.shifted_sums

    def spy(L, k):
        shifts.append(np.array(k, np.float64))
        return orig(L, k)

    monkeypatch.setattr(stats, "shifted_sums", spy)
    with runtime.tuning(block_elems=case.block):  # the sampled shift: one pass, for this data
        stats.channel_stats(d.x, d.axis % d.x.ndim)
    assert len(shifts) == 1 and not np.array_equal(shifts[0][far], shift[far])
    for threads in (1, 2):
        shifts.clear()
        with runtime.tuning(block_elems=case.block, threads=threads, parallel_min=0, sampled_shift=False):
            mean, mean_lo, m2 = stats.channel_stats(d.x, d.axis % d.x.ndim)
            assert len(shifts) == 2  # the second pass ran
            again = stats.channel_stats(d.x, d.axis % d.x.ndim)  # deterministic, same shifts
        assert all(u.tobytes() == v.tobytes() for u, v in zip(again, (mean, mean_lo, m2), strict=True))
        assert len(shifts) == 4 and all(np.array_equal(u, v) for u, v in zip(shifts[:2], shifts[2:], strict=True))
        assert np.array_equal(shifts[0], shift)
        assert np.array_equal(shifts[1][~far], shift[~far])  # only far channels summed again
        assert np.all(np.abs(shifts[1][far] - mean64[far]) <= 1e-3 * std64[far])  # around the mean
        check_stats(d.x, d.axis, mean, m2, mean_lo)
    # The outputs built on these statistics (training mode uses mean_lo too); the fused training
    # forward has a second pass of its own (a second sums_of per far channel).
    d.dy = arrange(np.random.default_rng(12).standard_normal(d.x.shape).astype(dtype), "c", d.axis)
    sums_of = []
    orig_sums_of = kernel_forward.sums_of
    monkeypatch.setattr(kernel_forward, "sums_of", lambda *a: sums_of.append(1) or orig_sums_of(*a))
    shifts.clear()
    out = run_all(d, case.block, sampled_shift=False)
    if case.fused:
        assert len(sums_of) == C + far.sum() and len(shifts) == 2  # channel_stats: Moments only
    else:
        assert not sums_of and len(shifts) == 4  # Moments and training: two passes each
    check_run(d, out)


# -- float32 guards, fused kernels at the default block size, empty input -------------------------------

GUARD_CASES = [c for c in CASES if c.name in ("row_split_runs", "row_fused_training", "tiled_units_short_runs",
                                              "general_short_runs")]


@pytest.mark.parametrize("case", GUARD_CASES, ids=[c.name for c in GUARD_CASES])
def test_float32_guards_fall_back_to_float64(case):
    # |scale| * inv_std < 2**-64 in channel 0: the float32 paths' guards hand that channel (row
    # mode) or the whole array (column mode) to the float64 path (eval dx: always the whole array).
    d = make_data(case.shape, case.axis, np.float32, "mixed", 1.0, seed=61, layout=case.layout,
                  dy_layout=case.dy_other)
    plan = plan_of(d.x, case.axis, case.block)
    case.expect(plan)
    f32_consts = []
    masks = []  # row mode: the per-channel path masks blocks were checked against
    orig_const, orig_takes = kernel_layout.Layout.const, kernel_layout.Layout.takes

    def spy_const(self, v, dtype=np.float64):
        f32_consts.append(dtype == np.float32)
        return orig_const(self, v, dtype)

    def spy_takes(self, mask, blk):
        masks.append(np.array(mask))
        return orig_takes(self, mask, blk)

    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel_layout.Layout, "const", spy_const)
        mp.setattr(kernel_layout.Layout, "takes", spy_takes)
        for tiny in (False, True):
            if tiny:
                d.scale[0] = np.float32(1e-30)
            for fast in (False, True):
                f32_consts.clear()
                masks.clear()
                check_run(d, run_all(d, case.block, fast=fast), fast=fast)  # one thread: channels in order
                if not plan.row_mode:  # column mode: float32 constants (float32 paths) iff no tiny k
                    assert any(f32_consts) != tiny
                seen[tiny, fast] = [m for m in masks if m.shape == (plan.C,)]
    if plan.row_mode:
        # Row mode: a float32 path that ran (forward with fast; training dx when not fused)
        # checked blocks against a mask that, with the tiny k, lost channel 0 and only it.
        for fast in (False, True):
            before = {tuple(m.tolist()) for m in seen[False, fast]}
            after = {tuple(m.tolist()) for m in seen[True, fast]}
            lost0 = any(not t[0] and (True, *t[1:]) in before for t in after - before)
            assert lost0 == (fast or not case.fused), (fast, before, after)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_row_mode_at_default_block_size(dtype, ran):
    # 130 * 1024 values per channel: more than one default block, at most FUSE_MAX_BLOCKS of them,
    # so training takes whole channels (scratch larger than the kept one); inference mode takes
    # blocks of 64 runs (64, 64, 2).
    block = config.BLOCK_ELEMS
    d = make_data((130, 2, 32, 32), 1, dtype, "mixed", 1.0, seed=71, dy_layout="cl")
    plan = plan_of(d.x, 1, block)
    assert plan.row_mode and [b.shape[0] for b in plan.blocks if b.vidx == 0] == [64, 64, 2]
    assert block < d.x.size // 2 and fuses(d.x, 1, block)
    outs = []
    for threads in (1, 2):
        ran.clear()
        outs.append(run_all(d, block, threads=threads))
        assert_ran(ran, plan, fused=True)
        assert all(L.max_block > block for L in ran if L.blocks is not plan.blocks)
    check_run(d, outs[0])
    assert_bitwise(outs[0], outs[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), [((0, 3, 70), 1), ((0, 5), 1), ((4, 0, 2), 1)])
def test_empty_input(shape, axis, dtype):
    x = np.zeros(shape, dtype)
    dy = np.zeros(shape, dtype)
    C = shape[axis]
    mean, var, scale = np.zeros(C), np.ones(C), np.full(C, 2.0)
    y = bnref.batch_norm_eval(x, scale, None, mean, var, EPS, axis)
    dx, dscale, dbias = bnref.batch_norm_eval_backward(dy, x, scale, mean, var, EPS, axis)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    assert dscale.shape == dbias.shape == (C,) and not np.any(dscale) and not np.any(dbias)
    with pytest.raises(ValueError, match="no values per channel"):
        bnref.batch_norm_train(x, None, None, axis=axis)


# -- 4. the constants arena ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_arena_growth_keeps_results(dtype):
    runtime.release_kept_memory()  # a fresh arena for this thread
    assert memory.thread_arena() is None
    small = make_data((40, 6), 1, dtype, 1e4, 1.0, seed=21)
    big = make_data((300, 40, 5), 1, dtype, 1e4, 1.0, seed=22, dy_layout="cl")  # W = 200
    small_block, big_block = 6 * 16, 200 * 32
    assert plan_of(small.x, 1, small_block).tiled and plan_of(big.x, 1, big_block).tiled
    out1 = run_all(small, small_block)
    keep = [a.copy() for a in flat(out1)]
    arena1 = memory.thread_arena()
    size1, kept1 = arena1.buf.size, runtime.kept_nbytes()
    check_run(small, out1)

    out2 = run_all(big, big_block)
    arena2 = memory.thread_arena()
    assert arena2 is not arena1 and arena2.buf.size > size1  # it grew
    assert arena2.buf.size >= 3 * 32 * 200 * np.dtype(dtype).itemsize  # room for a call's tiles
    assert runtime.kept_nbytes() > kept1
    check_run(big, out2)
    for a, b in zip(flat(out1), keep, strict=True):  # earlier results untouched
        assert a.tobytes() == b.tobytes()

    # Again, in the grown arena: the small case and the big one reproduce their results.
    out3 = run_all(small, small_block)
    assert memory.thread_arena() is arena2  # kept, not shrunk
    assert_bitwise(out1, out3)
    keep2 = [a.copy() for a in flat(out2)]
    out4 = run_all(big, big_block)
    assert_bitwise(out2, out4)
    for a, b in zip(flat(out2), keep2, strict=True):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(flat(out1), keep, strict=True):
        assert a.tobytes() == b.tobytes()


def test_arena_per_thread_concurrent_calls():
    # Two caller threads at once, each with its own arena and shapes: same results as one by one.
    # (``tuning`` is module-wide, not per thread: one setting for both callers.)
    datas = [make_data((300, 40, 5), 1, np.float64, 1e4, 1.0, seed=31),
             make_data((90, 12), 1, np.float32, -3e3, 1.0, seed=32, layout="c", dy_layout="f")]
    block = 200 * 16
    assert all(plan_of(d.x, 1, block).tiled for d in datas)
    assert len(plan_of(datas[0].x, 1, block).units) >= 3
    with runtime.tuning(block_elems=block, threads=2, parallel_min=0):
        alone = [run_untuned(d) for d in datas]
        barrier = threading.Barrier(2)
        results: list = [None, None]
        errors = []

        def go(i):
            try:
                barrier.wait()
                results[i] = [run_untuned(datas[i]) for _ in range(5)]
            except BaseException as e:  # reported below
                errors.append(e)

        workers = [threading.Thread(target=go, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not errors, errors
    for i in range(2):
        check_run(datas[i], alone[i])
        for out in results[i]:
            assert_bitwise(alone[i], out)


def test_kept_nbytes_forgets_exited_threads():
    x = make_data((300, 40, 5), 1, np.float64, 1e4, 1.0, seed=81).x
    info = {}

    def use():
        bnref.batch_norm_train(x, None, None)
        arena, kept = memory.thread_arena(), memory.thread_kept_arrays()
        info["arena_and_scratch"] = arena is not None and arena.buf in kept and len(kept) >= 2
        info["refs"] = [weakref.ref(a) for a in kept]
        info["during"] = runtime.kept_nbytes()

    with runtime.tuning(block_elems=200 * 32, threads=1):
        before = runtime.kept_nbytes()
        t = threading.Thread(target=use)
        t.start()
        t.join()
    gc.collect()
    assert info["arena_and_scratch"] and info["during"] > before  # the thread kept memory, counted
    assert all(r() is None for r in info["refs"])  # its arena and scratch: freed
    after = runtime.kept_nbytes()
    assert after <= before, f"{after - before} bytes of exited threads counted"


def test_release_kept_memory():
    d = make_data((300, 40, 5), 1, np.float64, 1e4, 1.0, seed=82)
    with runtime.tuning(block_elems=200 * 32, threads=1):
        out = run_untuned(d)
        assert runtime.kept_nbytes() > 0 and memory.thread_arena() is not None
        runtime.release_kept_memory()
        assert runtime.kept_nbytes() == 0
        assert memory.thread_arena() is None and memory.thread_kept_arrays() == []
        again = run_untuned(d)  # buffers made anew: the same results
    assert runtime.kept_nbytes() > 0 and memory.thread_arena() is not None
    assert_bitwise(out, again)


# -- 5. the layout cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "block"), [((20, 6, 5, 4), 6 * 20 * 8), ((70, 3, 8, 9), 500)])
def test_layout_cache_same_shape_different_strides(shape, block, dtype, ran):
    layouts = ["c", "cl", "f", "c", "f", "cl"]  # each twice: the second time from the cache
    plans = {}
    for i, layout in enumerate(layouts):
        d = make_data(shape, 1, dtype, 1e4, 1.0, seed=41 + i, layout=layout, dy_layout="c")
        assert d.x.shape == shape
        assert not fuses(d.x, 1, block)
        ran.clear()
        out = run_all(d, block)
        p = plan_of(d.x, 1, block)
        assert_ran(ran, p, fused=False)
        assert not p.copy
        if layout in plans:
            assert p is plans[layout]  # cached
        plans[layout] = p
        check_run(d, out)
    perms = {lay: p.perm for lay, p in plans.items()}
    assert len(set(perms.values())) == 3, perms
    assert perms["c"] == (0, 1, 2, 3) and perms["f"] == (3, 2, 1, 0)


# -- 6. NaN --------------------------------------------------------------------------------------------

NAN_CASES = [c for c in CASES if c.name in ("tiled_units_channels_last", "tiled_units_short_runs",
                                            "general_channels_last", "general_short_runs",
                                            "row_split_runs", "row_fused_training")]


@pytest.mark.parametrize("nan_row", [0, 1], ids=["in_sample", "off_sample"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NAN_CASES, ids=[c.name for c in NAN_CASES])
def test_nan_propagates_to_its_channel_only(case, dtype, nan_row):
    axis = case.axis % len(case.shape)
    d = make_data(case.shape, axis, dtype, 1e4, 1.0, seed=51, layout=case.layout, dy_layout=case.dy_other)
    plan = plan_of(d.x, axis, case.block)
    case.expect(plan)
    C = d.x.shape[axis]
    ch = C // 2
    # One NaN in channel ch, placed through the canonical view the kernels use: in _sample_mean's
    # sample (row 0, and in row mode run position 0) or not (row 1 when rows are sampled with a
    # step >= 2, i.e. A >= 16 in column mode; run position 1 in row mode, sampled with a step >= 8).
    assert not plan.copy
    v = d.x.transpose(plan.perm).reshape(plan.vshape)
    assert np.shares_memory(v, d.x)
    if plan.row_mode:
        v[nan_row, ch, nan_row] = np.nan
    else:
        assert plan.A >= 16
        v[nan_row, ch * plan.B + plan.B // 2] = np.nan
    assert np.isnan(_columns(d.x, axis)[:, ch]).sum() == 1
    out = run_all(d, case.block, threads=2)

    good = np.arange(C) != ch
    assert np.isnan(out["mean"][ch]) and np.isnan(out["m2"][ch])
    assert np.all(np.isfinite(out["mean"][good])) and np.all(np.isfinite(out["m2"][good]))
    tr, ev = out["train"], out["eval"]
    for name in ("y", "dx"):
        cols = _columns(tr[name], axis)
        assert np.all(np.isnan(cols[:, ch])) and np.all(np.isfinite(cols[:, good])), name
    assert np.isnan(tr["dscale"][ch]) and np.all(np.isfinite(tr["dscale"][good]))
    assert np.all(np.isfinite(tr["dbias"]))  # sum(dy) does not involve x
    ecols = _columns(ev["y"], axis)
    assert np.isnan(ecols[:, ch]).sum() == 1 and np.all(np.isfinite(ecols[:, good]))
    assert np.all(np.isfinite(ev["dx"])) and np.all(np.isfinite(ev["dbias"]))
    assert np.isnan(ev["dscale"][ch]) and np.all(np.isfinite(ev["dscale"][good]))

    # The other channels: as if channel ch were not there.
    rest = Data(np.delete(d.x, ch, axis), np.delete(d.dy, ch, axis), axis, d.scale[good], d.bias[good],
                d.emean[good], d.evar[good])
    check_stats(rest.x, axis, out["mean"][good], out["m2"][good], out["mean_lo"][good])
    n = math.prod(d.x.shape) // C
    want, scales, _ = ref_train(rest.x, rest.dy, rest.scale, rest.bias, EPS, axis)
    got = {k: (np.delete(v, ch, axis) if v.ndim > 1 else v[good]) for k, v in tr.items()}
    check_all(got, want, scales, bounds_for(np.dtype(dtype), n), axis)
    want, scales = ref_eval(rest.x, rest.dy, rest.scale, rest.bias, rest.emean, rest.evar, EPS, axis)
    got = {k: (np.delete(v, ch, axis) if v.ndim > 1 else v[good]) for k, v in ev.items()}
    check_all(got, want, scales, bounds_for(np.dtype(dtype), n, "eval"), axis)


# -- the CPU's caches (recorded with the benchmarks; bnref/_kernels/config.py) ---------------------


def _fake_cache(root, cpu: int, entries) -> None:
    """A sysfs-like ``cpuN/cache/index*`` tree: (level, type, size, shared_cpu_list) per index."""
    for i, (level, kind, size, shared) in enumerate(entries):
        d = root / f"cpu{cpu}" / "cache" / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
        if shared is not None:
            (d / "shared_cpu_list").write_text(f"{shared}\n")


@pytest.fixture
def fake_sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "_SYSFS_CPU", tmp_path)
    config._read_cpu_caches.cache_clear()
    yield tmp_path
    config._read_cpu_caches.cache_clear()


def test_cpu_caches_from_sysfs(fake_sysfs, monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {3, 2}, raising=False)
    _fake_cache(fake_sysfs, 2, [(1, "Data", "48K", "2,34"), (1, "Instruction", "32K", "2,34"),
                                (2, "Unified", "2048K", "2,34"), (3, "Unified", "105M", "0-55,112-167")])
    c = config.cpu_caches()
    assert c == {"l1d": 48 << 10, "l2": 2 << 20, "l3": 105 << 20, "l2_shared_cpus": 2,
                 "l3_shared_cpus": 112, "source": "sysfs"}
    c["l2"] = 1  # a copy: the cached reading is not changed
    assert config.cpu_caches()["l2"] == 2 << 20


def test_cpu_caches_partial_or_missing(fake_sysfs, monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    # An unreadable size and a missing shared_cpu_list are left unknown; the rest is read.
    _fake_cache(fake_sysfs, 0, [(1, "Data", "n/a", None), (2, "Unified", "1024K", None)])
    c = config.cpu_caches()
    assert (c["l1d"], c["l2"], c["l3"], c["l2_shared_cpus"], c["source"]) == (None, 1 << 20, None, None, "sysfs")
    # Nothing in sysfs: glibc's sysconf where there is one, else nothing; never an error.
    config._read_cpu_caches.cache_clear()
    monkeypatch.setattr(config, "_SYSFS_CPU", fake_sysfs / "absent")
    c = config.cpu_caches()
    assert c["source"] in ("sysconf", None) and c["l2_shared_cpus"] is None
    assert all(c[k] is None or c[k] > 0 for k in ("l1d", "l2", "l3"))


def test_cache_size_parsing():
    assert [config._parse_size(t) for t in ("48K", "1024K", "32M", "1G", "65536", "?")] == [
        48 << 10, 1 << 20, 32 << 20, 1 << 30, 65536, None]
    assert [config._cpu_list_len(t) for t in ("0", "0-1", "0-1,4,6-7", "x")] == [1, 2, 5, None]
