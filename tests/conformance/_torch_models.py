"""A small conv net with three BN layers, its batches, and bnref collection of BN inputs."""

import numpy as np
import torch

import bnref


def small_net(dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 5), torch.nn.BatchNorm1d(5),
    )
    return net.to(getattr(torch, np.dtype(dtype).name))


def loader(dtype):
    """Batches of unequal sizes (the last is smaller) with a between-image offset, so the two
    Precise BN estimators differ and each sees its own weighting."""
    rng = np.random.default_rng(5)
    out = []
    for n in (8, 8, 8, 3):
        offset = rng.standard_normal((n, 2, 1, 1)) * 2.0
        out.append(torch.from_numpy((rng.standard_normal((n, 2, 6, 6)) + offset + 1.0).astype(dtype)))
    return out


def collect_bn_inputs(net, loader):
    """bnref.PreciseBN per BN layer, fed with each layer's training-mode input on every batch."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    precise = [bnref.PreciseBN("population") for _ in bns]
    hooks = [
        bn.register_forward_pre_hook(
            lambda mod, inp, p=p: p.update_from_array(inp[0].detach().double().numpy(), axis=1)
        )
        for bn, p in zip(bns, precise, strict=True)
    ]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    with torch.no_grad():
        for x in loader:
            net(x)
    for h in hooks:
        h.remove()
    net.load_state_dict(state)
    return bns, precise
