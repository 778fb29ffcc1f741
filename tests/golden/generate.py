"""Regenerate the golden vectors: run each framework on small fixed inputs and save .npz files.

Usage (needs the ``frameworks`` extra, and the environments of ``make test-reference``)::

    KERAS_BACKEND=jax python -m tests.golden.generate              # everything
    python -m tests.golden.generate --reference                    # TF, Keras on TF/torch, Paddle, MXNet

Writes ``tests/golden/data/*.npz`` and ``tests/golden/versions.json`` (the versions that made
them). ``tests/golden/test_golden.py`` checks bnref against these files with no framework
installed. Each file holds the inputs (x, scale, bias, running_mean, running_var, dy), what the
framework returned (y_train, new_running_mean, new_running_var, y_eval, dx, dscale, dbias, as
far as the API provides them) and, as 0-d string/float arrays, the metadata: framework, api,
convention, eps, momentum, axis. Precise-BN files hold batches ``batch_<i>`` and the
aggregated ``precise_mean``/``precise_var`` with the estimator's name.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path

import ml_dtypes
import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from tests.conformance import adapters  # noqa: E402
from tests.conformance._lib import make_case, shape_with_channels  # noqa: E402

DATA = HERE / "data"


def _save(name: str, arrays: dict, meta: dict) -> None:
    DATA.mkdir(exist_ok=True)
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    bf16 = sorted(k for k, v in payload.items() if v.dtype == ml_dtypes.bfloat16)
    payload.update({k: payload[k].view(np.uint16) for k in bf16})  # .npz has no bfloat16
    if bf16:
        meta = dict(meta, bfloat16=",".join(bf16))
    payload.update({f"meta_{k}": np.asarray(v) for k, v in meta.items()})
    np.savez_compressed(DATA / f"{name}.npz", **payload)


def _bn_case(name, framework, api, impl, convention, *, rank, axis, dtype, eps, momentum, seed):
    case = make_case(shape_with_channels(rank, axis), axis, dtype, seed=seed)
    c = case
    out = {"x": c.x, "scale": c.scale, "bias": c.bias, "running_mean": c.running_mean,
           "running_var": c.running_var, "dy": c.dy}
    if impl.train is not None:
        y, rm, rv = impl.train(c.x, c.scale, c.bias, c.running_mean.copy(), c.running_var.copy(),
                               eps=eps, momentum=momentum, axis=axis)
        out.update(y_train=y, new_running_mean=rm, new_running_var=rv)
    if impl.eval is not None:
        out["y_eval"] = impl.eval(c.x, c.scale, c.bias, c.running_mean, c.running_var, eps=eps, axis=axis)
    if impl.backward is not None:
        dx, ds, db = impl.backward(c.x, c.scale, c.bias, c.dy, eps=eps, axis=axis)
        out.update(dx=dx, dscale=ds, dbias=db)
    _save(name, out, {"framework": framework, "api": api, "convention": convention,
                      "eps": eps, "momentum": momentum, "axis": axis})


def torch_files(versions):
    import torch

    versions["torch"] = torch.__version__
    for dt in (np.float32, np.float16, np.float64):
        _bn_case(f"torch_functional_{np.dtype(dt).name}", "PyTorch", "F.batch_norm",
                 adapters.torch_functional(), "pytorch", rank=4, axis=1, dtype=dt, eps=1e-5,
                 momentum=0.1, seed=1)
    _bn_case("torch_module_bn1d_eps1e-2_mom0.3", "PyTorch", "nn.BatchNorm1d", adapters.torch_module(),
             "pytorch", rank=3, axis=1, dtype=np.float32, eps=1e-2, momentum=0.3, seed=2)

    from torch.optim.swa_utils import update_bn

    batches = _precise_batches()
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    update_bn([torch.from_numpy(b) for b in batches], torch.nn.Sequential(bn))
    _save_precise("torch_swa_update_bn", "PyTorch", "swa_utils.update_bn", "mean_of_variances",
                  batches, bn)


def _precise_batches():
    rng = np.random.default_rng(7)
    return [rng.standard_normal((n, 3, 3, 3)) + rng.standard_normal((n, 3, 1, 1)) * 2 + 1
            for n in (6, 6, 6, 2)]


def _save_precise(name, framework, api, estimator, batches, bn):
    arrays = {f"batch_{i}": b for i, b in enumerate(batches)}
    arrays.update(precise_mean=bn.running_mean.numpy(), precise_var=bn.running_var.numpy())
    _save(name, arrays, {"framework": framework, "api": api, "estimator": estimator, "axis": 1})


def fvcore_files(versions):
    import torch
    from fvcore.nn.precise_bn import update_bn_stats

    versions["fvcore"] = version("fvcore")
    batches = _precise_batches()
    bn = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    model = torch.nn.Sequential(bn).train()
    update_bn_stats(model, [torch.from_numpy(b) for b in batches], num_iters=len(batches))
    _save_precise("fvcore_update_bn_stats", "fvcore", "nn.update_bn_stats", "population", batches, bn)


def flax_files(versions):
    import flax
    import jax

    versions["flax"], versions["jax"] = flax.__version__, jax.__version__
    for fast in (True, False):
        for dt in (np.float32, np.float16):
            _bn_case(f"flax_linen_fast{fast}_{np.dtype(dt).name}", "Flax",
                     f"linen.BatchNorm(use_fast_variance={fast})", adapters.flax_linen(fast), "flax",
                     rank=4, axis=-1, dtype=dt, eps=1e-5, momentum=0.99, seed=3)
    _bn_case("flax_nnx_axis1_eps1e-2_mom0.9", "Flax", "nnx.BatchNorm", adapters.flax_nnx(True),
             "flax", rank=3, axis=1, dtype=np.float32, eps=1e-2, momentum=0.9, seed=4)


def keras_files(versions):
    import keras

    versions["keras"] = keras.__version__
    for dt in (np.float32, np.float16):
        _bn_case(f"keras_bn_{np.dtype(dt).name}", "Keras 3 (JAX)", "layers.BatchNormalization",
                 adapters.keras_bn(), "keras", rank=4, axis=-1, dtype=dt, eps=1e-3,
                 momentum=0.99, seed=5)


def onnx_files(versions):
    import onnx
    import onnxruntime

    versions["onnx"], versions["onnxruntime"] = onnx.__version__, onnxruntime.__version__
    eps, mom = float(np.float32(1e-5)), float(np.float32(0.9))  # FLOAT attributes
    _bn_case("onnx_reference_float32", "ONNX", "reference.ReferenceEvaluator",
             adapters.onnx_reference(), "onnx", rank=4, axis=1, dtype=np.float32, eps=eps,
             momentum=mom, seed=6)
    _bn_case("onnxruntime_cpu_float16_eval", "onnxruntime", "CPU EP, training_mode=0",
             adapters.onnxruntime_cpu(False), "onnx", rank=4, axis=1, dtype=np.float16, eps=eps,
             momentum=mom, seed=7)
    _bn_case("onnxruntime_cpu_float32_train", "onnxruntime", "CPU EP, training_mode=1",
             adapters.onnxruntime_cpu(True), "onnx", rank=3, axis=1, dtype=np.float32, eps=eps,
             momentum=mom, seed=8)


def reference_files(versions):
    """TensorFlow, tf-keras 2, Keras 3 on TF and torch, Paddle, MXNet: each in its own
    environment (``tests.conformance.remote``; ``make test-reference`` creates them)."""
    from tests.conformance.remote import Worker, remote_impl

    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = {  # worker: [(file, framework, api, builder, kwargs, convention, rank, axis, dtype, eps, mom)]
        "tf": [
            ("tf_fused_raw_float32", "TensorFlow", "raw_ops.FusedBatchNormV3", "adapters_tf:tf_fused",
             {"api": "raw"}, "tf_fused", 4, -1, np.float32, 1e-3, 0.3),
            ("tf_fused_v1_bfloat16", "TensorFlow", "compat.v1.nn.fused_batch_norm", "adapters_tf:tf_fused",
             {"api": "v1"}, "tf_fused", 4, -1, bf16, 1e-3, 1.0),
            ("tf_nn_moments_float64", "TensorFlow", "nn.moments + nn.batch_normalization",
             "adapters_tf:tf_nn_moments", {}, "keras", 3, 1, np.float64, 1e-3, 0.9),
            ("tf_keras2_fused_float32", "tf-keras 2", "layers.BatchNormalization", "adapters_tf:keras_layer",
             {"module": "tf_keras"}, "tf_keras2", 4, -1, np.float32, 1e-3, 0.9),
            ("keras3_tensorflow_float16", "Keras 3 (TensorFlow)", "layers.BatchNormalization",
             "adapters_tf:keras_layer", {"module": "keras"}, "keras", 4, -1, np.float16, 1e-3, 0.99),
        ],
        "main": [
            ("keras3_torch_bfloat16", "Keras 3 (torch)", "layers.BatchNormalization", "adapters_tf:keras_layer",
             {"module": "keras"}, "keras", 4, -1, bf16, 1e-3, 0.99),
        ],
        "paddle": [
            ("paddle_functional_nhwc_float32", "PaddlePaddle", "nn.functional.batch_norm",
             "adapters_paddle:functional", {}, "paddle", 4, -1, np.float32, 1e-5, 0.9),
            ("paddle_bn1d_float64", "PaddlePaddle", "nn.BatchNorm1D", "adapters_paddle:module", {}, "paddle",
             3, 1, np.float64, float(np.float32(1e-2)), float(np.float32(0.3))),
        ],
        "mxnet": [
            ("mxnet_operator_float32", "MXNet", "nd.BatchNorm(fix_gamma=False)", "adapters_mxnet:operator",
             {}, "mxnet", 4, 1, np.float32, 1e-5, 0.9),
        ],
    }
    for env, files in specs.items():
        w = Worker(env, {"KERAS_BACKEND": "tensorflow" if env == "tf" else "torch", "TF_CPP_MIN_LOG_LEVEL": "3"})
        versions.update({f"{env}:{k}": v for k, v in w.versions.items() if k not in ("python",)})
        for i, (name, fw, api, builder, kw, conv, rank, axis, dt, eps, mom) in enumerate(files):
            _bn_case(name, fw, api, remote_impl(w, builder, **kw), conv, rank=rank, axis=axis,
                     dtype=dt, eps=eps, momentum=mom, seed=90 + i)
        w.close()


def main() -> None:
    """Regenerate every fixture and the versions file (``--reference``: only the frameworks
    that run in their own environments, merged into the existing versions file)."""
    if "--reference" in sys.argv:
        versions = json.loads((HERE / "versions.json").read_text())
        reference_files(versions)
        (HERE / "versions.json").write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")
        return
    versions = {"numpy": np.__version__, "python": platform.python_version()}
    for fn in (torch_files, fvcore_files, flax_files, keras_files, onnx_files, reference_files):
        fn(versions)
    (HERE / "versions.json").write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(list(DATA.glob('*.npz')))} fixtures to {DATA}")


if __name__ == "__main__":
    main()
