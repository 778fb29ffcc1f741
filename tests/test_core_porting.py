"""``bnref.conventions.convert``: inference outputs identical for every pair of conventions.

The outputs are computed here from the formula, with each framework's effective eps written
out independently (``FLOORED`` floors it at 1.001e-5). Tolerance, float64: ``|y_t - y_s| <=
8 * eps64 * (|scale| (1 + |x_hat|) + |bias|)`` elementwise (8 ulp of the natural scale; the
conversion itself is a few roundings of ``var + eps`` and one square root; the worst seen in
20,000 random cases over every pair was 3.0 ulp, one way and round trip).
"""

import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnref import conventions as cv
from bnref.porting import absorb_eps

#: A framework that floors eps, as TF's fused batch norm wrappers did before TF 2.21 (1.001e-5,
#: a cuDNN limit): whatever bnref records for TF, the floor logic is tested on this one.
FLOORED = replace(cv.TF_FUSED, name="floored", min_eps=1.001e-5)
CONVENTIONS = (*cv.ALL, FLOORED)
PAIRS = list(itertools.product(CONVENTIONS, CONVENTIONS))
ULP64 = np.finfo(np.float64).eps
K = 8.0


def effective(conv, eps):
    e = conv.eps if eps is None else eps
    return max(e, conv.min_eps)  # the floor a record states (FLOORED: 1.001e-5)


def infer(x, p, eps):
    """(rows, C) inference output and natural scale, from the formula."""
    x_hat = (x - p.mean) / np.sqrt(p.var + eps)
    return x_hat * p.scale + p.bias, np.abs(p.scale) * (1 + np.abs(x_hat)) + np.abs(p.bias)


class P:
    def __init__(self, scale, bias, mean, var):
        self.scale, self.bias, self.mean, self.var = scale, bias, mean, var


def assert_same_outputs(x, a, eps_a, b, eps_b):
    ya, nat = infer(x, a, eps_a)
    yb, _ = infer(x, b, eps_b)
    err = np.abs(ya - yb) / (K * ULP64 * nat)
    assert err.max() <= 1.0, f"outputs differ by {err.max():.3g} x the allowed 8 ulp"


variances = st.one_of(
    st.just(0.0),
    st.floats(-14, -2).map(lambda e: 10.0**e),  # tiny: around and below every eps
    st.floats(-2, 6).map(lambda e: 10.0**e),
)
eps_choice = st.one_of(st.none(), st.floats(-9, -1).map(lambda e: 10.0**e))


@st.composite
def parameters(draw, c_max=6):
    c = draw(st.integers(1, c_max), label="channels")
    var = np.array(draw(st.lists(variances, min_size=c, max_size=c)))
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    scale = rng.uniform(-3, 3, c)
    bias, mean = rng.standard_normal(c), rng.standard_normal(c) * 10
    std = np.sqrt(var + 1e-6)
    x = mean + rng.standard_normal((16, c)) * std * 3
    return P(scale, bias, mean, var), x


def _has_division_by_zero(p, e_s):
    return e_s == 0 and (p.var == 0).any()


@given(pair=st.sampled_from(PAIRS), pv=parameters(), es=eps_choice, et=eps_choice)
def test_inference_outputs_identical_for_every_pair(pair, pv, es, et):
    src, tgt = pair
    p, x = pv
    r = cv.convert(p.scale, p.bias, p.mean, p.var, source=src, target=tgt if tgt is FLOORED else tgt.name,
                   source_eps=es, target_eps=et)
    assert r.eps == effective(tgt, et)
    assert (r.var >= 0).all()
    np.testing.assert_array_equal(r.mean, p.mean)
    np.testing.assert_array_equal(r.bias, p.bias)
    assert_same_outputs(x, p, effective(src, es), r, r.eps)


@given(pair=st.sampled_from(PAIRS), pv=parameters(), es=eps_choice, et=eps_choice,
       momentum=st.floats(0.0, 1.0))
def test_round_trip_is_identical_in_outputs(pair, pv, es, et, momentum):
    src, tgt = pair
    p, x = pv
    e_s = effective(src, es)
    there = cv.convert(p.scale, p.bias, p.mean, p.var, source=src, target=tgt, source_eps=es,
                       target_eps=et, source_momentum=momentum)
    back = cv.convert(*there[:4], source=tgt, target=src, source_eps=there.eps, target_eps=e_s,
                      source_momentum=there.momentum)
    assert back.eps == e_s
    assert_same_outputs(x, p, e_s, back, back.eps)
    assert back.momentum == pytest.approx(momentum, rel=1e-14, abs=1e-15)


@given(pair=st.sampled_from(PAIRS), momentum=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_momentum_means_the_same_update(pair, momentum, seed):
    """One EMA step of the running mean, written from each framework's documented rule."""
    src, tgt = pair
    rng = np.random.default_rng(seed)
    old, batch = rng.standard_normal(4), rng.standard_normal(4)
    r = cv.convert(np.ones(4), np.zeros(4), old, np.ones(4), source=src, target=tgt,
                   source_momentum=momentum)

    def step(conv, m):  # PyTorch and TF fused weigh the batch, the others the running value
        return (1 - m) * old + m * batch if conv.name in ("pytorch", "tf_fused", "floored") else m * old + (1 - m) * batch

    np.testing.assert_allclose(step(tgt, r.momentum), step(src, momentum), rtol=1e-13, atol=1e-14)


def test_named_cases():
    # PyTorch -> Keras: eps 1e-5 -> 1e-3. var 0.5 keeps its scale; var 1e-4 cannot absorb
    # -0.00099 and goes into the scale; momentum 0.1 (on the batch) -> 0.9 (on the running).
    r = cv.convert([2.0, 2.0], [1.0, -1.0], [0.5, 3.0], [0.5, 1e-4], source="pytorch", target="keras")
    assert r.eps == 1e-3 and r.momentum == 0.9
    np.testing.assert_allclose(r.var, [0.5 + 1e-5 - 1e-3, 1e-4], rtol=1e-15)
    np.testing.assert_allclose(r.scale, [2.0, 2.0 * np.sqrt(1.1e-3 / 1.1e-4)], rtol=1e-15)
    # ONNX 0.9 is PyTorch 0.1 exactly (torch.onnx's mapping), not 0.09999999999999998
    assert cv.convert([1.0], [0.0], [0.0], [1.0], source="onnx", target="pytorch").momentum == 0.1
    # a framework that floors eps: a requested 1e-8 is 1.001e-5, the variance absorbs the rest
    t = cv.convert([1.0], [0.0], [0.0], [1e-3], source="pytorch", target=FLOORED, target_eps=1e-8)
    assert t.eps == 1.001e-5
    np.testing.assert_allclose(t.var, [1e-3 + 1e-5 - 1.001e-5], rtol=1e-15)
    # ... and as a source: a model saved with eps=1e-8 really ran with 1.001e-5
    s = cv.convert([1.0], [0.0], [0.0], [0.0], source=FLOORED, target="pytorch", source_eps=1e-8)
    np.testing.assert_allclose(s.var, [1.001e-5 - 1e-5], rtol=1e-12)
    # back to PyTorch: same outputs, but the channel that went into the scale keeps it and comes
    # back with var + (1e-3 - 1e-5)
    b = cv.convert(*r[:4], source="keras", target="pytorch", source_momentum=r.momentum)
    np.testing.assert_allclose(b.var, [0.5, 1e-4 + 1e-3 - 1e-5], rtol=1e-14)
    np.testing.assert_allclose(b.scale, r.scale, rtol=0)
    assert b.momentum == 0.1 and b.eps == 1e-5
    # the same eps: nothing changes, the stored (unbiased or biased) variance carried as is
    same = cv.convert([1.5], [0.2], [0.3], [0.7], source="pytorch", target="onnx")
    assert same[:4] == ([1.5], [0.2], [0.3], [0.7]) and same.eps == 1e-5


def test_dtypes_and_inputs_are_kept():
    var = np.array([1e-6, 1.0], np.float32)
    r = cv.convert(np.ones(2, np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32), var,
                   source="keras", target="pytorch")
    assert {a.dtype for a in r[:4]} == {np.dtype(np.float32)}
    assert var.tolist() == [np.float32(1e-6), 1.0]  # the caller's array is untouched
    ints = cv.convert([1, 2], [0, 0], [0, 0], [1, 1], source="keras", target="pytorch")
    assert {a.dtype for a in ints[:4]} == {np.dtype(np.float64)}
    mean = np.zeros(2)
    cv.convert(np.ones(2), np.zeros(2), mean, np.ones(2), source="keras", target="pytorch").mean[0] = 5
    assert mean[0] == 0  # a new array, not the caller's


def test_the_comparison_can_fail():
    """Copying the parameters and taking the target's eps (no conversion) is caught."""
    p = P(np.array([1.0, -2.0]), np.array([0.1, 0.2]), np.array([0.0, 1.0]), np.array([1e-4, 2.0]))
    x = np.random.default_rng(0).standard_normal((8, 2))
    with pytest.raises(AssertionError, match="outputs differ"):
        assert_same_outputs(x, p, 1e-5, p, 1e-3)
    # even a one-ulp slip in the absorbed variance of a var << eps channel is visible
    r = cv.convert(p.scale, p.bias, p.mean, p.var, source="pytorch", target="keras")
    bad = P(r.scale * (1 + 64 * ULP64), r.bias, r.mean, r.var)
    with pytest.raises(AssertionError, match="outputs differ"):
        assert_same_outputs(x, p, 1e-5, bad, r.eps)


def test_effective_eps_refuses_a_negative_eps():
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):  # not floored to 0
        cv.KERAS.effective_eps(-1.0)
    assert FLOORED.effective_eps(1e-8) == 1.001e-5 and FLOORED.effective_eps(1e-3) == 1e-3


def test_absorb_eps_chooses_per_channel():
    scale, var = np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.5e-3, 2e-3])
    s, v = absorb_eps(scale, var, 1e-5, 1e-3)
    np.testing.assert_array_equal(v[:2], var[:2])  # would go negative: kept, scale changes
    assert (s[:2] > 1).all() and s[2] == 1.0 and v[2] == pytest.approx(2e-3 - 0.99e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(source_momentum=None), ValueError, "cumulative moving average"),
        (dict(source_momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
        (dict(source_momentum="0.1"), TypeError, "source_momentum must be a number"),
        (dict(var=[1.0, -1e-9]), ValueError, "var must be >= 0, got -1e-09 at channel 1"),
        (dict(mean=[0.0]), ValueError, r"mean must have shape \(2,\) like scale"),
        (dict(scale=np.ones((2, 1))), ValueError, r"scale must have shape \(C,\)"),
        (dict(bias=["a", "b"]), TypeError, "bias must be a numeric"),
        (dict(target="caffe"), ValueError, "unknown convention 'caffe'"),
        (dict(source=3), TypeError, "source must be a Convention or its name"),
        (dict(target_eps=-1.0), ValueError, "eps must be finite and >= 0"),
        (dict(var=[0.0, 1.0], source_eps=0.0), ValueError, "channel 0 has var = 0 and source eps = 0"),
    ],
)
def test_bad_input_is_refused_naming_the_problem(kwargs, error, match):
    args = dict(scale=[1.0, 1.0], bias=[0.0, 0.0], mean=[0.0, 0.0], var=[1.0, 1.0],
                source="pytorch", target="keras")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        cv.convert(args.pop("scale"), args.pop("bias"), args.pop("mean"), args.pop("var"), **args)
