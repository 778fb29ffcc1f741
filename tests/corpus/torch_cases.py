"""torchvision architectures exported by torch.onnx, and PyTorch's own Precise BN statistics.

:func:`build` makes a randomly initialized architecture (fixed seed) whose BN layers carry
random affine parameters and *stale* running statistics (so recalibration has to change them,
and every BN's scale is distinct, which :func:`match_batchnorms` uses to pair ONNX nodes with
modules); ``fresh=True`` leaves torchvision's initialization (scale 1, bias 0, mean 0, var 1
everywhere: the TorchScript exporter then deduplicates them into one shared tensor per shape,
read through Identity aliases, and the pairing is by execution order). :func:`export` writes it with the TorchScript exporter (``training=PRESERVE``) or the
dynamo exporter (``optimize=False``). :func:`torch_reference` runs the same batches through
the model with every BN in training mode and everything else (dropout, stochastic depth) in
eval mode, as the ONNX collection model does, and returns per BN

* ``population``: float64 pooled mean and biased variance of all values of the BN's input
  over all batches (forward pre-hooks; per-batch moments combined exactly);
* ``mean_of_variances``: what PyTorch itself keeps with ``momentum=None`` (cumulative
  average) after ``reset_running_stats``: the mean of batch means and of *unbiased* batch
  variances, equal weight per batch (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

_BN = torch.nn.modules.batchnorm._BatchNorm

#: name -> (constructor, image side). Small variants and 64x64 or 96x96 inputs keep each case
#: to seconds; every architecture still reduces to >= 2x2 before its head.
ARCHITECTURES = {
    "resnet18": (torchvision.models.resnet18, 64),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, 64),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, 64),
    "densenet121": (torchvision.models.densenet121, 64),
    "shufflenet_v2_x0_5": (torchvision.models.shufflenet_v2_x0_5, 64),
    "regnet_y_400mf": (torchvision.models.regnet_y_400mf, 64),
    "mnasnet0_5": (torchvision.models.mnasnet0_5, 96),
}
EXPORTERS = ("torchscript", "dynamo")


@dataclass
class TorchCase:
    """A built model, its calibration batches, and its BN modules in execution order."""

    name: str
    model: torch.nn.Module
    data: np.ndarray  # (num_batches * batch, 3, side, side) float32
    batch: int
    bns: dict[str, torch.nn.Module]  # qualified module name -> BN module
    order: list[str]  # BN module names in the order a forward pass runs them
    fresh: bool = False

    @property
    def batches(self) -> list[np.ndarray]:
        return [self.data[i : i + self.batch] for i in range(0, len(self.data), self.batch)]


def build(name: str, batch: int = 8, num_batches: int = 3, seed: int = 0,
          fresh: bool = False) -> TorchCase:
    """``name`` with random weights, random BN affine params and stale running stats.

    ``fresh``: torchvision's own initialization of the BN layers, untouched.
    """
    ctor, side = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = ctor(weights=None, num_classes=10).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BN)}
    with torch.no_grad():
        for bn in [] if fresh else bns.values():
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)  # distinct per BN: the pairing key
            bn.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            bn.running_mean.copy_(torch.randn(c, generator=gen))
            bn.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.5)
    rng = np.random.default_rng(seed)
    n = batch * num_batches
    # Per-image brightness/contrast offsets: pixels of one image are correlated, as in photos,
    # so the two estimators differ measurably.
    x = rng.normal(size=(n, 3, side, side)) * rng.uniform(0.5, 1.5, (n, 1, 1, 1))
    x += rng.normal(size=(n, 3, 1, 1)) * 0.5
    x = x.astype(np.float32)
    order: list[str] = []
    handles = [bn.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, bn in bns.items()]
    with torch.no_grad():
        model(torch.from_numpy(x[:2]))
    for h in handles:
        h.remove()
    return TorchCase(name, model, x, batch, bns, order, fresh)


def export(case: TorchCase, exporter: str, path: Path) -> Path:
    """Export ``case.model`` (eval mode, BN kept) with a dynamic batch axis named ``N``."""
    example = (torch.from_numpy(case.data[: case.batch]),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(case.model, example, str(path), dynamo=False,
                              training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "N"}})
        elif exporter == "dynamo":
            torch.onnx.export(case.model, example, str(path), dynamo=True, optimize=False,
                              input_names=["x"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("N")},), verbose=False)
        else:
            raise ValueError(exporter)
    return path


def torch_reference(case: TorchCase) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{estimator: {module name: (mean, var)}}`` from PyTorch on ``case.batches``."""
    model = copy.deepcopy(case.model).eval()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, _BN)}
    moments: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {n: [] for n in bns}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            m = x.mean(dim=1, keepdim=True)
            moments[name].append((x.shape[1], m[:, 0].numpy(), ((x - m) ** 2).sum(dim=1).numpy()))
        return record

    handles = []
    for name, bn in bns.items():
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: mean of batch means / unbiased batch vars
        bn.train()
        handles.append(bn.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        for xb in case.batches:
            model(torch.from_numpy(xb))
    for h in handles:
        h.remove()
    population = {}
    for name, rows in moments.items():
        counts = np.array([r[0] for r in rows], np.float64)[:, None]
        means = np.stack([r[1] for r in rows])
        mean = (counts * means).sum(0) / counts.sum()
        m2 = sum(r[2] for r in rows) + (counts * (means - mean) ** 2).sum(0)
        population[name] = (mean, m2 / counts.sum())
    swa = {n: (bn.running_mean.double().numpy(), bn.running_var.double().numpy())
           for n, bn in bns.items()}
    return {"population": population, "mean_of_variances": swa}


def eval_logits(case: TorchCase, stats: dict[str, tuple[np.ndarray, np.ndarray]],
                x: np.ndarray) -> np.ndarray:
    """The eval-mode output of ``case.model`` with ``stats`` loaded as running statistics."""
    model = copy.deepcopy(case.model).eval()
    with torch.no_grad():
        for name, bn in model.named_modules():
            if name in stats:
                bn.running_mean.copy_(torch.from_numpy(stats[name][0]))
                bn.running_var.copy_(torch.from_numpy(stats[name][1]))
        return model(torch.from_numpy(x)).numpy()


def match_batchnorms(case: TorchCase, tensors: dict[str, dict[str, np.ndarray]]) -> dict[str, str]:
    """ONNX BN output name -> torch module name, paired by their (distinct) scale vectors.

    A fresh model's scales are all ones: there ONNX BN nodes (in graph order) pair with the
    modules in execution order. Fails unless the pairing is one-to-one over all BN layers of
    both, with equal channels and equal scales.
    """
    if case.fresh:
        assert len(tensors) == len(case.order) == len(set(case.order)) == len(case.bns)
        pairs = dict(zip(tensors, case.order, strict=True))
        for key, name in pairs.items():
            np.testing.assert_array_equal(tensors[key]["scale"], case.bns[name].weight.detach().numpy())
        return pairs
    by_scale = {bn.weight.detach().numpy().tobytes(): name for name, bn in case.bns.items()}
    assert len(by_scale) == len(case.bns), "two BN layers share a scale vector"
    pairs = {}
    for key, t in tensors.items():
        scale = np.asarray(t["scale"], np.float32)
        name = by_scale.get(scale.tobytes())
        assert name is not None, f"ONNX BN {key}: no torch BN has its scale"
        assert case.bns[name].num_features == scale.shape[0]
        pairs[key] = name
    assert sorted(pairs.values()) == sorted(case.bns), "ONNX BN nodes and torch BN layers differ"
    return pairs
