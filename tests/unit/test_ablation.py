"""Mean ablation (issue 12 item 3): a removed filter outputs its mean activation; materialised exactly."""
from __future__ import annotations

import torch
from torch import nn

import hookchains
from hookchains.core.ablation import channel_means, fold_constant_channels
from hookchains.core.materialize import materialize
from hookchains.core.subnetwork import Subnetwork
from hookchains.core.testing import random_subnetwork


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    for bn in (net[1], net[4]):
        nn.init.normal_(bn.bias, std=0.3), nn.init.normal_(bn.running_mean, std=0.3)
    return net


def _mean_ablated(net, sub, images, x):
    """The mean-ablated network computed directly: each removed channel of a BN output is overwritten by
    its mean over ``images`` in the original network (all means measured before any is applied)."""
    paths = [site.hook_module for site in sub.sites.filters]
    outputs = {}
    handles = [net.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: outputs.setdefault(p, o)) for p in paths]
    with torch.no_grad():
        net(images)
    for h in handles:
        h.remove()
    for site in sub.sites.filters:
        removed = sub.scores[site.name] < sub.tau
        scale = torch.where(removed, torch.zeros(()), sub.scores[site.name]).view(1, -1, 1, 1)
        mean = torch.where(removed, outputs[site.hook_module].mean((0, 2, 3)), torch.zeros(())).view(1, -1, 1, 1)
        handles.append(net.get_submodule(site.hook_module).register_forward_hook(
            lambda m, a, o, s=scale, c=mean: o * s + c))
    with torch.no_grad():
        expected = net(x)
    for h in handles:
        h.remove()
    return expected


def test_mean_ablation_materialises_exactly_and_removes_the_channels():
    net, images, x = _net(), torch.randn(6, 3, 8, 8), torch.randn(3, 3, 8, 8)
    zero = random_subnetwork(net, images[:1], counts={"0": 5, "3": 4}, gates_open=True)
    sub = Subnetwork(zero.sites, zero.scores, zero.gate_logits, ablation="mean",
                     means=channel_means(net, zero.sites, images))
    module, report = materialize(sub, net, images)
    with torch.no_grad():
        got = module(x)
    expected = _mean_ablated(net, sub, images, x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the outputs depend on the input
    assert [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)] == [5, 4]  # 1x1 conv, linear absorb
    assert report.channels_removed == 8 + 6 - 9
    with torch.no_grad():  # and it is not the zero-ablated network
        assert not torch.allclose(got, materialize(zero, net, images)[0](x), atol=1e-3)


def test_fit_with_mean_ablation_names_it_and_saves_the_means(tmp_path):
    net, images = _net(), torch.randn(4, 3, 8, 8)
    with hookchains.attach(net, example=images[:1]) as hooks:
        result = hookchains.fit(hooks, images, steps=3, progress=False, ablation="mean")
    assert result.ablation == "mean" and "; mean ablation" in result.summary()
    assert torch.allclose(result.means["0"], net[1](net[0](images)).mean((0, 2, 3)).detach(), atol=1e-6)
    loaded = Subnetwork.load(result.save(tmp_path / "r"))
    assert loaded.ablation == "mean" and torch.equal(loaded.means["3"], result.means["3"])


def test_fold_constant_channels_makes_a_channel_output_the_constant():
    net = _net()
    fold_constant_channels(net, {"1": {2: 0.25}, "3": {0: -1.5}})  # a norm, and a conv with a bias
    with torch.no_grad():
        assert torch.all(net[1](net[0](torch.randn(2, 3, 8, 8)))[:, 2] == 0.25)
        assert torch.all(net[3](torch.randn(2, 8, 8, 8))[:, 0] == -1.5)
