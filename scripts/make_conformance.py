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
ORDER = ["PyTorch", "fvcore", "Flax", "Keras 3 (JAX)", "Keras 3 (TensorFlow)", "Keras 3 (torch)",
         "TensorFlow", "tf-keras 2", "PaddlePaddle", "MXNet", "ONNX", "onnxruntime"]
DTYPE_ORDER = {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}

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
    ("Keras 3 on TensorFlow / torch backends", "as Keras 3 (JAX)", "as Keras 3",
     "biased; torch backend: E[x²]−E[x]² (`keras/src/backend/torch/nn.py` `moments`)", "−1",
     "keras/src/layers/normalization/batch_normalization.py (`call`: inputs cast to "
     "`result_type(dtype, \"float32\")`, which is float32 for float64 on the torch backend)",
     "test_keras_backends.py::test_defaults_match_convention, test_several_updates, "
     "test_torch_backend_computes_float64_in_float32"),
    ("TensorFlow `raw_ops.FusedBatchNormV3`, `compat.v1.nn.fused_batch_norm`",
     "new = (1−f)·old + f·batch, f = `exponential_avg_factor` (default 1: the batch statistics)",
     "wrapper 1e-3, raw op 1e-4; **no floor**: 2.21 uses eps as given (corrected: bnref recorded "
     "a 1.001e-5 floor, `TF_FUSED.min_eps` is now 0)", "unbiased n/(n−1) (normalizes with biased)",
     "−1 (NHWC; NCHW via data_format)",
     "tensorflow/python/ops/nn_impl.py `fused_batch_norm` (2.21: no `min_epsilon`); "
     "core/kernels/fused_batch_norm_op.cc",
     "test_tensorflow.py::test_fused_batch_norm, test_fused_eps_is_not_floored"),
    ("TensorFlow `nn.moments` + `nn.batch_normalization`", "none (the user's EMA)", "argument",
     "`moments`: biased", "any (`axes`)", "tensorflow/python/ops/nn_impl.py",
     "test_tensorflow.py::test_moments_and_batch_normalization"),
    ("tf-keras 2 `layers.BatchNormalization`", "new = m·old + (1−m)·batch, m = 0.99; the decay "
     "1−m is a float32 tensor (float64 layers update with float32(0.01))", "1e-3, inside sqrt",
     "**fused path (4-D/5-D input, the default there): unbiased n/(n−1)**; plain path (2-D/3-D, "
     "fused=False): biased (corrected: bnref recorded biased for both, `TF_KERAS2` is now "
     "unbiased)", "−1",
     "tf_keras/src/layers/normalization/batch_normalization.py 2.21 (`_fused_batch_norm`: "
     "`exponential_avg_factor=1-momentum`; `_bessels_correction_test_only = True` skips the "
     "(n−1)/n that would strip the fused op's Bessel factor)",
     "test_tensorflow.py::test_tf_keras2_defaults, test_tf_keras2_moving_variance_bessel_depends_"
     "on_the_path, test_tf_keras2_several_updates"),
    ("PaddlePaddle `nn.BatchNorm1D/2D/3D`, `nn.functional.batch_norm`",
     "new = m·old + (1−m)·batch, m = 0.9 (a float32 attribute: float64 updates use float32(0.9)); "
     "`use_global_stats=True`: normalizes with the running statistics and leaves them",
     "1e-5, inside sqrt", "biased (CPU kernel)", "1 (NCHW; NHWC, NLC, NDHWC "
     "via data_format)",
     "python/paddle/nn/layer/norm.py (`_BatchNormBase`); phi batch_norm CPU kernel (float32 and "
     "float64 only: float16/bfloat16 are not registered on the CPU)",
     "test_paddle.py::test_defaults_match_convention, test_several_updates, "
     "test_use_global_stats_normalizes_with_the_running_statistics, test_float64_uses_float32_momentum, "
     "test_half_precision_has_no_cpu_kernel"),
    ("MXNet 1.9.1 gluon `nn.BatchNorm`, `nd`/`sym.BatchNorm`",
     "new = m·old + (1−m)·batch, m = 0.9 (float32); **updated in the backward pass**: a training-"
     "mode forward alone leaves the moving statistics unchanged",
     "gluon 1e-5, operator 1e-3 (operator also `fix_gamma=True` by default)",
     "biased on the CPU; cuDNN unbiased (**not run here**: no GPU build, stays as recorded)", "1",
     "src/operator/nn/batch_norm.cc; python/mxnet/gluon/nn/basic_layers.py",
     "test_mxnet.py::test_defaults_match_convention, test_gluon_several_updates, "
     "test_moving_statistics_move_in_the_backward_pass"),
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


EXPORTS = [
    "## Real exports against the framework's own statistics",
    "",
    "`tests/corpus/test_live_exports.py` (in `make test-all` and `make test-reference`): the "
    "exporting framework runs its model in training mode on the same batches, bnref pools its "
    "per-batch moments with the `population` estimator, and that must be what `bnref-onnx "
    "recalibrate` writes into the exported file (relative tolerance 1e-4, "
    "`tests/corpus/reference.py`).",
    "",
    "| export | framework run live | BNs | checked |",
    "|---|---|---|---|",
    "| `tests/corpus/data/tf2onnx_no_bn_fusion.onnx`, `tf2onnx_unoptimized.onnx` (tf2onnx, "
    "`make_tf2onnx.py`) | TF 2.21 `FusedBatchNormV3`, training mode (Bessel-corrected batch "
    "variance, undone before pooling) | 2 | statistics equal; TF's variance taken as-is fails |",
    "| `tests/corpus/data/paddle2onnx_bn.onnx` (paddle2onnx 2.1, `enable_optimize=False` keeps "
    "BN; `make_paddle2onnx.py` in `.venv-paddle`, 5 KB) | Paddle 3.3 `BatchNorm2D`, training "
    "mode, momentum 0 | 2 | statistics equal; momentum/epsilon attributes are Paddle's; the "
    "file's own statistics fail |",
]

NOT_RUN = [
    "## Not run here (unverified, as recorded)",
    "",
    "- MXNet's cuDNN path (unbiased running variance): needs a CUDA build of MXNet 1.9.1; "
    "the CPU build runs above.",
    "- MXNet bfloat16 (an AMP/oneDNN path): not run.",
    "- PaddlePaddle float16/bfloat16: no CPU kernel (asserted by "
    "`test_paddle.py::test_half_precision_has_no_cpu_kernel`); the GPU kernels are not run.",
    "- Keras 3 (JAX) float64: JAX runs float32 unless x64 is enabled process-wide; not run.",
]

RUNNING = [
    "## Running it, and what it costs",
    "",
    "`make test-reference` creates `.venv-tf` (tensorflow-cpu 2.21, tf-keras 2.21, Keras 3), "
    "`.venv-paddle` (paddlepaddle 3.3.1, paddle2onnx 2.1, onnx 1.17) and `.venv-mxnet` (mxnet "
    "1.9.1, numpy < 1.24: 1.9.1 still uses `np.bool`) from `tests/conformance/envs/*.txt` and "
    "runs the `reference`-marked tests; `make test-all` (CI) does the same as part of "
    "everything. `BNREF_PYTHON_<NAME>` points a test run at another environment's Python. "
    "Without the environments the live tests skip (an error under `BNREF_REQUIRE_REFERENCE=1`), "
    "and `tests/golden` still checks bnref against their saved outputs.",
    "",
    "Measured on this 2-core machine: installing the three environments took 62 + 22 + 11 s "
    "idle and 187 + 69 + 38 s (5.6 min with venv creation) under a load average of 7; the "
    "`reference` tests (97, including Keras 3 on torch and the real-export checks) took 80 s "
    "under the same load, and `make test-all`'s whole pytest phase with them (1290 tests) 5 min "
    "34 s. Against `make test-all`'s ~8 min in CI that is ~3–7 min more, inside the ~20 min "
    "budget, so CI runs them.",
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
                       DTYPE_ORDER.get(r["dtype"], 4)),
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
        "axis first and last, default and non-default eps and momentum). TensorFlow, tf-keras 2, "
        "Keras 3 on TensorFlow and on torch, PaddlePaddle and MXNet run in environments of "
        "their own (`make test-reference`: `.venv-tf`, `.venv-paddle`, `.venv-mxnet`, a second "
        "process for Keras on torch) driven through `tests/conformance/remote.py`.",
        "",
        "**Cell** = worst `error / allowed` (≤ 1 passes) and, in parentheses, the worst "
        "natural-scale relative error `|got − want| / scale`. **Allowed** = "
        "`k · eps_dtype · scale` elementwise (`bnref.testing.Tolerance`): k = 8 for float16 "
        "(bound 7.8e-3) and for bfloat16 (eps 2⁻⁷, bound 6.3e-2: derived like float16's, a few "
        "roundings of a float32 computation), 64 for float32 (7.6e-6), 1e4 for float64 (2.2e-12). "
        "At the 16-bit bounds a Bessel factor or eps placement is invisible: the conventions are "
        "checked in float32 and float64; the 16-bit rows check that the framework computes in "
        "float32 and stays in range. **Scale** "
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
    out += [""] + EXPORTS + [""] + NOT_RUN + [""] + RUNNING
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
        "- **Corrected conventions.** TF 2.21's fused batch norm (raw op and "
        "`compat.v1.nn.fused_batch_norm`) has no eps floor on the CPU: `TF_FUSED.min_eps` was "
        "1.001e-5 and is 0. tf-keras 2's default (fused) path on 4-D/5-D inputs puts the "
        "Bessel-corrected batch variance into the moving variance: `TF_KERAS2.unbiased_running_var` "
        "was False and is True (2-D/3-D inputs stay biased: use `KERAS` there).",
        "- MXNet 1.9.1 moves its running statistics in the backward pass, so a forward-only "
        "statistics pass (Precise BN) changes nothing there; PyTorch, Flax, Keras, TF and Paddle "
        "update in the forward.",
        "- float32 parameters: Paddle's and MXNet's momentum, and tf-keras 2's decay "
        "1 − momentum, are float32 even in float64 layers (as ONNX's): float64 rows compare with "
        "float32-rounded values (Paddle's eps is rounded too; MXNet's eps is a double). Keras 3 on torch computes float64 layers in float32 "
        "(`result_type(float64, \"float32\")` is float32 there): its float64 row is held to "
        "float32's bound.",
        "- bfloat16: PyTorch, Flax, Keras 3 (JAX, TensorFlow, torch), TF's fused op and "
        "`nn.moments` and tf-keras 2 run it on the CPU and stay within the bfloat16 bound; "
        "Paddle 3.3's CPU kernel has neither float16 nor bfloat16 (a test asserts the refusal); "
        "MXNet's bfloat16 (its AMP/oneDNN path) was not run: unverified.",
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
