"""Live check against PyTorch: export a CNN with BN kept, recalibrate, compare with torch.

``population``: PyTorch's own training-mode forward on the same batches, BN inputs captured by
forward pre-hooks and pooled in float64. ``mean_of_variances``: ``torch.optim.swa_utils.
update_bn`` on the same batches.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.frameworks,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

import onnx_tools as ot  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 6)
        self.bn3 = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3))
        return self.head(torch.relu(self.bn3(self.fc(x))))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = Net()
    # Give the BNs non-trivial affine params and stale running stats.
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
            bn.running_mean.fill_(0.3)
            bn.running_var.fill_(2.0)
    net.eval()
    path = tmp_path_factory.mktemp("torch") / "net.onnx"
    x = torch.randn(4, 3, 8, 8)
    torch.onnx.export(net, (x,), str(path), dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "N"}})
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(96, 3, 8, 8)) * 2 + 1).astype(np.float32)
    return net, path, data


def _bn_by_channels(result, net):
    """Map torch BN modules to ONNX BN keys in graph order (the export keeps the order)."""
    keys = [r.key for r in result.report.rows]
    return dict(zip((net.bn1, net.bn2, net.bn3), keys, strict=True))


def _stored(model, key):
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and node.output[0] == key:
            return (numpy_helper.to_array(inits[node.input[3]]),
                    numpy_helper.to_array(inits[node.input[4]]))
    raise AssertionError(onnx.helper.printable_graph(model.graph))


def test_population_matches_torch_training_forward(exported):
    net, path, data = exported
    result = ot.recalibrate(str(path), data, batch_size=32, provider="cpu")
    assert len(result.report.rows) == 3
    model = copy.deepcopy(net).train()
    captured = {bn: [] for bn in (model.bn1, model.bn2, model.bn3)}
    hooks = [bn.register_forward_pre_hook(lambda m, a: captured[m].append(a[0].double()))
             for bn in captured]
    with torch.no_grad():
        for i in range(0, 96, 32):
            model(torch.from_numpy(data[i:i + 32]))
    for h in hooks:
        h.remove()
    keys = _bn_by_channels(result, net)
    for bn_orig, bn in zip((net.bn1, net.bn2, net.bn3), captured, strict=True):
        xs = torch.cat(captured[bn])
        dims = [0] + list(range(2, xs.dim()))
        mean, var = xs.mean(dim=dims).numpy(), xs.var(dim=dims, unbiased=False).numpy()
        got_mean, got_var = _stored(result.model, keys[bn_orig])
        np.testing.assert_allclose(got_var, var, rtol=1e-4)
        np.testing.assert_allclose(got_mean, mean, atol=1e-4 * np.sqrt(var.max()))


def test_mean_of_variances_matches_update_bn(exported):
    net, path, data = exported
    result = ot.recalibrate(str(path), data, batch_size=32, provider="cpu",
                            estimator="mean_of_variances")
    model = copy.deepcopy(net)
    loader = [torch.from_numpy(data[i:i + 32]) for i in range(0, 96, 32)]
    torch.optim.swa_utils.update_bn(loader, model)
    keys = _bn_by_channels(result, net)
    for bn_orig, bn in zip((net.bn1, net.bn2, net.bn3), (model.bn1, model.bn2, model.bn3),
                           strict=True):
        got_mean, got_var = _stored(result.model, keys[bn_orig])
        np.testing.assert_allclose(got_var, bn.running_var.numpy(), rtol=1e-4)
        np.testing.assert_allclose(got_mean, bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
    # The recalibrated ONNX model and the updated torch model now agree in eval mode.
    import onnxruntime as ort

    sess = ort.InferenceSession(result.model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(data[:16])).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": data[:16]})[0], want, rtol=1e-3, atol=1e-4)


def test_fresh_model_export_aliases_are_unshared(tmp_path):
    """TorchScript export of a fresh model aliases running_var to weight (both ones)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    path = tmp_path / "fresh.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"],
                      dynamic_axes={"x": {0: "N"}})
    info = ot.inspect_model(str(path))[0]
    data = np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)
    result = ot.recalibrate(str(path), data, batch_size=16, provider="cpu")
    model = copy.deepcopy(net).train()
    with torch.no_grad():
        xs = torch.cat([net[0](torch.from_numpy(data[i:i + 16])) for i in (0, 16)]).double()
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    bn_node = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    np.testing.assert_allclose(inits[bn_node.input[4]],
                               xs.var(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-4)
    # the export aliased running_var to the weight; the weight must keep its value
    assert info.sources["var"].chain and info.sources["var"].shared
    np.testing.assert_array_equal(inits[bn_node.input[1]], model[1].weight.detach().numpy())
    np.testing.assert_array_equal(inits[bn_node.input[2]], model[1].bias.detach().numpy())
