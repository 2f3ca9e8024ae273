"""Like-for-like figures (issue 12, item 5): paper-comparable counts, baselines the paper's way, per-image
KL shares, faithfulness binned and against a gradient x activation baseline, robustness as accuracy, and the
random-weights control."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math

import pytest
import timm
import torch
import torchvision
from torch import nn

import hookchains
from hookchains.adapters import discover
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.baselines import baseline, proportional_counts
from hookchains.evaluation.controls import kept_overlap, output_spread, randomized_copy
from hookchains.evaluation.evaluate import EvalOptions, evaluate, summary_line
from hookchains.evaluation.faithfulness import taylor_importance
from hookchains.inputs.tasks import TaskImages
from hookchains.viz.sweep_report import headline

VGG19_CONV = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]  # Simonyan & Zisserman, config E


def _on_meta(build):
    """Sites of a real architecture discovered on the meta device (no weights, no memory)."""
    with torch.device("meta"):
        model = build().eval()
    return discover(model, example=torch.empty(1, 3, 224, 224, device="meta"))


def _keep_all(sites) -> Subnetwork:
    return Subnetwork(sites, {s.name: torch.ones(s.channels) for s in sites.filters},
                      {g.name: torch.tensor(1.0) for g in sites.gates})


@pytest.mark.parametrize("build", [torchvision.models.vgg19, lambda: timm.create_model("vgg19")])
def test_vgg19_counts_conv_filters_and_fully_connected_units_apart(build):
    sites = _on_meta(build)
    counts = _keep_all(sites).counts()
    assert counts["conv_filters_total"] == sum(VGG19_CONV) == 5504
    assert counts["conv_layers_total"] == len(VGG19_CONV) == 16
    assert counts["linear_units_total"] == 2 * 4096 and counts["linear_layers_total"] == 2
    assert counts["filters_total"] == 5504 + 8192 and counts["layers_total"] == 18  # the old keys stay
    scores = {s.name: torch.ones(s.channels) for s in sites.filters}
    first_conv, first_fc = sites.filters[0], next(s for s in sites.filters if s.kind == "linear")
    scores[first_conv.name][:60] = 0.0   # 4 of 64 kept
    scores[first_fc.name][:] = 0.0       # a whole fully-connected layer removed
    part = Subnetwork(sites, scores, {g.name: torch.tensor(1.0) for g in sites.gates}).counts()
    assert (part["conv_filters_kept"], part["conv_layers_kept"]) == (5504 - 60, 16)
    assert (part["linear_units_kept"], part["linear_layers_kept"]) == (4096, 1)
    assert part["filters_kept"] == part["conv_filters_kept"] + part["linear_units_kept"]


def test_resnet50_has_26560_conv_filters_in_53_conv_layers_not_67():
    counts = _keep_all(_on_meta(torchvision.models.resnet50)).counts()
    widths = {1: 64, 2: 128, 3: 256, 4: 512}
    blocks = {1: 3, 2: 4, 3: 6, 4: 3}
    # stem + per stage: blocks x (w, w, 4w) + one 4w downsample conv
    expected = 64 + sum(blocks[i] * 6 * widths[i] + 4 * widths[i] for i in widths)
    assert counts["conv_filters_total"] == expected == 26560
    assert counts["conv_layers_total"] == 1 + 3 * sum(blocks.values()) + 4 == 53
    assert counts["linear_units_total"] == 0


# ------------------------------------------------------------------------------ fitted digits net
@pytest.fixture(scope="module")
def fitted(one_thread, digits_net, digits_task):
    """A short NeuroChains fit on the trained digits net; hooks left on, weights checked afterwards."""
    images, labels = digits_task
    model = copy.deepcopy(digits_net)
    chains = hookchains.attach(model, example=images[:1])
    sub = hookchains.fit(chains, images, steps=100, lr=0.02, lam=0.01, progress=False)
    weights = copy.deepcopy(model.state_dict())
    yield chains, sub, images, labels
    chains.detach()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), "weights changed"


@pytest.mark.parametrize("widths, budget", [([16, 16, 32, 32], 37), ([3, 64, 500, 7], 20), ([5, 5, 5], 3),
                                            ([2, 1000], 600), ([10, 20, 30], 60)])
def test_proportional_counts_sum_to_the_budget_and_follow_the_widths(widths, budget):
    counts = proportional_counts(widths, budget)
    assert sum(counts) == budget and all(1 <= c <= w for c, w in zip(counts, widths))
    quota = [budget * w / sum(widths) for w in widths]
    for c, q, w in zip(counts, quota, widths):
        assert c in (1, w) or math.floor(q) <= c <= math.ceil(q), (counts, quota)
    for i, j in itertools.permutations(range(len(widths)), 2):
        assert widths[i] < widths[j] or counts[i] >= counts[j] or widths[i] == widths[j] and counts[j] - counts[i] <= 1


def test_default_baseline_is_the_papers_protocol(fitted):
    chains, sub, images, _ = fitted
    steps_run = sub.config["steps_run"]
    base = baseline(chains, images, sub, "magnitude")
    assert base.config == {"kind": "magnitude", "allocation": "proportional", "budget": sub.counts()["filters_kept"],
                           "gates": "open", "steps": steps_run, "lr": sub.config["lr"], "seed": 0}
    assert len(base.history["kl"]) == steps_run  # as many fine-tuning steps as the fit ran
    assert base.removed_gates == []
    widths = [s.channels for s in sub.sites.filters]
    kept = base.kept_filters()
    assert [len(kept.get(s.name, [])) for s in sub.sites.filters] == proportional_counts(widths, sub.counts()["filters_kept"])
    with pytest.raises(ValueError, match="pass steps= and lr="):
        baseline(chains, images, dataclasses.replace(sub, config={}), "random")


# ------------------------------------------------------------------------- gradient x activation
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_taylor_importance_equals_autograd_grad_times_activation():
    torch.manual_seed(0)
    model, images = _Tiny().eval(), torch.randn(5, 1, 6, 6)
    for bn in (model.b1, model.b2):  # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    with hookchains.attach(model, example=images[:1]) as chains:
        with torch.no_grad():
            for score in chains.scores.values():
                score.uniform_(0.0, 1.5)  # some below tau = 0.1, some above the bound of 1
        sub = Subnetwork(chains.sites, {k: v.detach().clone() for k, v in chains.scores.items()},
                         {k: v.detach().clone() for k, v in chains.gate_logits.items()}, chains.tau, chains.temperature)
        ours = taylor_importance(chains, sub, images)
        # by hand: the scaled featuremaps the next layers read, their gradient, the product summed
        acts = {}
        handles = [chains.model.get_submodule(s.hook_module).register_forward_hook(
            lambda m, a, out, name=s.name: acts.__setitem__(name, out) or out.retain_grad()) for s in sub.sites.filters]
        with chains.using("hard"):
            logits = model(images)
        for h in handles:
            h.remove()
    with torch.no_grad():
        teacher = model(images)
    j = torch.softmax(logits, -1).gather(-1, teacher.argmax(-1)[:, None]).mean()
    j.backward()
    expected = [float((acts[name].grad * acts[name].detach())[:, i].sum()) for name, idx in sub.kept_filters().items()
                for i in idx]
    assert len(ours) == sum(len(v) for v in sub.kept_filters().values()) > 3
    assert ours == pytest.approx(expected, rel=1e-4, abs=1e-7)


# ------------------------------------------------------------------------------ random-weights control
def test_randomized_copy_redraws_every_weight_and_leaves_the_model_alone(fitted):
    chains, _, images, _ = fitted
    state = torch.random.get_rng_state()
    twin = randomized_copy(chains.model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG restored
    pairs = list(zip(chains.model.state_dict().items(), twin.state_dict().items()))
    weights = [(k, a, b) for (k, a), (_, b) in pairs if k.endswith("weight") and "features.1" not in k]
    assert all(not torch.equal(a, b) for _, a, b in weights if a.ndim > 1), "a conv/linear weight survived"
    assert all(torch.equal(b, torch.zeros_like(b)) for (k, _), (_, b) in pairs if k.endswith("running_mean"))
    assert not any(m._forward_hooks for m in twin.modules())  # hookchains' hooks are not copied
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(twin.state_dict().items(),
                                                           randomized_copy(chains.model, seed=1).state_dict().items()))
    with torch.no_grad(), chains.using("off"):
        assert not torch.allclose(twin(images), chains.model(images))


def _teacher(chains, images):
    with torch.no_grad(), chains.using("off"):
        return chains.model(images)


def test_output_spread_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    mean = p.mean(0)
    expected = float(sum((p[i] * (p[i] / mean).log()).sum() for i in range(2)) / 2)
    assert output_spread(p.log() + 3.0) == pytest.approx(expected, rel=1e-6)  # logits up to a constant
    assert output_spread(torch.tensor([[2.0, -1.0]] * 4)) == pytest.approx(0.0, abs=1e-7)


def test_kept_overlap_counts_by_hand(fitted):
    _, sub, _, _ = fitted
    sites = sub.sites.filters
    a = {s.name: torch.zeros(s.channels) for s in sites}
    b = {s.name: torch.zeros(s.channels) for s in sites}
    a[sites[0].name][[0, 1, 2]] = 1.0
    b[sites[0].name][[2, 3]] = 1.0
    a[sites[2].name][[5]] = 1.0
    real, other = (dataclasses.replace(sub, scores=x) for x in (a, b))
    overlap = kept_overlap(real, other)
    assert overlap == {"shared": 1, "shared_by_chance": pytest.approx(3 * 2 / sites[0].channels), "jaccard": 1 / 5,
                       "real_kept_share": 1 / 4}
    assert kept_overlap(real, real)["jaccard"] == 1.0


def test_evaluate_reports_per_image_kl_protocol_accuracy_and_a_random_weights_control_that_differs(fitted):
    chains, sub, images, labels = fitted
    empty = torch.empty(0, *images.shape[1:])
    data = TaskImages(images, (labels == labels.max()).long(), empty, torch.empty(0, dtype=torch.long),
                      ["3", "8"], [], [])
    options = EvalOptions(faithfulness=False, robustness=True, pgd_steps=2, random_control=True)
    record = evaluate(chains, sub, data, options, output_index=[3, 8])
    fid = record["fidelity"]
    assert len(fid["kls"]) == 20 and sum(fid["kls"]) / 20 == pytest.approx(fid["kl"], rel=1e-5) and fid["outputs"] == 10
    assert record["size"]["conv_filters_kept"] == record["size"]["filters_kept"]  # the digits net's sites are convs
    for kind, base in record["baselines"].items():
        assert base["protocol"]["kind"] == kind
        assert base["protocol"]["allocation"] == "proportional" and base["protocol"]["gates"] == "open"
        assert base["protocol"]["steps"] == sub.config["steps_run"] and base["filters_kept"] == sub.counts()["filters_kept"]
        assert sum(base["kls"]) / 20 == pytest.approx(base["kl"], rel=1e-5)
    correct = record["robustness"]["correct"]
    assert sum(correct["original"]["clean"]) >= 18  # the trained net knows its digits
    control = record["random_weights"]
    assert set(control) == {"seed", "size", "fidelity", "steps_run", "overlap", "output_spread"}
    spread = control["output_spread"]
    assert spread["real"] == pytest.approx(output_spread(_teacher(chains, images)))
    assert spread["random"] < spread["real"] / 10, spread  # the randomised digits net nearly ignores its input
    # the explanation of a randomised network is not the real one: few kept filters in common
    assert control["overlap"]["jaccard"] < 0.6, control
    assert control["overlap"]["real_kept_share"] < 0.8, control
    json.dumps(record)


def test_a_sub_network_smaller_than_the_layer_count_skips_the_proportional_baseline_in_one_line(fitted):
    chains, sub, images, labels = fitted
    tiny = {name: torch.zeros_like(v) for name, v in sub.scores.items()}
    tiny[sub.sites.filters[0].name][:2] = 1.0  # 2 filters, 4 layers
    small = dataclasses.replace(sub, scores=tiny)
    empty = torch.empty(0, *images.shape[1:])
    data = TaskImages(images, (labels == labels.max()).long(), empty, torch.empty(0, dtype=torch.long), ["3", "8"], [], [])
    record = evaluate(chains, small, data, EvalOptions(faithfulness=False))
    assert set(record["baselines"]) == {"magnitude", "random"}
    assert all(set(b) == {"error"} and "fewer than the 4 layers" in b["error"] for b in record["baselines"].values())
    line = summary_line("0001", ("3", "8"), record)
    assert "magnitude skipped (the sub-network keeps 2 filters" in line
    assert headline([record]).get("baselines") is None
