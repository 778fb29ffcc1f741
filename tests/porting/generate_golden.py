"""Golden vectors of ``convert`` through raw TF fused batch norm and Paddle, which CI lacks.

Run in an environment with the framework (and this checkout on PYTHONPATH)::

    PYTHONPATH=. python -m tests.porting.generate_golden tf        # tensorflow(-cpu)
    PYTHONPATH=. python -m tests.porting.generate_golden paddle    # paddlepaddle

Each ``golden/<name>.npz`` holds NCHW ``x``, the parameters on both sides, what the framework
returned, and a JSON ``meta`` string (framework version, eps, momentum). Files named
``pytorch_to_*`` hold parameters converted here by ``bnref.conventions.convert``: the test
recomputes the conversion and refuses a file that no longer matches it. ``test_frameworks.py``
runs PyTorch live on the other side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bnref.conventions import by_name, convert
from tests.porting.cases import inputs, parameters

GOLDEN = Path(__file__).resolve().parent / "golden"
KEYS = ("scale", "bias", "mean", "var")


def _save(name: str, meta: dict, **arrays) -> None:
    GOLDEN.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN / f"{name}.npz", meta=np.asarray(json.dumps(meta, sort_keys=True)),
                        **{k: np.asarray(v) for k, v in arrays.items()})
    print("wrote", name)


def _port_files(fw: str, version: str, infer, *, src_eps: float, torch_eps: float,
                target_eps: float | None, seed: int) -> None:
    """``fw -> pytorch`` and ``pytorch -> fw``: inference outputs of ``fw``.

    ``y_naive``: PyTorch's parameters copied as they are, with ``target_eps`` (or the target's
    default) given to the framework: the mistake ``convert`` exists for.
    """
    p = parameters(seed)
    x = inputs(seed, p)
    _save(f"{fw}_to_pytorch", {"framework": fw, "version": version, "source_eps": src_eps},
          x=x, y=infer(x, p, src_eps), **{f"src_{k}": p[k] for k in KEYS})
    p = parameters(seed + 1)
    x = inputs(seed + 1, p)
    r = convert(*(p[k] for k in KEYS), source="pytorch", target=fw, source_eps=torch_eps,
                target_eps=target_eps)
    y_naive = infer(x, p, by_name(fw).eps if target_eps is None else target_eps)
    _save(f"pytorch_to_{fw}", {"framework": fw, "version": version, "source_eps": torch_eps,
                               "target_eps": target_eps, "eps": r.eps},
          x=x, y=infer(x, {k: getattr(r, k) for k in KEYS}, r.eps), y_naive=y_naive,
          **{f"src_{k}": p[k] for k in KEYS}, **{f"tgt_{k}": v for k, v in zip(KEYS, r[:4], strict=True)})


def _train_file(fw: str, version: str, train, *, torch_momentum: float, seed: int) -> None:
    """One training step with PyTorch's momentum converted: the running statistics."""
    p = parameters(seed)
    x = inputs(seed, p)
    m = convert(*(p[k] for k in KEYS), source="pytorch", target=fw,
                source_momentum=torch_momentum).momentum
    rm, rv = train(x, p, m)
    _save(f"{fw}_train", {"framework": fw, "version": version, "torch_momentum": torch_momentum,
                          "momentum": m},
          x=x, running_mean=rm, running_var=rv, **{f"src_{k}": p[k] for k in KEYS})


def tf_files() -> None:
    """Raw ``tf.compat.v1.nn.fused_batch_norm`` (NHWC); TF 2.21 no longer floors eps on the CPU."""
    import tensorflow as tf

    def infer(x, p, eps):
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            np.moveaxis(x, 1, -1), p["scale"], p["bias"], mean=p["mean"], variance=p["var"],
            epsilon=eps, is_training=False)
        return np.moveaxis(y.numpy(), -1, 1)

    def train(x, p, factor):
        _, rm, rv = tf.compat.v1.nn.fused_batch_norm(
            np.moveaxis(x, 1, -1), p["scale"], p["bias"], mean=p["mean"], variance=p["var"],
            epsilon=1e-3, is_training=True, exponential_avg_factor=factor)
        return rm.numpy(), rv.numpy()

    _port_files("tf_fused", tf.__version__, infer, src_eps=1e-3, torch_eps=1e-5,
                target_eps=None, seed=11)
    # does this TF floor a small eps at 1.001e-5, as older TF did? (test_golden_tf_small_eps_is_not_floored)
    p = parameters(15)
    x = inputs(15, p)
    _save("tf_fused_small_eps", {"framework": "tf_fused", "version": tf.__version__, "eps": 1e-7},
          x=x, y=infer(x, p, 1e-7), **{f"src_{k}": p[k] for k in KEYS})
    _train_file("tf_fused", tf.__version__, train, torch_momentum=0.3, seed=13)


def paddle_files() -> None:
    """``paddle.nn.functional.batch_norm`` (NCHW, CPU)."""
    import paddle
    import paddle.nn.functional as F

    def t(a):
        return paddle.to_tensor(np.ascontiguousarray(a))

    def infer(x, p, eps):
        y = F.batch_norm(t(x), t(p["mean"]), t(p["var"]), t(p["scale"]), t(p["bias"]),
                         training=False, epsilon=eps)
        return y.numpy()

    def train(x, p, momentum):
        rm, rv = t(p["mean"]), t(p["var"])
        F.batch_norm(t(x), rm, rv, t(p["scale"]), t(p["bias"]), training=True,
                     momentum=momentum, epsilon=1e-5)
        return rm.numpy(), rv.numpy()

    paddle.set_device("cpu")
    _port_files("paddle", paddle.__version__, infer, src_eps=1e-3, torch_eps=1e-3,
                target_eps=None, seed=21)
    _train_file("paddle", paddle.__version__, train, torch_momentum=0.3, seed=23)


if __name__ == "__main__":
    which = sys.argv[1:] or ["tf", "paddle"]
    for w in which:
        {"tf": tf_files, "paddle": paddle_files}[w]()
