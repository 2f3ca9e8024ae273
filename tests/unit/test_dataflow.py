"""Chains along real dataflow (issue 12, item 4): hand-built residual and depthwise nets whose
connections are known by construction, checked step by step against their weights; skip paths,
dead filters, diverse chains and refusals."""
from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

from hookchains.analysis.chains import extract_chains
from hookchains.core.dataflow import DataflowError, find_dead_filters, thresholded, trace_dataflow
from hookchains.core.sites import FilterSite, SiteMap
from hookchains.core.subnetwork import Subnetwork

pytestmark = pytest.mark.usefixtures("one_thread")


def _sub(model: nn.Module, names: Sequence[str], scores: Dict[str, Tensor], classifier: str = "fc") -> Subnetwork:
    """Sites ``name`` (a conv or a linear) scored on ``name_bn``, no gates."""
    sites = []
    for n in names:
        module = model.get_submodule(n)
        linear = isinstance(module, nn.Linear)
        sites.append(FilterSite(n, n.upper(), f"{n}_bn", f"{n}_bn", _width(model, n), channel_dim=-1 if linear else 1,
                                kind="linear" if linear else "conv", groups=getattr(module, "groups", 1)))
    return Subnetwork(SiteMap(sites, [], [], "generic", "probe", classifier, (1, 3, 8, 8)), scores, {})


def _width(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _conv_bn(module: nn.Module, name: str, cin: int, cout: int, kernel: int = 1, stride: int = 1,
             groups: int = 1) -> None:
    setattr(module, name, nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
    bn = nn.BatchNorm2d(cout)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    setattr(module, f"{name}_bn", bn)


class ResidualNet(nn.Module):
    """stem; block A with an identity shortcut (a1 3x3, a2 1x1); block B downsampling with a shortcut
    conv (b1 3x3 stride 2, b2 1x1, sc 1x1 stride 2); global pool; fc. Some weights are exactly 0."""

    READS = {"a1": ["stem"], "a2": ["a1"], "b1": ["stem", "a2"], "sc": ["stem", "a2"], "b2": ["b1"],
             "fc": ["sc", "b2"]}  # in execution order

    def __init__(self) -> None:
        super().__init__()
        for name, cin, cout, kernel, stride in [("stem", 3, 4, 1, 1), ("a1", 4, 4, 3, 1), ("a2", 4, 4, 1, 1),
                                                ("b1", 4, 6, 3, 2), ("b2", 6, 6, 1, 1), ("sc", 4, 6, 1, 2)]:
            _conv_bn(self, name, cin, cout, kernel, stride)
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():
            self.b1.weight[0, 1] = 0.0            # b1_0 does not read channel 1
            self.sc.weight[2, :3] = 0.0           # sc_2 reads channel 3 only
            self.b2.weight[3] = 0.0               # b2_3 reads nothing: dead
            self.fc.weight[:, 5] = 0.0            # no class reads channel 5

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.a2_bn(self.a2(torch.relu(self.a1_bn(self.a1(x))))))
        x = torch.relu(self.sc_bn(self.sc(x)) + self.b2_bn(self.b2(torch.relu(self.b1_bn(self.b1(x))))))
        return self.fc(x.mean((2, 3)))


class DepthwiseNet(nn.Module):
    """Inverted residual: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, project 1x1 (linear), pool, fc."""

    READS = {"dw": ["expand"], "project": ["dw"], "fc": ["project"]}

    def __init__(self) -> None:
        super().__init__()
        _conv_bn(self, "expand", 3, 6)
        _conv_bn(self, "dw", 6, 6, kernel=3, groups=6)
        _conv_bn(self, "project", 6, 4)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.dw.weight[2] = 0.0  # depthwise channel 2 reads nothing: dead

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.relu6(self.expand_bn(self.expand(x)))
        x = nn.functional.relu6(self.dw_bn(self.dw(x)))
        return self.fc(self.project_bn(self.project(x)).mean((2, 3)))


def _is_edge(net: nn.Module, producer: str, u: int, consumer: str, v: int) -> bool:
    """The network's connection by construction: the consumer reads the producer and a weight links u to v."""
    if producer not in net.READS[consumer]:
        return False
    module = net.get_submodule(consumer)
    weight, groups = module.weight, getattr(module, "groups", 1)
    if weight.ndim == 2 and weight.shape[1] != _width(net, producer):  # reads a flattened map
        k = weight.shape[1] // _width(net, producer)
        return bool(weight[v, u * k:(u + 1) * k].ne(0).any())
    per_in, group = weight.shape[1], v // (weight.shape[0] // groups)
    if not group * per_in <= u < (group + 1) * per_in:
        return False
    return bool(weight[v, u - group * per_in].ne(0).any())


def _ones(net: nn.Module, names: Sequence[str]) -> Dict[str, Tensor]:
    return {n: torch.ones(_width(net, n)) for n in names}


RESIDUAL = ("stem", "a1", "a2", "b1", "b2", "sc")


@pytest.fixture(scope="module")
def residual() -> Tuple[ResidualNet, Subnetwork, Tensor]:
    torch.manual_seed(0)
    net = ResidualNet().eval()
    return net, _sub(net, RESIDUAL, _ones(net, RESIDUAL)), torch.randn(4, 3, 8, 8)


def _assert_every_step_is_an_edge(net: nn.Module, chains: List[List]) -> int:
    steps = 0
    for chain in itertools.chain.from_iterable(chains):
        for a, b in zip(chain.filters, chain.filters[1:]):
            assert _is_edge(net, a.site, a.index, b.site, b.index), (a.label, b.label)
        last = chain.filters[-1]
        assert _is_edge(net, last.site, last.index, "fc", chain.target), last.label
        steps += len(chain.filters)
    return steps


def test_residual_net_edges_equal_the_construction_and_chains_use_only_them(residual):
    net, sub, images = residual
    flow = trace_dataflow(sub, net, images)
    for consumer, producers in net.READS.items():
        assert flow.feeds[consumer] == producers
        for producer in producers:
            expected = torch.tensor([[_is_edge(net, producer, u, consumer, v) for v in range(net.get_submodule(
                consumer).weight.shape[0])] for u in range(net.get_submodule(producer).out_channels)])
            assert torch.equal(flow.connected[(producer, consumer)], expected)
    chains = extract_chains(sub, net, images, k=60)  # deep into the ranking, where zero weights would sit
    assert all(len(c) == 60 for c in chains)
    assert _assert_every_step_is_an_edge(net, chains) > 500
    assert all(c.filters[0].site == "stem" for per in chains for c in per)


def test_a_chain_skips_a_kept_block_through_the_residual_identity(residual):
    net, sub, images = residual
    silenced = ResidualNet().eval()
    silenced.load_state_dict(net.state_dict())
    with torch.no_grad():  # a1 is negative before its ReLU everywhere: block A's branch carries nothing
        silenced.a1_bn.bias.fill_(-100.0)
    chains = extract_chains(sub, silenced, images, k=4)
    assert all(len(c) == 4 for c in chains)
    for chain in itertools.chain.from_iterable(chains):
        sites = [f.site for f in chain.filters]
        assert sites[:2] in (["stem", "b1"], ["stem", "sc"])  # a1 and a2 are kept, and skipped
    _assert_every_step_is_an_edge(silenced, chains)


def test_depthwise_steps_are_diagonal_and_dead_filters_are_found():
    torch.manual_seed(1)
    net = DepthwiseNet().eval()
    names = ("expand", "dw", "project")
    scores = _ones(net, names)
    scores["expand"][4] = 0.0  # removed: dw_4, which reads only expand_4, is left without input
    sub = _sub(net, names, scores)
    assert find_dead_filters(sub, net) == {"dw": [2, 4]}
    images = torch.randn(3, 3, 8, 8)
    outputs: List[Tensor] = []
    handle = net.dw_bn.register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad(), thresholded(sub, net):
        net(images)
    handle.remove()
    for j in range(6):  # dead: the same output whatever the image; live: not
        assert torch.equal(outputs[0][:, j], outputs[0][:1, j].expand_as(outputs[0][:, j])) == (j in (2, 4))
    chains = extract_chains(sub, net, images, k=10)
    assert all(len(c) == 10 for c in chains)
    _assert_every_step_is_an_edge(net, chains)
    for chain in itertools.chain.from_iterable(chains):
        expand, dw = chain.filters[0], chain.filters[1]
        assert dw.site == "dw" and expand.index == dw.index not in (2, 4)


def test_dead_filters_in_a_residual_net_and_in_counts_and_saved_results(residual, tmp_path):
    net, sub, _ = residual
    assert sub.counts()["dead_filters"] is None  # not determined
    sub.dead_filters = find_dead_filters(sub, net)
    assert sub.dead_filters == {"b2": [3]}
    assert sub.counts()["dead_filters"] == 1 and sub.counts()["filters_kept"] == 30
    assert Subnetwork.load(sub.save(tmp_path / "run")).counts()["dead_filters"] == 1
    sub.dead_filters = None


@pytest.mark.parametrize("diversity", [0.5, 1.0])
def test_diverse_chains_differ_in_the_stated_share(residual, diversity):
    net, sub, images = residual
    plain = extract_chains(sub, net, images, k=3)
    diverse = extract_chains(sub, net, images, k=3, diversity=diversity)
    for best, chains in zip(plain, diverse):
        assert len(chains) == 3 and chains[0].key == best[0].key
        for a, b in itertools.combinations(chains, 2):
            assert a.difference(b) >= diversity
            assert len(set(a.key) & set(b.key)) <= (1 - diversity) * max(len(a.key), len(b.key))
    assert any(a.difference(b) < 0.5 for per in plain for a, b in itertools.combinations(per, 2))
    with pytest.raises(ValueError, match="diversity"):
        extract_chains(sub, net, images, diversity=1.5)


class HiddenConvNet(nn.Module):
    """Two scored convs with a conv between them that is not a filter site."""

    def __init__(self) -> None:
        super().__init__()
        _conv_bn(self, "c1", 3, 4)
        self.hidden = nn.Conv2d(4, 4, 1)
        _conv_bn(self, "c2", 4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.hidden(torch.relu(self.c1_bn(self.c1(x)))))
        return self.fc(torch.relu(self.c2_bn(self.c2(x))).mean((2, 3)))


def test_a_channel_mixing_operation_outside_the_sites_is_refused_in_one_line():
    net = HiddenConvNet().eval()
    sub = _sub(net, ("c1", "c2"), _ones(net, ("c1", "c2")))
    with pytest.raises(DataflowError, match=r"input of c2 passes through ConvolutionBackward0") as info:
        extract_chains(sub, net, torch.randn(1, 3, 8, 8))
    assert "\n" not in str(info.value)


class ChannelMeanNet(nn.Module):
    """A scored conv, then ``x - mean`` over channels (every channel mixes) or over positions (none does)."""

    def __init__(self, dims: Tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims
        _conv_bn(self, "c1", 3, 4)
        _conv_bn(self, "c2", 4, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.c1_bn(self.c1(x)))
        x = x - x.mean(self.dims, keepdim=True)
        return self.fc(torch.relu(self.c2_bn(self.c2(x))).mean((-2, -1)))


def test_a_mean_over_channels_is_refused_and_a_spatial_mean_is_not():
    net = ChannelMeanNet((-3,)).eval()
    sub = _sub(net, ("c1", "c2"), _ones(net, ("c1", "c2")))
    with pytest.raises(DataflowError, match=r"input of c2 passes through a reduction \(MeanBackward1\)"):
        trace_dataflow(sub, net)
    spatial = ChannelMeanNet((-2, -1)).eval()
    assert trace_dataflow(sub, spatial).feeds == {"c1": ["<input>"], "c2": ["c1"], "fc": ["c2"]}


class FlattenNet(nn.Module):
    """VGG-style head: conv + ReLU + 2x2 max pool, flatten (3 channels x 4 positions), a scored linear
    layer with a BatchNorm1d, ReLU, the classifier. fc1_0 reads none of channel 1's features."""

    READS = {"fc1": ["c1"], "fc": ["fc1"]}

    def __init__(self) -> None:
        super().__init__()
        _conv_bn(self, "c1", 3, 3)
        self.fc1, self.fc1_bn, self.fc = nn.Linear(12, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)
        with torch.no_grad():
            self.fc1.weight[0, 4:8] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.c1_bn(self.c1(x))), 2).flatten(1)
        return self.fc(torch.relu(self.fc1_bn(self.fc1(x))))


def test_a_linear_layer_reading_a_flattened_map_gets_exact_edges_per_channel():
    torch.manual_seed(2)
    net = FlattenNet().eval()
    sub = _sub(net, ("c1", "fc1"), _ones(net, ("c1", "fc1")))
    images = torch.randn(3, 3, 4, 4)
    flow = trace_dataflow(sub, net, images)
    assert flow.feeds["fc1"] == ["c1"]
    assert flow.connected[("c1", "fc1")].tolist() == [[True] * 5, [False] + [True] * 4, [True] * 5]
    with torch.no_grad():  # edge c1_u -> fc1_v: sum over u's 4 flattened features of E[v, j] * x_j
        x = nn.functional.max_pool2d(torch.relu(net.c1_bn(net.c1(images))), 2).flatten(1)
        gain = net.fc1_bn.weight / torch.sqrt(net.fc1_bn.running_var + net.fc1_bn.eps)
        expected = torch.einsum("nuk,vuk->nuv", x.view(3, 3, 4), (gain[:, None] * net.fc1.weight).view(5, 3, 4))
    values = flow.edge_values("c1", "fc1")
    assert torch.isinf(values[:, 1, 0]).all()
    finite = torch.isfinite(values)
    assert torch.allclose(values[finite], expected.double()[finite], atol=1e-6)
    _assert_every_step_is_an_edge(net, extract_chains(sub, net, images, k=6))
