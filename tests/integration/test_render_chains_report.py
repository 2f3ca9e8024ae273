"""Chains (exact, on hand-computable networks), the sub-network drawing (DOT structure and real
``dot`` renders) and the HTML report (opened in real headless Chromium).

Small real models only: hand-set conv nets whose chains are computed by hand below, and a
randomly initialised torchvision ResNet-18 at 64 px with hand-set scores for drawing and reporting.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import itertools
import json
import re
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn

import hookchains
from hookchains.analysis.chains import extract_chains, kbest_paths
from hookchains.assets import demo_photos
from hookchains.core.dataflow import DataflowError, thresholded, trace_dataflow
from hookchains.core.metrics import fidelity
from hookchains.core.progress import Progress
from hookchains.core.sites import FilterSite, SiteMap
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.data import ImageSet, augmented_views
from hookchains.inputs.models import preprocessing
from hookchains.viz.graph import build_graph, graph_bytes, layout, render_graph
from hookchains.viz.report import write_chains_figure, write_report

CHROMIUM = "/usr/bin/chromium"
ONES = torch.ones(1, 1, 2, 2)  # a spatially constant image: every mean is the per-pixel value


pytestmark = pytest.mark.usefixtures("one_thread")


def _sub(model: nn.Module, layers: Sequence[Tuple[str, str]], scores: Dict[str, Tensor],
         classifier: str = "fc") -> Subnetwork:
    """A Subnetwork over hand-listed (conv, hooked module) sites, no gates."""
    sites = [FilterSite(name, name.upper().replace(".", ""), hook, hook, model.get_submodule(name).out_channels)
             for name, hook in layers]
    return Subnetwork(SiteMap(sites, [], [], "generic", "probe", classifier, (1, 1, 2, 2)), scores, {})


def _set(conv: nn.Module, rows: List[List[float]]) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(rows).view(conv.weight.shape))


class ChainNet(nn.Module):
    """1 -> 2 -> 3 -> 2 channels of 1x1 convs with ReLU, global average pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 2, 1, bias=False), nn.Conv2d(2, 3, 1, bias=False)
        self.c3, self.fc = nn.Conv2d(3, 2, 1, bias=False), nn.Linear(2, 2, bias=False)
        _set(self.c1, [[1], [2]])
        _set(self.c2, [[1, 0], [0, 1], [1, -1]])
        _set(self.c3, [[1, 1, 0], [0, 1, 1]])
        _set(self.fc, [[1, 0], [0, 2]])

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(h.mean((2, 3)))


class BranchNet(nn.Module):
    """c1 feeds two parallel 2-channel convs c2 and c3; the head reads both. c3 does not read c2."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(i, 2, 1, bias=False) for i in (1, 2, 2))
        self.fc = nn.Linear(4, 2, bias=False)
        _set(self.c1, [[1], [2]])
        _set(self.c2, [[1, 1], [0, -1]])
        _set(self.c3, [[2, 0], [1, 1]])
        _set(self.fc, [[0, 0, 1, 0], [0, 0, 0, 1]])

    def forward(self, x: Tensor) -> Tensor:
        h1 = torch.relu(self.c1(x))
        both = torch.cat([torch.relu(self.c2(h1)), torch.relu(self.c3(h1))], 1)
        return self.fc(both.mean((2, 3)))


def _chain_net_sub(c2_scores=(1.0, 1.0, 1.0)) -> Tuple[ChainNet, Subnetwork]:
    net = ChainNet()
    scores = {"c1": torch.ones(2), "c2": torch.tensor(c2_scores), "c3": torch.ones(2)}
    return net, _sub(net, [("c1", "c1"), ("c2", "c2"), ("c3", "c3")], scores)


def _summary(chains) -> List[Tuple[float, List[str], List[float]]]:
    return [(c.strength, [f.label for f in c.filters], c.contributions) for c in chains]


# ------------------------------------------------------------------------------------------ chains
def test_chains_use_real_edges_and_skip_silent_filters_by_hand():
    # a1 = [1, 2]; a2 = W2 relu(a1) = [1, 2, -1] -> after ReLU [1, 2, 0]: C2_2 is silent; a3 = [3, 2];
    # logits [3, 4] -> class 1, whose fc row [0, 2] has no weight from C3_0. Edges c = W[v, u] * r[u]
    # exist where W != 0 only: C1_0 -> C2_1 (W = 0) is no edge, so the one chain left is
    # C1_1 -> C2_1 -> C3_1: 1 * 2 + 1 * 2 + logit share 2 * 2.
    net, sub = _chain_net_sub()
    chains = extract_chains(sub, net, ONES, k=6)[0]
    assert _summary(chains) == [(8.0, ["C1_1", "C2_1", "C3_1"], [2.0, 2.0, 4.0])]
    assert chains[0].target == 1 and chains[0].image == 0
    assert [f.site for f in chains[0].filters] == ["c1", "c2", "c3"]


def test_chains_run_on_the_thresholded_network():
    # Filter C2_1 scored 0.05 < tau is removed: relu(a2) = [1, 0, 0], a3 = [1, 0], logits [1, 0] -> class 0,
    # whose fc row [1, 0] reaches C3_0 only; C2_0 is the only live filter feeding it.
    net, sub = _chain_net_sub((1.0, 0.05, 1.0))
    chains = extract_chains(sub, net, ONES, k=2)[0]
    assert _summary(chains) == [(3.0, ["C1_0", "C2_0", "C3_0"], [1.0, 1.0, 1.0])]
    assert chains[0].target == 0


def test_a_concatenation_is_refused_in_one_line_and_drawn_without_edges():
    # BranchNet's head reads torch.cat of two branches: channels move, so connections are not guessed.
    net = BranchNet()
    sub = _sub(net, [("c1", "c1"), ("c2", "c2"), ("c3", "c3")], {n: torch.ones(2) for n in ("c1", "c2", "c3")})
    with pytest.raises(DataflowError, match="CatBackward0") as info:
        extract_chains(sub, net, ONES)
    assert "\n" not in str(info.value)
    source = build_graph(sub, net, images=ONES).source
    assert "no edges drawn: chains: the input of fc passes through CatBackward0" in source
    assert not _visible_edges(source)


def test_a_report_without_chains_says_why_and_still_draws_every_filter(tmp_path):
    net = BranchNet()
    sub = _sub(net, [("c1", "c1"), ("c2", "c2"), ("c3", "c3")], {n: torch.ones(2) for n in ("c1", "c2", "c3")})
    views = ImageSet(ONES.repeat(2, 1, 1, 1), torch.tensor([0, 1]), ["a", "b"], ["a.png", "b.png"],
                     [Image.new("RGB", (2, 2))] * 2)
    page = write_report(tmp_path, sub, net, views, featvis_steps=2, featvis_size=32).read_text()
    data = _data(page)
    assert data["chains"] == [] and data["edges"] == [] and "CatBackward0" in data["note"]
    assert [len(c["nodes"]) for c in data["columns"]] == [2, 2, 2, 0]  # every kept filter; no output reached
    assert "No chains: chains: the input of fc passes through CatBackward0" in page


class BNNet(nn.Module):
    """Three 3x3 conv + BatchNorm + ReLU layers (random weights and running statistics), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, padding=1, bias=False) for i, o in ((3, 4), (4, 3), (3, 4)))
        self.bns = nn.ModuleList(nn.BatchNorm2d(o) for o in (4, 3, 4))
        self.fc = nn.Linear(4, 3)
        for bn in self.bns:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.2, 3.0)
            nn.init.uniform_(bn.weight, -1.5, 1.5)

    def forward(self, x: Tensor) -> Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def _expected_paths(net: BNNet, sub: Subnetwork, image: Tensor, k: int) -> List[Tuple[float, Tuple[int, ...]]]:
    """The definition, computed directly: a plain forward, every path enumerated. Edge u -> v is
    E[v, u] * mean(relu(y_u)) (3x3 convs read as kernel sums), the end W_fc[c, u] * mean(relu(y_u));
    a filter that is 0 after its ReLU everywhere is in no chain."""
    kept, acts, weights, x = [], [], [], image
    with torch.no_grad():
        for l, (conv, bn) in enumerate(zip(net.convs, net.bns)):
            score = sub.scores[f"convs.{l}"]
            hard = score * (score >= sub.tau)
            y = bn(conv(x)) * hard.view(1, -1, 1, 1)
            x = torch.relu(y)
            acts.append(x.mean((2, 3))[0].double())
            kept.append([i for i in torch.nonzero(hard).flatten().tolist()])
            gain = hard * bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weights.append((gain[:, None] * conv.weight.sum((2, 3))).double())
        logits = net.fc(x.mean((2, 3)))[0]
        out = (net.fc.weight[int(logits.argmax())] * x.mean((2, 3))[0]).double()
    paths = []
    for path in itertools.product(*kept):
        if any(acts[l][i] == 0 for l, i in enumerate(path)):
            continue
        parts = [float(weights[l + 1][path[l + 1], path[l]] * acts[l][path[l]]) for l in range(len(path) - 1)]
        paths.append((sum(parts) + float(out[path[-1]]), path))
    return sorted(paths, key=lambda p: (-p[0], p[1]))[:k]


def test_chain_strengths_equal_an_independent_computation_with_batchnorm_folding():
    torch.manual_seed(3)
    net = BNNet().eval()
    scores = {f"convs.{l}": torch.rand(c) * 0.9 + 0.1 for l, c in enumerate((4, 3, 4))}
    scores["convs.1"][1] = 0.0  # one removed filter
    sub = _sub(net, [(f"convs.{l}", f"bns.{l}") for l in range(3)], scores)
    images = torch.randn(3, 3, 8, 8)
    found = extract_chains(sub, net, images, k=5)
    for n, chains in enumerate(found):
        expected = _expected_paths(net, sub, images[n:n + 1], k=5)
        assert [tuple(f.index for f in c.filters) for c in chains] == [p for _, p in expected]
        assert [c.strength for c in chains] == pytest.approx([s for s, _ in expected], rel=1e-5, abs=1e-6)
    assert all(f.index != 1 or f.site != "convs.1" for chains in found for c in chains for f in c.filters)


def _all_paths(sizes, edges, starts, ends) -> List[Tuple[float, tuple]]:
    """Every path of a layered graph with finite strength, enumerated by depth-first search."""
    paths = []

    def extend(path, value):
        layer, node = path[-1]
        if layer in ends and ends[layer][node] > float("-inf"):
            paths.append((value + float(ends[layer][node]), tuple(path)))
        for (a, b), matrix in edges.items():
            if a == layer:
                for v in range(sizes[b]):
                    if matrix[node, v] > float("-inf"):
                        extend(path + [(b, v)], value + float(matrix[node, v]))

    for layer, values in starts.items():
        for node in range(sizes[layer]):
            if values[node] > float("-inf"):
                extend([(layer, node)], float(values[node]))
    return sorted(paths, key=lambda p: -p[0])


@pytest.mark.parametrize("seed", range(5))
def test_kbest_paths_equal_brute_force_on_a_graph_with_skips_and_non_edges(seed):
    generator = torch.Generator().manual_seed(seed)
    sizes = [3, 2, 4, 3]
    edges = {}
    for a, b in [(0, 1), (1, 2), (0, 2), (2, 3), (1, 3)]:  # (0, 2) and (1, 3) skip a layer
        matrix = torch.randn(sizes[a], sizes[b], generator=generator, dtype=torch.float64)
        edges[(a, b)] = matrix.masked_fill(torch.rand(matrix.shape, generator=generator) < 0.3, float("-inf"))
    starts = {0: torch.zeros(3, dtype=torch.float64), 1: torch.tensor([0.0, float("-inf")], dtype=torch.float64)}
    ends = {3: torch.randn(3, generator=generator, dtype=torch.float64),
            2: torch.randn(4, generator=generator, dtype=torch.float64)}
    expected = _all_paths(sizes, edges, starts, ends)
    for k in (1, 4, 50):
        found = kbest_paths(sizes, edges, starts, ends, k)
        assert [p for _, p in found] == [p for _, p in expected[:k]]
        assert [s for s, _ in found] == pytest.approx([s for s, _ in expected[:k]])


def test_kbest_paths_rejects_k_below_one():
    with pytest.raises(ValueError, match="k must be at least 1"):
        kbest_paths([2], {}, {0: torch.zeros(2)}, {0: torch.zeros(2)}, k=0)


# ------------------------------------------------------------------------------------- ResNet-18
KEPT_LAYERS = ("conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer2.0.conv1",
               "layer2.0.downsample.0", "layer2.1.conv1", "layer3.0.downsample.0", "layer4.0.downsample.0",
               "layer4.1.conv2")


@pytest.fixture(scope="module")
def resnet() -> Tuple[nn.Module, Subnetwork]:
    """Random-weight ResNet-18 (10 classes) with 3 hand-picked filters per kept layer and gate L3B2 closed."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with hookchains.attach(model, example=torch.zeros(1, 3, 64, 64)) as chains:
        sites = chains.sites
    generator = torch.Generator().manual_seed(0)
    scores = {}
    for site in sites.filters:
        scores[site.name] = torch.zeros(site.channels)
        if site.name in KEPT_LAYERS:
            picked = torch.randperm(site.channels, generator=generator)[:3]
            scores[site.name][picked] = torch.tensor([0.3, 0.6, 0.9])
    gates = {g.name: torch.tensor(1.0 if g.label != "L3B2" else -1.0) for g in sites.gates}
    return model, Subnetwork(sites, scores, gates)


def _dot_nodes(source: str) -> Dict[str, str]:
    return dict(re.findall(r"^\s*(n\d+_\d+) \[label=(\S+)", source, re.M))


def test_large_subnetworks_draw_chain_filters_then_the_best_and_say_how_many_more(resnet):
    model, sub = resnet
    kept = sub.kept_filters()
    source = build_graph(sub, model, max_nodes=len(KEPT_LAYERS) + 2).source
    drawn = set(_dot_nodes(source).values())
    assert len(drawn) == len(KEPT_LAYERS) + 2 and f"(drawn: {len(drawn)};" in source
    for name in kept:  # every kept layer keeps its best filter
        site = sub.sites.filter(name)
        best = max(kept[name], key=lambda j: float(sub.scores[name][j]))
        assert f"{site.label}_{best}" in drawn
    more = [int(n) for n in re.findall(r'more\d+ \[label="\+(\d+) more"', source)]
    assert sum(more) == 3 * len(KEPT_LAYERS) - len(drawn) and len(more) == len(KEPT_LAYERS)  # each lost 1 or 2
    assert source.count(" kept)") == len(KEPT_LAYERS) and "(3 kept)" in source
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    chains = extract_chains(sub, model, images, k=2)
    source = build_graph(sub, model, images=images, max_nodes=len(KEPT_LAYERS) + 2).source
    drawn = set(_dot_nodes(source).values())
    assert {f.label for per_image in chains for c in per_image for f in c.filters} <= drawn
    for target in {c.target for per_image in chains for c in per_image}:  # output classes are nodes
        assert re.search(rf'out{target} \[label="class {target}"', source)
        assert re.search(rf'n\d+_\d+ -> out{target} \[style=dashed', source)
    assert "(drawn: the" not in build_graph(sub, model).source and "more" not in build_graph(sub, model).source


def test_tied_scores_are_coloured_by_importance(resnet):
    model, sub = resnet
    tied = dataclasses.replace(sub, scores={k: (v > 0).float() for k, v in sub.scores.items()})
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    lay = layout(tied, model, images=images)
    assert lay.colour_by == "importance" and layout(sub, model, images=images).colour_by == "score"
    flow = trace_dataflow(tied, model, images)
    for producer, consumer in flow.pairs()[:3]:  # the strongest filter of a layer has importance 1
        total = flow.strength(producer, consumer).sum(1)
        best = flow.kept[flow.position(producer)][int(total.argmax())]
        assert lay.importance[(producer, best)] == pytest.approx(1.0)
    fills = set(re.findall(r'fillcolor="(#[0-9a-f]{6})"', build_graph(tied, model, images=images).source))
    assert len(fills) > 3 and "importance 0 (scores tie)" in build_graph(tied, model, images=images).source


def test_dot_source_has_one_ranked_column_per_kept_layer_and_a_skipped_marker(resnet):
    model, sub = resnet
    source = build_graph(sub).source
    kept = sub.kept_filters()
    labels = {f"{s.label}_{i}" for s in sub.sites.filters for i in kept.get(s.name, [])}
    assert set(_dot_nodes(source).values()) == labels and len(labels) == 3 * len(KEPT_LAYERS)
    clusters = re.findall(r"subgraph cluster_\d+ \{\s*(.*)", source)
    assert len(clusters) == len(KEPT_LAYERS) and all("rank=same" in c for c in clusters)
    order = [re.search(r'label="(\S+) \(3 kept\)"', c).group(1) for c in clusters]
    assert order == [sub.sites.filter(name).label for name in KEPT_LAYERS]
    assert "style=\"rounded,dashed\"" in clusters[order.index("L2B1SC")]
    marker = re.search(r"skip(\d+) \[label=\"skipped\s+L3B2\"", source)
    assert marker, "removed gate L3B2 has no marker"
    column = {label.rsplit("_", 1)[0]: int(node[1:].split("_")[0]) for node, label in _dot_nodes(source).items()}
    assert column["L2B2C1"] < int(marker.group(1)) < column["L4B2C2"]
    invisible = re.findall(r"(\w+) -> \w+ \[style=invis\]", source)
    ranks = [int(re.sub(r"\D*(\d+).*", r"\1", node)) for node in invisible]
    assert ranks == list(range(len(KEPT_LAYERS)))  # invisible edges chain every column, in order
    counts = sub.counts()
    assert f"{counts['layers_kept']}/{counts['layers_total']} layers, " \
           f"{counts['filters_kept']}/{counts['filters_total']} filters" in source
    assert not _visible_edges(source)  # no model: no weight edges


def _visible_edges(source: str) -> List[Tuple[str, str]]:
    return re.findall(r"(n\d+_\d+) -> (n\d+_\d+) \[penwidth", source)


def test_edges_are_real_connections_including_residual_skips(resnet):
    model, sub = resnet
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    flow = trace_dataflow(sub, model, images)
    label = {s.name: s.label for s in sub.sites.filters}
    pairs = {(label[p], label[c]) for p, c in flow.pairs()}
    # By the architecture: L1B1C2 and the stem reach L1B2C1 through L1B1's residual sum; L2B1C1 and the
    # shortcut L2B1SC both read layer1's output, where L1B2C1's branch ends in removed L1B2C2 (no edge),
    # but the stem and L1B1C2 arrive through the identities; L2B2C1 reads the sum of L2B1SC and
    # (removed) L2B1C2; the shortcuts L3B1SC and L4B1SC read the stream of the shortcut before them
    # (L3B2 is a removed gate: an identity). L4B2C2 reads only the removed L4B2C1: it is dead.
    assert pairs == {("L0C1", "L1B1C1"), ("L1B1C1", "L1B1C2"), ("L0C1", "L1B2C1"), ("L1B1C2", "L1B2C1"),
                     ("L0C1", "L2B1C1"), ("L1B1C2", "L2B1C1"), ("L0C1", "L2B1SC"), ("L1B1C2", "L2B1SC"),
                     ("L2B1SC", "L2B2C1"), ("L2B1SC", "L3B1SC"), ("L3B1SC", "L4B1SC")}
    assert flow.dead == {"layer4.1.conv2": sub.kept_filters()["layer4.1.conv2"]}
    assert flow.feeds["fc"] == ["layer4.0.downsample.0", "layer4.1.conv2"]
    for producer, consumer in flow.pairs():  # an edge is a nonzero weight at the same channel
        weight = model.get_submodule(consumer).weight
        kept_p, kept_c = flow.kept[flow.position(producer)], flow.kept[flow.position(consumer)]
        expected = torch.tensor([[bool(weight[v, u].ne(0).any()) for v in kept_c] for u in kept_p])
        assert torch.equal(flow.connected[(producer, consumer)], expected)
    for per_node in (1, 3):
        source = build_graph(sub, model, images=images, max_edges_per_node=per_node).source
        nodes = _dot_nodes(source)
        edges = [(nodes[a], nodes[b]) for a, b in _visible_edges(source)]
        assert {(a.rsplit("_", 1)[0], b.rsplit("_", 1)[0]) for a, b in edges} <= pairs
        assert ("L0C1", "L2B1C1") in {(a.rsplit("_", 1)[0], b.rsplit("_", 1)[0]) for a, b in edges}
        for a, b in edges:
            site_a, site_b = (next(s.name for s in sub.sites.filters if s.label == x.rsplit("_", 1)[0]) for x in (a, b))
            u, v = int(a.rsplit("_", 1)[1]), int(b.rsplit("_", 1)[1])
            assert bool(flow.connected[(site_a, site_b)][flow.kept[flow.position(site_a)].index(u),
                                                           flow.kept[flow.position(site_b)].index(v)])
        incoming = Counter((b, a.rsplit("_", 1)[0]) for a, b in edges)
        assert max(incoming.values()) <= per_node


class EdgeNet(nn.Module):
    """c1: three unit channels; c2: two hand-set channels, then a BatchNorm that flips channel 0's sign."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 2, 1, bias=False), nn.Linear(2, 2)
        self.bn = nn.BatchNorm2d(2, eps=0.0).eval()  # running mean 0, var 1: scale = gamma exactly
        _set(self.c1, [[1], [1], [1]])
        _set(self.c2, [[10, 0.5, 2], [0.05, 1, 3]])
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([-1.0, 1.0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.c2(torch.relu(self.c1(x))))).mean((2, 3)))


@pytest.mark.parametrize("per_node, expected", [
    (1, {("C1_0", "C2_0"): "4.00", ("C1_2", "C2_1"): "1.48"}),
    (2, {("C1_0", "C2_0"): "4.00", ("C1_2", "C2_0"): "1.12", ("C1_2", "C2_1"): "1.48", ("C1_1", "C2_1"): "0.76"}),
    (3, {("C1_0", "C2_0"): "4.00", ("C1_2", "C2_0"): "1.12", ("C1_2", "C2_1"): "1.48", ("C1_1", "C2_1"): "0.76"}),
])
def test_edge_rule_keeps_the_strongest_incoming_edges_above_a_tenth(per_node, expected):
    # Strengths |gamma[v] W[v, u]| * |a1[u]| with a1 = 1: v0 <- [10, 0.5, 2], v1 <- [0.05, 1, 3]. The
    # strongest is 10, so 0.5 and 0.05 fall under the 10 % floor whatever per_node allows; pen width
    # 0.4 + 3.6 * s / 10. Without |gamma| channel 0 would lose its edges.
    net = EdgeNet()
    sub = _sub(net, [("c1", "c1"), ("c2", "bn")], {"c1": torch.ones(3), "c2": torch.ones(2)})
    source = build_graph(sub, net, images=ONES, max_edges_per_node=per_node).source
    nodes = _dot_nodes(source)
    edges = re.findall(r"(n\d+_\d+) -> (n\d+_\d+) \[penwidth=([\d.]+)", source)
    assert {(nodes[a], nodes[b]): width for a, b, width in edges} == expected


def test_dot_renders_real_pdf_svg_and_png(resnet, tmp_path):
    model, sub = resnet
    pdf = render_graph(sub, model, tmp_path / "sub.pdf")
    assert pdf.read_bytes().startswith(b"%PDF-") and b"%%EOF" in pdf.read_bytes()[-1024:]
    svg = render_graph(sub, model, tmp_path / "sub.svg", "svg")
    root = ET.parse(svg).getroot()
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and {"L2B1SC (3 kept)", "skipped", "L3B2"} <= texts
    assert any(t and t.startswith("L4B2C2_") for t in texts)
    with Image.open(render_graph(sub, model, tmp_path / "sub.png", "png")) as png:
        assert png.format == "PNG" and png.width > 600


def test_missing_dot_is_one_clear_error_and_dot_source_still_works(resnet, tmp_path, monkeypatch):
    model, sub = resnet
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(RuntimeError, match=r"apt-get install graphviz.*brew install graphviz.*conda") as info:
        render_graph(sub, None, tmp_path / "sub.pdf")
    assert "\n" not in str(info.value) and not (tmp_path / "sub.pdf").exists()
    source = render_graph(sub, None, tmp_path / "sub.dot", "dot").read_text()
    assert source == build_graph(sub).source and source.startswith("digraph subnetwork {")
    with pytest.raises(ValueError, match="unknown format"):
        graph_bytes(build_graph(sub), "jpeg")


def test_resnet_chains_are_sorted_paths_along_edges(resnet):
    model, sub = resnet
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    chains = extract_chains(sub, model, images, k=2)
    flow = trace_dataflow(sub, model, images)
    with torch.no_grad(), thresholded(sub, model):
        predicted = model(images).argmax(-1).tolist()
    assert [len(c) for c in chains] == [2, 2, 2]
    for n, (first, second) in enumerate(chains):
        assert first.strength >= second.strength and first.key != second.key
        for chain in (first, second):
            assert chain.filters[0].site == "conv1" and chain.target == predicted[n]
            assert all(f.label == f"{sub.sites.filter(f.site).label}_{f.index}" for f in chain.filters)
            for a, b in zip(chain.filters, chain.filters[1:]):
                pa, pb = flow.position(a.site), flow.position(b.site)
                assert pa < pb and bool(flow.connected[(a.site, b.site)][flow.kept[pa].index(a.index),
                                                                         flow.kept[pb].index(b.index)])
            assert chain.strength == pytest.approx(sum(chain.contributions))


# ---------------------------------------------------------------------------------------- report
class _Tags(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: List[Tuple[str, Dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def report(resnet, tmp_path_factory):
    """The report of the ResNet-18 sub-network on 2 cat + 2 espresso views (64 px), one class wrong."""
    model, sub = resnet
    photos = {k: v for k, v in demo_photos().items() if k in ("Egyptian cat", "espresso")}
    views = augmented_views(photos, per_class=2, transform=preprocessing(model, 64))
    with torch.no_grad():
        teacher = model(views.images)
        with thresholded(sub, model):
            student = model(views.images)
    sub.fidelity = fidelity(teacher, student)
    predicted = teacher.argmax(-1).tolist()
    classes = {"Egyptian cat": predicted[0], "espresso": (predicted[2] + 1) % 10}  # espresso views are wrong
    run = tmp_path_factory.mktemp("run")
    path = write_report(run, sub, model, views, featvis_steps=2, featvis_size=32, class_indices=classes)
    return path, views, classes, run


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page, re.S).group(1))


def _pixel_std(png: bytes) -> float:
    with Image.open(io.BytesIO(png)) as picture:
        return float(torch.frombuffer(bytearray(picture.convert("RGB").tobytes()), dtype=torch.uint8).double()
                     .div(255).std())


def test_report_is_one_offline_file_with_every_picture_once_and_a_hashed_script(report, resnet):
    path, views, _, run = report
    page = path.read_text()
    assert path == run / "report.html" and any((run / "featvis").rglob("*.png"))
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1)
    script = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(script) == 1 and page.count("<script") == 2  # the code and the JSON data
    digest = base64.b64encode(hashlib.sha256(script[0].encode()).digest()).decode()
    assert csp == f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    assert not re.findall(r'\s(?:src|href)="', page) and "url(" not in page  # nothing to fetch
    data = _data(page)
    pics = data["pics"]
    assert len(set(pics.values())) == len(pics)  # each picture stored once
    used = {n["featvis"] for n in data["nodes"]} | {m[1] for n in data["nodes"] for m in n["maps"]} | \
        {i["pic"] for i in data["images"]}
    assert used - {None} == set(pics)  # every stored picture is used, every reference resolves
    for uri in pics.values():
        assert uri.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).verify()
    tags = _Tags()
    tags.feed(page)
    assert all(a.get("alt", "").strip() for t, a in tags.tags if t == "img")
    assert all(n["aria"].strip() for n in data["nodes"])


def test_report_data_holds_the_chains_their_filters_and_a_heatmap_per_image(report, resnet):
    path, views, classes, _ = report
    model, sub = resnet
    page = path.read_text()
    data = _data(page)
    counts = sub.counts()
    assert data["title"].startswith(f"{counts['layers_kept']}/{counts['layers_total']} layers, "
                                    f"{counts['filters_kept']}/{counts['filters_total']} filters kept")
    assert "Top-1 agreement" in page and "Shared filters" not in page
    chains = extract_chains(sub, model, views.images, k=2)
    expected = [(i, [f"{f.site}:{f.index}" for f in c.filters] + [f"out:{c.target}"]) for i, per in enumerate(chains)
                for c in per]
    assert [(c["image"], c["nodes"]) for c in data["chains"]] == expected
    nodes = {n["id"]: n for n in data["nodes"]}
    on_chains = {id for _, ids in expected for id in ids}
    assert on_chains <= set(nodes) and {c.target for per in chains for c in per} == \
        {int(n["id"][4:]) for n in data["nodes"] if n["kind"] == "output"}
    for id in on_chains - {n for n in nodes if n.startswith("out:")}:
        node = nodes[id]
        assert sorted(m[0] for m in node["maps"]) == list(range(len(views)))  # one heatmap per task image
        png = base64.b64decode(data["pics"][node["featvis"]].split(",", 1)[1])
        assert (node["featvisFailed"] is not None) == (_pixel_std(png) < 0.02)
    drawn = sum(len(c["nodes"]) for c in data["columns"] if c["kind"] == "layer")
    assert sum(c["kept"] for c in data["columns"] if c["kind"] == "layer") == counts["filters_kept"]
    assert drawn + sum(c["more"] for c in data["columns"]) == counts["filters_kept"]
    assert [i["wrong"] for i in data["images"]] == [False, False, True, True]  # espresso views are wrong
    assert re.search(r"Image 3: true espresso, predicted (?!espresso)", data["images"][2]["caption"])
    assert [g["images"] for g in data["groups"]] == [[0, 1], [2, 3]]


def test_degradation_in_the_panel_equals_removing_the_filter_from_the_thresholded_network(report, resnet):
    path, views, _, _ = report
    model, sub = resnet
    nodes = [n for n in _data(path.read_text())["nodes"] if n["maps"]]  # the chain filters
    with torch.no_grad():
        predicted = model(views.images).argmax(-1)
        with thresholded(sub, model):
            base = model(views.images).softmax(-1)[torch.arange(len(views)), predicted]
    for node in nodes[:4]:
        site, index = node["id"].rsplit(":", 1)
        scores = {k: v.clone() for k, v in sub.scores.items()}
        scores[site][int(index)] = 0.0
        with torch.no_grad(), thresholded(dataclasses.replace(sub, scores=scores), model):
            removed = model(views.images).softmax(-1)[torch.arange(len(views)), predicted]
        shown = dict(node["facts"])["Degradation when removed"]
        assert float(shown.split()[0]) == pytest.approx(float((base - removed).mean()), abs=1e-4)
    assert all("not measured" in dict(n["facts"])["Degradation when removed"]
               for n in _data(path.read_text())["nodes"] if not n["maps"] and n["kind"] == "unit")


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def _console(run: subprocess.CompletedProcess) -> List[str]:
    return [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def test_report_runs_its_script_in_headless_chromium_and_the_csp_blocks_the_rest(report, tmp_path):
    path = report[0]
    run = _chromium(tmp_path / "profile", "--virtual-time-budget=10000", "--window-size=1280,800", "--dump-dom",
                    path.as_uri())
    assert not _console(run) and re.search(r'<body data-ready="[\d.]+"', run.stdout)
    assert len(re.findall(r'<g class="node[ "]', run.stdout)) == len(_data(path.read_text())["nodes"])  # the graph was drawn
    page = path.read_text()
    tampered = tmp_path / "tampered.html"  # one changed character: the hash no longer matches
    tampered.write_text(page.replace("'use strict';", "'use strict'; ", 1))
    run = _chromium(tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", tampered.as_uri())
    assert "data-ready" not in run.stdout and any("Content Security Policy" in line for line in _console(run))
    remote = tmp_path / "remote.html"
    remote.write_text(page.replace("<main>", '<main><img alt="remote" src="http://example.invalid/x.png">'))
    run = _chromium(tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", remote.as_uri())
    assert any("Content Security Policy" in line for line in _console(run))


def test_chains_figure_png_and_pdf(report, resnet):
    _, views, classes, run = report
    model, sub = resnet
    png = write_chains_figure(run / "fig.png", run, sub, model, views, images=[0, 2], featvis_steps=2,
                              featvis_size=32, class_indices=classes)
    longest = max(len(c.filters) for n in (0, 2) for c in extract_chains(sub, model, views.images, k=2)[n])
    with Image.open(png) as image:  # a row per chain: the image, then a picture per chain filter
        assert image.format == "PNG" and image.height > 4 * 2 * 128 and image.width > (longest + 1) * 128
    pdf = write_chains_figure(run / "fig.pdf", run, sub, model, views, featvis_steps=2, featvis_size=32)
    assert pdf.read_bytes().startswith(b"%PDF-")
    with pytest.raises(ValueError, match=r"\.png or \.pdf"):
        write_chains_figure(run / "fig.jpg", run, sub, model, views)


def test_report_prints_its_stages_and_shows_the_task_warnings(resnet, tmp_path):
    model, sub = resnet
    flagged = dataclasses.replace(sub, task={**sub.task, "warnings": ["the model predicts the same class <b>"]})
    photos = {k: v for k, v in demo_photos().items() if k in ("Egyptian cat", "espresso")}
    views = augmented_views(photos, per_class=1, transform=preprocessing(model, 64))
    stream = io.StringIO()
    progress = Progress(stream=stream)
    page = write_report(tmp_path, flagged, model, views, featvis_steps=2, featvis_size=32, progress=progress)
    lines = [line for line in stream.getvalue().splitlines() if line.endswith(" ...")]
    assert [line.split(":")[0].removesuffix(" ...") for line in lines] == [
        "chains", "feature visualisation", "heatmaps", "degradation", "report page"]
    assert list(progress.seconds) == ["chains", "feature visualisation", "heatmaps", "degradation", "report page"]
    text = page.read_text()
    warning = '<p class="bad" role="alert">Warning: the model predicts the same class &lt;b&gt;</p>'
    assert warning in text and text.index(warning) < text.index(html.escape(sub.summary()))
