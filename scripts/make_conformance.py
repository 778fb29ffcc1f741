"""Run the live conformance suite and render ``docs/conformance.md`` from its results.

Usage::

    python scripts/make_conformance.py            # run tests/conformance, write JSON + markdown
    python scripts/make_conformance.py --render   # only re-render docs/conformance.md from JSON

The suite (``tests/conformance``) records, per framework API x dtype and quantity, the worst
ratio ``|got - want| / (k * eps_dtype * natural_scale)`` into ``docs/conformance.json``
(``BNREF_CONFORMANCE_JSON``); this script turns it into the matrix, and adds the conventions
table, whose every value is asserted against the live framework by the test named beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "conformance.json"
MD_PATH = ROOT / "docs" / "conformance.md"

QUANTITY_TITLES = {
    "y_train": "y (train)",
    "y_eval": "y (eval)",
    "dx": "dx",
    "dscale": "dscale",
    "dbias": "dbias",
    "running_mean": "running mean (1 update)",
    "running_var": "running var (1 update)",
    "running_k": "running stats (k updates)",
    "precise_mean": "Precise BN mean",
    "precise_var": "Precise BN var",
}
ORDER = ["PyTorch", "fvcore", "Flax", "Keras 3 (JAX)", "ONNX", "onnxruntime"]

# (framework, momentum meaning & default, eps, running-var Bessel, channel axis, source, checked by)
CONVENTIONS = [
    ("PyTorch `nn.BatchNorm*d`, `F.batch_norm`",
     "new = (1−m)·old + m·batch, m = 0.1; `momentum=None`: cumulative average, batch k weighted 1/k "
     "(`Convention.update_cumulative`)",
     "1e-5, inside sqrt; 2.13 refuses eps ≤ 0 in training",
     "unbiased n/(n−1) (normalizes with biased)", "1",
     "torch/nn/modules/batchnorm.py (`_NormBase.__init__` eps=1e-5, momentum=0.1; "
     "`forward`: `exponential_average_factor = 1.0 / float(self.num_batches_tracked)` when "
     "momentum is None); torch/nn/functional.py `batch_norm(momentum=0.1, eps=1e-5)`; "
     "aten/src/ATen/native/Normalization.cpp (running var from `var_sum / (n - 1)`)",
     "test_pytorch.py::test_defaults_match_convention, test_module_several_updates, "
     "test_module_momentum_none_is_cumulative, test_eps_zero_refused_in_training"),
    ("Keras 3 `layers.BatchNormalization`",
     "new = m·old + (1−m)·batch, m = 0.99", "1e-3, inside sqrt", "biased", "−1",
     "keras/src/layers/normalization/batch_normalization.py (`__init__` axis=-1, momentum=0.99, "
     "epsilon=1e-3; `call`: `moving_mean * self.momentum + mean * (1.0 - self.momentum)`); "
     "keras/src/backend/jax/nn.py `moments` (`jnp.var`: biased; float16 stats in float32)",
     "test_keras.py::test_defaults_match_convention, test_several_updates"),
    ("Flax `linen.BatchNorm`, `nnx.BatchNorm`",
     "new = m·old + (1−m)·batch, m = 0.99", "1e-5, inside sqrt (`lax.rsqrt(var + epsilon)`)",
     "biased; `use_fast_variance=True` (default): E[x²]−E[x]² in ≥ float32, clipped at 0",
     "−1",
     "flax/linen/normalization.py (`_compute_stats`; `BatchNorm` fields axis=-1, momentum=0.99, "
     "epsilon=1e-5, use_fast_variance=True; `ra_mean.value = self.momentum * ra_mean.value + "
     "(1 - self.momentum) * mean`); flax/nnx/nn/normalization.py (`BatchNorm.__init__`, same)",
     "test_flax.py::test_defaults_match_convention, test_linen_several_updates, "
     "test_nnx_several_updates, test_fast_variance_error_is_cancellation"),
    ("ONNX `BatchNormalization` (opset 15)",
     "new = m·old + (1−m)·batch, m = 0.9", "1e-5, inside sqrt; a FLOAT (float32) attribute, so "
     "a float64 graph uses float32(1e-5) = 9.99999974738e-06", "biased (\"does not use N−1\")", "1",
     "onnx/defs/nn/defs.cc (BatchNormalization-15 schema and doc); "
     "onnx/reference/ops/op_batch_normalization.py (`_batchnorm_training_mode`: `x.var(axis)`, "
     "`var * momentum + saved_var * (1 - momentum)`)",
     "test_onnx.py::test_defaults_match_convention, test_float64_graph_uses_float32_eps, "
     "test_backend_case_expectations, test_reference_evaluator"),
    ("onnxruntime CPU EP",
     "as ONNX", "as ONNX", "as ONNX", "1",
     "onnxruntime/core/providers/cpu/nn/batch_norm.h (training mode writes running stats in "
     "place: wrong Y when mean/var initializers are shared, onnxruntime issue 29790)",
     "test_onnx.py::test_onnxruntime_inference, test_onnxruntime_training_mode_fed_stats"),
]

PRECISE = [
    ("fvcore `nn.update_bn_stats`", "`population`",
     "pooled mean and biased pooled variance, weighted by values per channel "
     "(`x.numel() // x.shape[1]`), no final n/(n−1); computed as E[x²]−E[x]² in the model dtype",
     "fvcore/nn/precise_bn.py (`_PopulationVarianceEstimator`, `update_bn_stats` sets momentum=1 "
     "and restores it)",
     "test_fvcore.py::test_update_bn_stats_is_population, test_no_bessel_on_population_estimate"),
    ("fvcore `_MeanOfBatchVarianceEstimator` (before 2021-05)", "`mean_of_variances`",
     "equal-weight mean of batch means and of unbiased batch variances",
     "fvcore/nn/precise_bn.py (`_MeanOfBatchVarianceEstimator`)",
     "test_fvcore.py::test_mean_of_variances_estimator_class"),
    ("PyTorch `torch.optim.swa_utils.update_bn`", "`mean_of_variances`",
     "resets stats, momentum=None (cumulative average), one pass: equal weight per batch "
     "whatever its size, unbiased batch variances",
     "torch/optim/swa_utils.py (`update_bn`: `reset_running_stats()`, `module.momentum = None`)",
     "test_pytorch.py::test_swa_update_bn_is_mean_of_variances"),
]


def run_suite() -> int:
    """Run tests/conformance with the JSON recorder switched on; return pytest's exit code."""
    env = dict(os.environ, KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "jax"))
    env["BNREF_CONFORMANCE_JSON"] = str(JSON_PATH)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/conformance"]
    return subprocess.call(cmd, cwd=ROOT, env=env)


def _cell(c: dict | None) -> str:
    if c is None:
        return "—"
    ratio = c["ratio"]
    if ratio != ratio or ratio == float("inf"):
        return "**FAIL**"
    return f"{ratio:.2g} ({c['rel']:.1e})"


def render(data: dict) -> str:
    """The markdown page for ``data`` (the JSON the suite wrote)."""
    rows = sorted(
        data["rows"].values(),
        key=lambda r: (ORDER.index(r["framework"]) if r["framework"] in ORDER else 99, r["api"],
                       {"float64": 0, "float32": 1, "float16": 2}.get(r["dtype"], 3)),
    )
    quantities = [q for q in data["quantities"] if any(q in r["cells"] for r in rows)]
    worst = max((c["ratio"] for r in rows for c in r["cells"].values()), default=0.0)
    out = [
        "# Conformance: bnref against the real frameworks",
        "",
        "<!-- generated by scripts/make_conformance.py from docs/conformance.json: do not edit -->",
        "",
        f"Generated {data['generated']} on {data['platform']} (Python {data['python']}, "
        f"NumPy {data['numpy']}, bnref {data['bnref']}) by running `tests/conformance` "
        "(`python scripts/make_conformance.py`). Every framework is run on the same inputs as "
        "bnref; a cell is the worst over all configurations of that row (ranks 2–5, channel "
        "axis first and last, default and non-default eps and momentum).",
        "",
        "**Cell** = worst `error / allowed` (≤ 1 passes) and, in parentheses, the worst "
        "natural-scale relative error `|got − want| / scale`. **Allowed** = "
        "`k · eps_dtype · scale` elementwise (`bnref.testing.Tolerance`): k = 8 for float16 "
        "(bound 7.8e-3), 64 for float32 (7.6e-6), 1e4 for float64 (2.2e-12). **Scale** "
        "(ulp bounds on y near zero are meaningless, since frameworks fold the affine step "
        "differently): y: |γ|(1+|x̂|)+|β|; dx: |γ|/σ·(|dy| + rms(dy)(1+|x̂|)); dscale: Σ|dy·x̂|; "
        "dbias: Σ|dy|; running stats: |value| (+ std for the mean); Precise BN: |mean|+std for "
        "the mean, var+mean² for the variance (estimators that subtract E[x]² work at that scale).",
        "",
        f"Worst ratio over the whole matrix: **{worst:.2g}**.",
        "",
        "| framework | API | dtype | version | " + " | ".join(QUANTITY_TITLES[q] for q in quantities) + " |",
        "|---|---|---|---|" + "---|" * len(quantities),
    ]
    for r in rows:
        cells = " | ".join(_cell(r["cells"].get(q)) for q in quantities)
        out.append(f"| {r['framework']} | {r['api']} | {r['dtype']} | {r['version']} | {cells} |")
    out += [
        "",
        "Configurations per row (`variants` in the JSON):",
        "",
    ]
    for r in rows:
        if r["variants"]:
            out.append(f"- {r['framework']} {r['api']} {r['dtype']}: " + "; ".join(r["variants"]))
    out += [
        "",
        "## Conventions",
        "",
        "Each value is the framework's default, in its own meaning, as `bnref.conventions` "
        "records it; the last column names the live test that asserts it.",
        "",
        "| framework | running update (momentum meaning, default) | eps | running variance | "
        "channel axis | source | checked by |",
        "|---|---|---|---|---|---|---|",
    ]
    out += [f"| {' | '.join(c)} |" for c in CONVENTIONS]
    out += [
        "",
        "## What each Precise BN implementation aggregates",
        "",
        "| implementation | bnref estimator | aggregates | source | checked by |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {' | '.join(c)} |" for c in PRECISE]
    out += [
        "",
        "## Findings from running the frameworks",
        "",
        "- ONNX's `epsilon` and `momentum` are FLOAT attributes: in a float64 graph the effective "
        "eps is float32(1e-5) = 9.99999974738e-06, visible at ~1e-9 relative error; compare with "
        "`eps=float(np.float32(eps))`.",
        "- PyTorch 2.13 raises `ValueError` for eps ≤ 0 in training mode; bnref accepts eps = 0.",
        "- Flax's default `use_fast_variance=True` differs from bnref only by the cancellation "
        "of E[x²]−E[x]² in float32 (error ≈ eps32·(mean/std)²): within the float32 bound for "
        "|mean| ≲ std, far outside it at mean/std = 3000. `use_fast_variance=False` matches to "
        "the bound on any case.",
        "- fvcore's population estimate is biased (no n/(n−1)) and also subtracts E[x]² in the "
        "model dtype; torch's `update_bn` is the mean-of-variances estimate, so the two differ "
        "when batch sizes differ or batch means vary.",
        "- onnxruntime CPU training mode is correct when the running statistics are fed as "
        "inputs; with shared initializers see onnxruntime issue 29790 (FACTS.md).",
        "- Golden vectors from these runs are in `tests/golden/data` (versions in "
        "`tests/golden/versions.json`); `tests/golden/test_golden.py` checks bnref against them "
        "without any framework installed.",
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    """Run the suite (unless ``--render``) and write docs/conformance.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", action="store_true", help="only render from docs/conformance.json")
    args = ap.parse_args(argv)
    rc = 0 if args.render else run_suite()
    data = json.loads(JSON_PATH.read_text())
    MD_PATH.write_text(render(data))
    print(f"wrote {MD_PATH.relative_to(ROOT)} ({len(data['rows'])} rows); pytest exit code {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
