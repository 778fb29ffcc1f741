"""Sites of partial folds: which Mul/Add/Sub/Div after a layer are its BN's affine.

A chain continues through an element-wise node only when its constant is per channel. The
expectation is computed by behaviour, not by the rule's own shape test: broadcast the
constant (random, distinct values) against an (N, C, H, W) tensor and check that it is
constant over N, H and W within every channel.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import onnx_tools as ot
from tests.onnx_tools.helpers import make_model
from tests.onnx_tools.unfold_twins import check_twin

C, FULL = 4, (2, 4, 3, 3)  # the conv output below: (N=2, C=4, 3, 3)

CHAIN = """
<ir_version: 8, opset_import: ["" : 15]>
g (float[2,3,3,3] x) => (float[2,4,3,3] y) {{
  c = Conv<pads=[1,1,1,1]>(x, w)
  {body}
}}
"""


def _model(body: str, **consts: np.ndarray) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    init = {"w": rng.normal(size=(C, 3, 3, 3)).astype(np.float32),
            "g": np.ones(C, np.float32), "b": np.zeros(C, np.float32),
            "mu": np.zeros(C, np.float32), "v": np.ones(C, np.float32)}
    init |= {k: v if v.dtype.kind == "i" else np.asarray(v, np.float32) for k, v in consts.items()}
    model = make_model(CHAIN, init, body=body)
    used = {n for node in model.graph.node for n in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.checker.check_model(model, full_check=True)
    return model


def _is_per_channel(value: np.ndarray) -> bool:
    """By behaviour: broadcast against (N, C, H, W), constant within each channel."""
    full = np.broadcast_to(value, FULL)
    return bool(np.all(full.std(axis=(0, 2, 3)) == 0))


def _broadcasts(shape: tuple) -> bool:
    try:
        return np.broadcast_shapes(shape, FULL) == FULL
    except ValueError:
        return False


_SHAPES = st.lists(st.sampled_from([1, 2, 3, C]), max_size=4).map(tuple).filter(_broadcasts)


@settings(max_examples=40, deadline=None)
@given(shape=_SHAPES, op=st.sampled_from(["Mul", "Add", "Sub", "Div"]), first=st.booleans())
@example(shape=(2, 1, 1, 1), op="Mul", first=True)  # per sample
@example(shape=(1, C, 3, 1), op="Add", first=True)  # per position
@example(shape=(3,), op="Mul", first=True)  # per column
@example(shape=(C, 1, 1), op="Sub", first=False)  # per channel, the constant first
@example(shape=(C, 1, 1), op="Div", first=False)  # k / z
@example(shape=(), op="Div", first=True)
def test_a_chain_continues_exactly_through_per_channel_constants(shape, op, first):
    value = np.arange(1, 1 + int(np.prod(shape))).reshape(shape) * 0.5 + 1
    args = "c, k" if first else "k, c"
    model = _model(f"m = {op}({args})\n  y = Relu(m)", k=value)
    site, = ot.find_sites(model)
    chained = _is_per_channel(value) and (first or op != "Div")  # k / z is not affine in z
    assert site.through == (("m",) if chained else ())
    assert site.output == "c" and site.end == ("m" if chained else "c")


def test_the_chain_stops_where_the_tensor_has_other_readers():
    k = np.full((1, C, 1, 1), 2.0)
    site, = ot.find_sites(_model("m = Mul(c, k)\n  a = Add(m, k)\n  s = Sigmoid(m)\n  d = Add(a, s)\n  y = Relu(d)", k=k))
    assert site.through == ("m",) and site.end == "m"  # m is read twice: a stops there
    site, = ot.find_sites(_model("m = Mul(c, k)\n  s = Sigmoid(c)\n  d = Add(m, s)\n  y = Relu(d)", k=k))
    assert site.through == ()
    site, = ot.find_sites(_model("m = Mul(c, c)\n  y = Relu(m)"))
    assert site.through == ()  # not a constant


@pytest.mark.parametrize("body,why", [
    ("m = Mul(c, k)\n  a = Add(m, t)\n  y = BatchNormalization(a, g, b, mu, v)", "BN kept after Mul/Add"),
    ("m = Mul(c, k)\n  r = Reshape(m, shape)\n  y = BatchNormalization(r, g, b, mu, v)", "Mul then Reshape"),
    ("n = Transpose<perm=[0,2,3,1]>(c)\n  m = Mul(n, kn)\n  o = Transpose<perm=[0,3,1,2]>(m)\n"
     "  y = BatchNormalization(o, g, b, mu, v)", "rule 2 through an NHWC Mul by a constant"),
    ("m = Mul(c, k)\n  y = Add(m, t)", "rule 1: the chain ends at a graph output"),
    ("m = Mul(c, k)\n  a = Add(m, t)\n  y = Sigmoid(a)", "rule 4: a head"),
])
def test_the_rules_look_past_the_chain(body, why):
    consts = {"k": np.full((1, C, 1, 1), 2.0), "t": np.ones((C, 1, 1)), "shape": np.array(FULL),
              "kn": np.arange(1.0, C + 1)}
    model = _model(body, **{n: v for n, v in consts.items() if n in body})
    assert ot.find_sites(model) == [], why
    if why == "BN kept after Mul/Add":  # sites_include overrides the rules, never a BN there
        assert ot.find_sites(model, sites_include="c") == []


def test_a_chain_that_stays_a_site():
    """A BN left as Mul+Add (nothing fused) is a site: the BN goes on the conv output."""
    model = _model("m = Mul(c, k)\n  a = Add(m, t)\n  y = Relu(a)", k=np.full((1, C, 1, 1), 2.0),
                   t=np.ones((C, 1, 1)))
    site, = ot.find_sites(model)
    assert (site.output, site.through, site.end) == ("c", ("m", "a"), "a")
    assert site.to_dict()["through"] == ["m", "a"]
    assert ot.find_sites(model, sites_exclude="^a$") == []  # the chain's end names the site too


def test_weights_behind_identity_are_weights():
    """Exporters alias deduplicated tensors through Identity: such a conv is a candidate."""
    model = _model("y = Relu(c)")
    model.graph.node[0].input[1] = "w_alias"
    model.graph.node.insert(0, onnx.helper.make_node("Identity", ["w"], ["w_alias"]))
    site, = ot.find_sites(model)
    assert (site.output, site.channels) == ("c", C)


TWO = """
<ir_version: 8, opset_import: ["" : 15]>
two (float[N,4,5,5] x) => (float[N,3] y) {{
  c1 = {op}<group={group}>(x, w1{bias})
  b1 = BatchNormalization<epsilon=1e-9>(c1, g1, be1, m1, v1)
  r1 = Relu(b1)
  c2 = Conv(r1, w2)
  b2 = BatchNormalization<epsilon=1e-9>(c2, g2, be2, m2, v2)
  r2 = Relu(b2)
  p = GlobalAveragePool(r2)
  y = Flatten(p)
}}
"""


@settings(max_examples=8, deadline=None)
@given(op=st.sampled_from(["Conv", "ConvTranspose"]), group=st.sampled_from([1, 2, 4]),
       per=st.sampled_from([1, 2]), bias=st.booleans(), seed=st.integers(0, 2**16),
       form=st.sampled_from(["fold", "muladd", "onnxsim", "submuladd"]))
def test_any_conv_kind_in_any_fold_form_unfolds_exactly(op, group, per, bias, seed, form):
    """The class behind the dialect tests: every conv kind, folded in every form."""
    rng = np.random.default_rng(seed)
    cout = group * per
    shape = (cout, 4 // group, 2, 2) if op == "Conv" else (4, per, 2, 2)
    init = {"w1": rng.normal(size=shape), "w2": rng.normal(size=(3, cout, 1, 1)),
            "bias1": rng.normal(size=cout)}
    for k, c in (("1", cout), ("2", 3)):
        init |= {f"g{k}": rng.uniform(0.5, 2, c) * rng.choice([-1, 1], c),
                 f"be{k}": rng.normal(size=c), f"m{k}": np.zeros(c), f"v{k}": np.ones(c)}
    kept = make_model(TWO, {k: np.asarray(v, np.float32) for k, v in init.items() if bias or k != "bias1"},
                      op=op, group=group, bias=", bias1" if bias else "")
    a = (rng.normal(size=(48, 4, 5, 5)) + 0.3).astype(np.float32)
    b = (a[::-1] * 0.5 + 0.6).astype(np.float32)
    result = check_twin(kept, a, b, form)
    assert [s.channels for s in result.sites] == [cout, 3]
