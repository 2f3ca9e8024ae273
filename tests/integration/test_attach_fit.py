"""attach / fit / threshold / Subnetwork (issue: the core)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import hookchains
from hookchains.adapters import discover
from hookchains.core.metrics import fidelity, quotient
from hookchains.core.subnetwork import Subnetwork

# one per family at a small size (timm's test_* models are the families' smallest members); site counts
# of the paper's full-size models are checked on the meta device (shapes only, no weights allocated)
ROUND_TRIP = [("timm", "resnet50", 64), ("timm", "mobilenetv2_100", 64), ("timm", "test_vit", 160),
              ("timm", "test_efficientnet", 64), ("timm", "test_byobnet", 64),
              ("timm", "test_nfnet", 64), ("tv", "resnet18", 64), ("tv", "vgg16", 64), ("tv", "mobilenet_v2", 64)]


def _model(source: str, name: str, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    return model.eval()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("source,name,px", ROUND_TRIP, ids=[r[1] + "-" + r[0] for r in ROUND_TRIP])
def test_attach_detach_leaves_model_exactly_as_before(source, name, px):
    model = _model(source, name)
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(0))
    before_state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = model(x)
    with hookchains.attach(model, example=x[:1]) as chains:
        assert _hook_count(model) >= len(chains.sites.filters)
        with torch.no_grad():
            for s in chains.scores.values():
                s.mul_(0.5)
            changed = model(x)
        assert (changed - before).abs().max() > 1e-3 * before.abs().max(), "hooks had no effect"
    assert _hook_count(model) == 0
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_site_counts_match_the_paper():
    resnet = discover(_model("timm", "resnet50", "meta"))
    assert resnet.totals()["conv_filters"] == 26560
    assert resnet.totals()["conv_params"] == 23454912  # paper Table 1
    assert len(resnet.gates) == 12  # 16 bottlenecks, 4 with a projection shortcut
    labels = {f.label for f in resnet.filters}
    assert {"L0C1", "L1B1C1", "L1B1SC", "L4B3C3"} <= labels
    deit = discover(_model("timm", "deit_small_patch16_224", "meta"))
    assert deit.totals()["token_slots"] == 197 * 12 == 2364
    vgg = discover(_model("tv", "vgg16", "meta"))
    assert [g.label for g in vgg.gates][:2] == ["L2", "L7"]  # conv+ReLU layers with equal in/out shape


def test_scores_sit_after_the_norm_layer():
    sites = discover(_model("tv", "resnet18", "meta"))
    site = sites.filter("layer1.0.conv1")
    assert (site.hook_module, site.fold_module) == ("layer1.0.bn1", "layer1.0.bn1")
    timm_site = discover(_model("timm", "mobilenetv2_100", "meta")).filter("blocks.1.0.conv_pw")
    assert timm_site.hook_module == "blocks.1.0.bn1.drop"  # BatchNormAct2d: between norm and activation


class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU())
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.body[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]).view(2, 2, 1, 1))
            self.head.weight.copy_(torch.eye(2))

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_gate_and_score_semantics_by_hand():
    model = _TwoLayer()
    x = torch.tensor([1.0, 1.0]).view(1, 2, 1, 1)
    chains = hookchains.attach(model, example=x)
    assert [g.name for g in chains.sites.gates] == ["body.0"]  # conv+ReLU span, 2 -> 2 channels
    with torch.no_grad():
        chains.scores["body.0"].copy_(torch.tensor([0.5, 0.05]))
        # soft: G = 0.5 at init -> 0.5 * F(H) + 0.5 * H with F(H) = relu(S * W H)
        assert torch.allclose(model(x), torch.tensor([[0.5 * 1.0 + 0.5, 0.5 * 0.15 + 0.5]]))
        with chains.using("hard"):  # S < tau removed, G rounded to 1
            assert torch.allclose(model(x), torch.tensor([[1.0, 0.0]]))
        with chains.using("mask"):
            assert torch.allclose(model(x), torch.tensor([[2.0, 0.0]]))
        chains.gate_logits["body.0"].fill_(-1.0)
        with chains.using("hard"):  # gate closed: the layer is skipped
            assert torch.allclose(model(x), torch.tensor([[1.0, 1.0]]))
    chains.detach()


def test_metrics_by_hand():
    teacher = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    student = torch.log(torch.tensor([[0.4, 0.5, 0.1]]))
    assert torch.allclose(quotient(teacher, student), torch.tensor([(0.4 - 0.5) / (0.7 - 0.2)]))
    f = fidelity(teacher, student)
    kl = 0.7 * torch.log(torch.tensor(0.7 / 0.4)) + 0.2 * torch.log(torch.tensor(0.2 / 0.5))
    assert f["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert f["agree"] == 0 and f["negative_quotients"] == 1
    assert f["prob_drop"] == pytest.approx(0.3, rel=1e-5)


def test_fit_on_trained_digits_net_is_small_faithful_and_saves(digits_net, digits_task, tmp_path):
    images, _ = digits_task
    model = copy.deepcopy(digits_net)
    flags = [p.requires_grad for p in model.parameters()]
    with hookchains.attach(model, example=images[:1]) as chains:
        result = hookchains.fit(chains, images, steps=200, lr=0.02, lam=0.01, progress=False)
        assert all(p.grad is None for p in model.parameters()), "weights must get no gradient"
    assert [p.requires_grad for p in model.parameters()] == flags
    counts, fid = result.counts(), result.fidelity
    assert counts["filters_total"] == 16 + 16 + 32 + 32
    # the default recipe (ste, m_max=None) keeps the KL within its 0.1 target: 54/96 filters, KL 0.048
    # (the clamped recipe kept 36 with KL 0.38, below what the task needs)
    assert counts["filters_kept"] <= 0.6 * counts["filters_total"], result.summary()
    assert fid["agree"] >= 19 and fid["kl"] <= 0.1, result.summary()
    # fidelity is that of the thresholded network: recompute it by hand with hooks in hard mode
    with hookchains.attach(model, example=images[:1]) as chains, torch.no_grad():
        chains.load_state(result.scores, result.gate_logits)
        teacher = model(images)
        with chains.using("off"):
            teacher = model(images)
        with chains.using("hard"):
            student = model(images)
    assert fidelity(teacher, student)["kl"] == pytest.approx(fid["kl"], abs=1e-6)
    result.save(tmp_path / "run")
    loaded = Subnetwork.load(tmp_path / "run")
    assert loaded.summary() == result.summary()
    assert all(torch.equal(loaded.scores[k], v) for k, v in result.scores.items())
    assert loaded.kept_filters() == result.kept_filters()


def test_fit_is_deterministic(digits_net, digits_task):
    images, _ = digits_task
    runs = []
    for _ in range(2):
        with hookchains.attach(copy.deepcopy(digits_net), example=torch.zeros(1, 1, 8, 8)) as chains:
            runs.append(hookchains.fit(chains, images, steps=20, lr=0.05, progress=False))
    assert all(torch.equal(runs[0].scores[k], runs[1].scores[k]) for k in runs[0].scores)
    assert runs[0].history == runs[1].history


def test_paper_recipe_is_available(digits_net, digits_task):
    images, _ = digits_task
    with hookchains.attach(copy.deepcopy(digits_net), example=torch.zeros(1, 1, 8, 8)) as chains:
        result = hookchains.fit(chains, images, steps=30, recipe="paper", progress=False)
    assert result.config["recipe"] == "paper"
    assert result.config["steps_run"] <= 30
    assert min(float(a) for a in result.gate_logits.values()) < 0  # sum(alpha) pushes every gate down


class _NoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x.flatten(1) * self.scale


@pytest.mark.parametrize("bad,message", [
    (torch.zeros(3, 8, 8), r"\(N, C, H, W\)"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "float"),
    (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
    (torch.zeros(0, 1, 8, 8), "empty"),
])
def test_bad_images_are_clear_errors(digits_net, bad, message):
    with hookchains.attach(copy.deepcopy(digits_net), example=torch.zeros(1, 1, 8, 8)) as chains:
        with pytest.raises(ValueError, match=message):
            hookchains.fit(chains, bad, steps=1, progress=False)


@pytest.mark.parametrize("option,message", [({"lam": -1.0}, "lam must be >= 0"), ({"steps": 0}, "steps must be > 0"),
                                            ({"lam_gate": -2.0}, "lam_gate"), ({"recipe": "magic"}, "recipe")])
def test_bad_options_are_clear_errors(digits_net, digits_task, option, message):
    with hookchains.attach(copy.deepcopy(digits_net), example=torch.zeros(1, 1, 8, 8)) as chains:
        with pytest.raises(ValueError, match=message):
            hookchains.fit(chains, digits_task[0], progress=False, **option)
        assert all(torch.equal(s, torch.ones_like(s)) for s in chains.scores.values())  # nothing ran


def test_default_probe_shape_mismatch_asks_for_an_example(digits_net):
    with pytest.raises(ValueError, match="pass example="):
        hookchains.attach(copy.deepcopy(digits_net))


def test_model_without_conv_or_linear_is_a_clear_error():
    with pytest.raises(ValueError, match="no conv or linear layer"):
        hookchains.attach(_NoLayers(), example=torch.zeros(1, 4))


def test_load_rejects_tampered_files(digits_net, digits_task, tmp_path):
    with hookchains.attach(copy.deepcopy(digits_net), example=torch.zeros(1, 1, 8, 8)) as chains:
        result = hookchains.fit(chains, digits_task[0], steps=2, progress=False)
    result.save(tmp_path / "run")
    data = (tmp_path / "run" / "scores.safetensors").read_bytes()
    (tmp_path / "run" / "scores.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Subnetwork.load(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="not a hookchains result folder"):
        Subnetwork.load(tmp_path)
