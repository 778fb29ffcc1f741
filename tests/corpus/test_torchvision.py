"""torchvision architectures through both torch.onnx exporters, against PyTorch itself.

Per case (``torch_cases.py``): random init (seed 0), random BN affine params and stale
running statistics (``-fresh``: torchvision's BN initialization untouched); 3 batches of 8
images (64x64, mnasnet 96x96). The model is exported (TorchScript ``training=PRESERVE`` /
dynamo ``optimize=False``), ``onnx_tools.recalibrate`` writes a new file, and every BN's
mean/var in it is compared with

* ``population``: PyTorch's train-mode BN inputs on the same batches, pooled in float64;
* ``mean_of_variances`` (``apply_stats`` on the same collection): PyTorch's own running
  statistics with ``momentum=None`` (the mean of batch means and of unbiased batch variances);

to ``reference.RTOL`` = 1e-4 relative (measured worst: 2.5e-5, regnet_y_400mf: float32
propagation, which separates PyTorch's own float32 and float64 forwards by as much). The
exported statistics must be off by > 100x the tolerance first (so the comparison can fail),
ONNX BN nodes and torch layers must pair one-to-one, every BN's scale must be unchanged (a
fresh export aliases the statistics to the scales), and the recalibrated model's eval output
must equal torch's eval output with the new statistics loaded to 1e-4 of the output's scale
(measured worst: 1.2e-5).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.corpus import needs
from tests.corpus.reference import assert_stats_close, assert_stats_differ, batchnorm_tensors

torch = needs.module("torch")
needs.module("torchvision")
ort = needs.module("onnxruntime")
import onnx_tools as ot  # noqa: E402
from tests.corpus import torch_cases as tc  # noqa: E402

pytestmark = needs.TORCH_MARKS

#: Run with the rest of the suite (CI): residual blocks through dynamo (resnet18; external
#: data), stochastic depth + SiLU + squeeze-excite through TorchScript (efficientnet_b0), and a
#: freshly initialized model through TorchScript, whose statistics the exporter deduplicates
#: into shared tensors read through Identity aliases (mobilenet_v3_small: depthwise, hardswish).
#: Everything else carries the ``corpus`` marker.
REPRESENTATIVE = {
    ("resnet18", "dynamo", False),
    ("efficientnet_b0", "torchscript", False),
    ("mobilenet_v3_small", "torchscript", True),
}
VARIANTS = [(e, False) for e in tc.EXPORTERS] + [("torchscript", True)]  # dynamo does not alias
CASES = [
    pytest.param(arch, exporter, fresh, id=f"{arch}-{exporter}{'-fresh' if fresh else ''}",
                 marks=() if (arch, exporter, fresh) in REPRESENTATIVE else pytest.mark.corpus)
    for arch in tc.ARCHITECTURES
    for exporter, fresh in VARIANTS
]


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch, exporter, fresh", CASES)
def test_recalibrated_statistics_match_pytorch(arch, exporter, fresh, tmp_path):
    case = tc.build(arch, fresh=fresh)
    path = tc.export(case, exporter, tmp_path / f"{arch}.onnx")
    before = batchnorm_tensors(onnx.load(path))
    pairs = tc.match_batchnorms(case, before)
    ref = tc.torch_reference(case)
    for key, module in pairs.items():
        assert_stats_differ(before[key]["mean"], before[key]["var"], *ref["population"][module], key)

    out = tmp_path / "recalibrated.onnx"
    result = ot.recalibrate(str(path), case.data, output=str(out), batch_size=case.batch,
                            provider="cpu")
    assert result.stats.num_batches == len(case.batches)
    after = batchnorm_tensors(onnx.load(out))
    assert set(after) == set(before)
    for key, module in pairs.items():
        assert_stats_close(after[key]["mean"], after[key]["var"], *ref["population"][module],
                           f"{arch}/{exporter} {key} (population)")
        np.testing.assert_array_equal(after[key]["scale"], before[key]["scale"])

    swa = batchnorm_tensors(ot.apply_stats(str(path), result.stats,
                                              estimator="mean_of_variances").model)
    for key, module in pairs.items():
        assert_stats_close(swa[key]["mean"], swa[key]["var"], *ref["mean_of_variances"][module],
                           f"{arch}/{exporter} {key} (mean_of_variances)")

    # End to end: the written model in eval mode equals torch in eval mode with the new stats.
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = case.data[: case.batch]
    (got,) = sess.run(None, {"x": x})
    want = tc.eval_logits(case, {m: ref["population"][m] for m in pairs.values()}, x)
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() <= 1e-4 * scale, (np.abs(got - want).max(), scale)
