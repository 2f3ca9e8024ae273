"""1-D (N x C x L) and 3-D (N x C x D x H x W) convs end to end (issue 11, kind 8).

The right values come from the 2-D path: a Conv1d net on ``(N, C, L)`` computes exactly what the same net
with ``(1, k)`` Conv2d kernels computes on ``(N, C, 1, L)``, and a Conv3d net with ``(1, k, k)`` kernels on
``(N, C, 1, H, W)`` what the Conv2d net computes on ``(N, C, H, W)``. So fit, thresholding, counts,
materialisation (channels removed, per-site reasons, outputs), dead filters and chains must agree with the
2-D twin, number for number.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hookchains.analysis.chains import extract_chains
from hookchains.core.attach import attach
from hookchains.core.dataflow import find_dead_filters, trace_dataflow
from hookchains.core.fit import fit
from hookchains.core.materialize import materialize
from hookchains.core.testing import random_subnetwork
from hookchains.inputs.data import validate_images

LAYERS = {1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d), 2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d),
          3: (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d)}


class ResNet(nn.Module):
    """Stem, a depthwise + pointwise residual block (a gate site), a plain conv, pooled linear head."""

    def __init__(self, dims: int, kernel) -> None:
        super().__init__()
        conv, norm, pool = LAYERS[dims]
        pad = tuple(k // 2 for k in kernel) if isinstance(kernel, tuple) else kernel // 2
        self.stem = nn.Sequential(conv(2, 8, kernel, padding=pad), norm(8), nn.ReLU())
        self.dw = nn.Sequential(conv(8, 8, kernel, padding=pad, groups=8), norm(8), nn.ReLU())
        self.pw = nn.Sequential(conv(8, 8, 1), norm(8))
        self.conv = nn.Sequential(conv(8, 6, kernel, padding=pad), norm(6), nn.ReLU())
        self.head = nn.Sequential(pool(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.conv(torch.relu(x + self.pw(self.dw(x)))))


def _twins(dims: int):
    """(N-D net, its input, the 2-D net with the same weights, its input)."""
    torch.manual_seed(0)
    flat = ResNet(2, (1, 3) if dims == 1 else 3)
    with torch.no_grad():
        for m in flat.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1), m.running_mean.uniform_(-1, 1)
    net = ResNet(dims, 3 if dims == 1 else (1, 3, 3))
    state = {k: (v.squeeze(2) if dims == 1 else v.unsqueeze(2)) if v.ndim == 4 else v
             for k, v in flat.state_dict().items()}
    net.load_state_dict(state)
    x2 = torch.randn(6, 2, 1, 16) if dims == 1 else torch.randn(6, 2, 5, 5)
    x = x2.squeeze(2) if dims == 1 else x2.unsqueeze(2)
    return net.eval(), x, flat.eval(), x2


@pytest.mark.parametrize("dims", [1, 3])
def test_the_twin_nets_compute_the_same_function(dims):
    net, x, flat, x2 = _twins(dims)
    with torch.no_grad():
        torch.testing.assert_close(net(x), flat(x2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_fit_and_counts_equal_the_2d_twin(dims):
    net, x, flat, x2 = _twins(dims)
    subs = []
    for model, inputs in ((net, x), (flat, x2)):
        with attach(model, example=inputs[:1]) as hooks:
            subs.append(fit(hooks, inputs, steps=20, lam=0.3, lr=0.02, seed=0, progress=False))
    sub, twin = subs
    assert [(s.name, s.channels, s.kind) for s in sub.sites.filters] == \
        [("stem.0", 8, "conv"), ("dw.0", 8, "conv"), ("pw.0", 8, "conv"), ("conv.0", 6, "conv")]
    assert sub.counts() == twin.counts() and sub.counts()["conv_filters_total"] == 30
    assert sub.kept_filters() == twin.kept_filters() and 0 < sub.counts()["filters_kept"] < 30
    for name, scores in sub.scores.items():
        torch.testing.assert_close(scores, twin.scores[name], atol=1e-4, rtol=1e-4)
    assert sub.fidelity["kl"] == pytest.approx(twin.fidelity["kl"], abs=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_materialise_removes_the_same_channels_as_the_2d_twin(dims):
    net, x, flat, x2 = _twins(dims)
    sub, twin = (random_subnetwork(m, i[:1], keep=0.5, seed=1, gates_open=True) for m, i in ((net, x), (flat, x2)))
    small, report = materialize(sub, net, x)
    small2, report2 = materialize(twin, flat, x2)
    assert report.channels_before == 8 + 8 + 8 + 6 + 3  # every conv (1-D, 3-D too) and linear unit
    assert (report.channels_after, report.sites) == (report2.channels_after, report2.sites)
    assert report.channels_removed > 0 and report.pruned
    kept = sub.kept_filters()
    assert small.conv[0].out_channels == len(kept["conv.0"])  # an uncoupled conv keeps exactly its kept filters
    assert small.conv[0].weight.ndim == dims + 2
    with torch.no_grad():
        torch.testing.assert_close(small(x), small2(x2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_dead_filters_and_chains_equal_the_2d_twin(dims):
    net, x, flat, x2 = _twins(dims)
    counts = {"stem.0": 2, "dw.0": 4, "pw.0": 3, "conv.0": 3}
    sub, twin = (random_subnetwork(m, i[:1], counts=counts, seed=3, gates_open=True)
                 for m, i in ((net, x), (flat, x2)))
    assert find_dead_filters(sub, net) == find_dead_filters(twin, flat)
    flow, flow2 = trace_dataflow(sub, net, x), trace_dataflow(twin, flat, x2)
    assert flow.feeds == flow2.feeds
    assert all(torch.equal(flow.connected[pair], flow2.connected[pair]) for pair in flow2.connected)
    depthwise = flow.connected[("stem.0", "dw.0")]  # depthwise: a kept stem channel feeds only its own dw channel
    assert int(depthwise.sum()) <= min(depthwise.shape) and (depthwise.sum(0) <= 1).all()
    chains, chains2 = extract_chains(sub, net, x), extract_chains(twin, flat, x2)
    assert [[c.key for c in per] for per in chains] == [[c.key for c in per] for per in chains2]
    strengths = [c.strength for per in chains for c in per]
    assert strengths and strengths == pytest.approx([c.strength for per in chains2 for c in per], abs=1e-5)


def test_signals_are_refused_where_pictures_are_needed_naming_the_modality():
    with pytest.raises(ValueError, match=r"got shape \(4, 2, 32\): .*1-D signals \(N, C, L\).*no pictures"):
        validate_images(torch.zeros(4, 2, 32))
    with pytest.raises(ValueError, match=r"got shape \(4, 2, 3, 8, 8\): .*volumes or video \(N, C, D, H, W\)"):
        validate_images(torch.zeros(4, 2, 3, 8, 8))
