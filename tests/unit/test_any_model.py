"""Issue 11: every kind of model is explained exactly or refused in one line (hand-built nets).

Each test builds a small stand-in for one kind of model that broke hook-based tools and checks the
right value, computed another way (by hand on the model, without hookchains' hooks).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hookchains.core.attach import attach
from hookchains.core.fit import fit
from hookchains.core.guard import InexactModelError
from hookchains.core.materialize import materialize
from hookchains.core.state import explaining, flush_denormal_enabled
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.sandbox import sandbox
from hookchains.inputs.forward import OutputSpec, class_scores


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Results independent of the machine."""


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(softmax(p) || softmax(q)) over rows, the long way."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    return float((p * (p.log() - q.log())).sum(-1).mean())


def _sub(hooks, closed=(), zero=()) -> Subnetwork:
    """A sub-network of ``hooks.sites`` keeping everything except ``closed`` gates and ``zero`` filter sites."""
    sites = hooks.sites
    scores = {s.name: torch.zeros(s.channels) if s.name in zero else torch.ones(s.channels) for s in sites.filters}
    gates = {g.name: torch.tensor(-1.0 if g.name in closed else 1.0) for g in sites.gates}
    return Subnetwork(sites, scores, gates)


def _fitted(model, inputs, attach_options=None, **options):
    """Attach on the first example of ``inputs`` (a tensor or tuple of inputs) and fit on them;
    returns (result, the model's outputs, the thresholded sub-network's outputs) on ``inputs``."""
    run = (lambda: model(*inputs)) if isinstance(inputs, tuple) else (lambda: model(inputs))
    example = tuple(t[:1] for t in inputs) if isinstance(inputs, tuple) else inputs[:1]
    with attach(model, example=example, **(attach_options or {})) as hooks:
        sub = fit(hooks, inputs, progress=False, **options)
        hooks.load_state(sub.scores, sub.gate_logits)
        with torch.no_grad(), hooks.using("hard"):
            student = run()
    with torch.no_grad():
        return sub, run(), student


def _hard(hooks, inputs, closed=(), zero=()):
    with torch.no_grad(), hooks.using("hard"):
        hooks.load_state(_sub(hooks, closed, zero).scores, _sub(hooks, closed, zero).gate_logits)
        out = hooks.model(*inputs) if isinstance(inputs, tuple) else hooks.model(inputs)
    return out


# ---------------------------------------------------------------- the guard
class FunctionalSkipNet(nn.Module):
    """Not in the issue's list: an untraceable model (data-dependent branch) whose conv output feeds
    its BatchNorm *and* a functional skip (``bn(y) + y``). Without fx the probe sees the BN as the
    conv's only consumer, so a score after the BN would leave the skip's copy of the channels alive."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            y = self.conv(x)
            x = torch.relu(self.bn(y) + y)
        return self.fc(x.mean((2, 3)))


def test_guard_refuses_a_site_whose_score_misses_a_functional_use():
    torch.manual_seed(0)
    model = FunctionalSkipNet().eval()
    x = torch.randn(2, 3, 16, 16)
    hooks = attach(model, example=x[:1])
    assert hooks.sites.discovery == "probe"
    assert "conv" in hooks.sites.refused["filters"] and "zeroing its scores differs" in hooks.sites.refused["filters"]["conv"]
    assert [s.name for s in hooks.sites.filters] == ["stem"]
    assert any("'conv' refused" in n for n in hooks.sites.notes)
    hooks.detach()
    unchecked = attach(model, example=x[:1], check=False)  # what the tool explained before the guard
    silenced = _hard(unchecked, x, zero=("conv",))
    unchecked.detach()
    with torch.no_grad():  # the network where conv's channels (and its norm's) are really zero at every use
        model.conv.weight.zero_(), model.conv.bias.zero_(), model.bn.weight.zero_(), model.bn.bias.zero_()
        reference = model(x)
    assert torch.allclose(reference, model.fc.bias.expand(2, 4))
    assert (silenced - reference).abs().max() > 1e-3  # the score after the BN missed the skip: refusal needed


class Noisy(nn.Module):
    """MC dropout: a model that is random in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.dropout(self.conv(x), 0.5, training=True).mean((2, 3)))


def test_guard_refuses_a_model_that_is_random_in_eval_mode():
    with pytest.raises(InexactModelError, match="differs from the model"):
        attach(Noisy().eval(), example=torch.randn(1, 3, 8, 8))


def test_guard_keeps_every_site_of_an_exact_model():
    hooks = attach(_randomise_bn(RepNet()).eval(), example=torch.randn(1, 3, 8, 8))
    assert hooks.sites.refused == {"filters": {}, "gates": {}}
    assert [s.name for s in hooks.sites.filters] == ["stem", "b1.scale.conv", "b1.kxk.conv", "b2.scale.conv", "b2.kxk.conv"]
    assert len(hooks.sites.gates) == 4 and not any("refused" in n for n in hooks.sites.notes)
    hooks.detach()


# ---------------------------------------------------------------- kind 1: a module called twice
def _shared_relu_net():
    act = nn.ReLU()
    body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), act,
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), act)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def test_shared_activation_never_ends_a_gate_span_and_closed_gates_are_exact():
    torch.manual_seed(0)
    model = _shared_relu_net().eval()
    x = torch.randn(3, 3, 16, 16)
    with attach(model, example=x[:1]) as hooks:
        spans = {g.name: g.members for g in hooks.sites.gates}
        assert spans == {"1.0": ("1.0", "1.1"), "1.3": ("1.3", "1.4")}
        closed = _hard(hooks, x, closed=("1.0",))
    with torch.no_grad():  # layer 1.0-1.1 removed: the shared ReLU still runs after it
        body = model[1]
        h = model[0](x)
        expected = model[4](model[3](model[2](body[2](body[4](body[3](body[2](h.clone())))))))
    assert torch.equal(closed, expected)


class TwoViews(nn.Module):
    """One conv applied to two views, each followed by its own BatchNorm (siamese style)."""

    def __init__(self, same_norm: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = self.bn1 if same_norm else nn.BatchNorm2d(8)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        a, b = self.bn1(self.conv(h)), self.bn2(self.conv(h.flip(-1)))
        return self.fc(torch.cat([a.mean((2, 3)), b.amax((2, 3))], 1))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2), m.bias.uniform_(-1, 1), m.running_mean.uniform_(-1, 1)
    return model


def test_conv_used_twice_with_two_norms_is_refused():
    torch.manual_seed(0)
    model = _randomise_bn(TwoViews()).eval()
    with attach(model, example=torch.randn(1, 3, 8, 8)) as hooks:
        assert "conv" in hooks.sites.refused["filters"]
        assert "runs 2 times per forward" in hooks.sites.refused["filters"]["conv"]
        assert [s.name for s in hooks.sites.filters] == ["stem"]


def test_conv_used_twice_with_one_norm_is_scored_at_both_uses():
    torch.manual_seed(0)
    model = _randomise_bn(TwoViews(same_norm=True)).eval()
    x = torch.randn(2, 3, 8, 8)
    with attach(model, example=x[:1]) as hooks:
        assert hooks.sites.filter("conv").hook_module == "bn1"
        silenced = _hard(hooks, x, zero=("conv",))
    with torch.no_grad():  # both uses silenced: the BN outputs are zero for both views
        zero = torch.zeros(2, 8)
        expected = model.fc(torch.cat([zero, zero], 1))
    assert torch.allclose(silenced, expected, atol=1e-6)


# ---------------------------------------------------------------- kind 2: mixed modes, flags, RNG
def test_mixed_modes_flags_flush_and_rng_survive_attach_fit_sandbox_detach():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).train()
    inner[1].eval(), inner[5].eval()                        # frozen BatchNorms, the fine-tuning set-up
    inner[0].bias.requires_grad_(False)
    model = nn.DataParallel(inner)                            # a train-mode wrapper
    modes = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    x = torch.randn(4, 3, 8, 8)
    torch.set_flush_denormal(True)
    try:
        rng = torch.random.get_rng_state()
        hooks = attach(model, example=x[:1])
        sub = fit(hooks, x, steps=3, progress=False)
        with sandbox(hooks, sub):
            assert not any(m.training for m in model.modules())
        hooks.detach()
        assert torch.equal(rng, torch.random.get_rng_state())   # fit forked the RNG, never reseeded it
        assert flush_denormal_enabled()                          # the caller's value, not False
    finally:
        torch.set_flush_denormal(False)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads


def test_explaining_restores_each_flag_on_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    net[1].eval()
    with pytest.raises(KeyError):
        with explaining(net, flush_denormal=True):
            raise KeyError("boom")
    assert [net.training, net[0].training, net[1].training] == [True, True, False]
    assert not flush_denormal_enabled()


# ---------------------------------------------------------------- kind 3: outputs
class TupleBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return x + y, y.mean((2, 3))


class TupleBlocksNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.b2, self.fc = nn.Conv2d(3, 8, 3, padding=1), TupleBlock(8), TupleBlock(8), nn.Linear(8, 5)

    def forward(self, x):
        x, _ = self.b1(self.stem(x))
        x, _ = self.b2(x)
        return self.fc(x.mean((2, 3)))


def test_block_returning_a_tuple_is_not_a_gate_and_the_fit_kl_is_the_true_kl():
    torch.manual_seed(0)
    model = TupleBlocksNet().eval()
    x = torch.randn(4, 3, 8, 8)
    sub, teacher, student = _fitted(model, x, steps=5, lam=0.05)
    assert sub.sites.gates == []
    assert sub.fidelity["kl"] == pytest.approx(_kl(teacher, student), abs=1e-6)


class LogitsAndFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x):
        f = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return {"logits": self.fc(f), "features": f}


def test_dict_output_needs_a_selector_named_in_one_line_then_fits():
    model, x = LogitsAndFeatures().eval(), torch.randn(3, 3, 8, 8)
    with pytest.raises(ValueError, match=r"keys \['logits', 'features'\]: pass output=<key>") as info:
        attach(model, example=x[:1])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"output='out' is not a key"):
        attach(model, example=x[:1], output="out")
    sub, teacher, student = _fitted(model, x, {"output": "logits"}, steps=3, lam=0.1)
    assert sub.sites.classifier == "fc" and sub.sites.output == OutputSpec("logits", "logits")
    assert sub.sites.to_json()["output"] == {"select": "logits", "kind": "logits"}
    assert sub.fidelity["kl"] == pytest.approx(_kl(teacher["logits"], student["logits"]), abs=1e-6)


class TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x)))))))


def test_dense_prediction_kl_is_per_pixel_over_classes_averaged():
    torch.manual_seed(0)
    model, x = TinySeg().eval(), torch.randn(2, 3, 6, 5)
    sub, teacher, student = _fitted(model, x, steps=5, lam=0.2)
    assert sub.sites.classifier == "head"
    per_pixel = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731 -- rows = the 2 x 6 x 5 pixels
    assert sub.fidelity["kl"] == pytest.approx(_kl(per_pixel(teacher), per_pixel(student)), abs=1e-6)
    assert sub.fidelity["images"] == 2 and sub.fidelity["positions"] == 60
    assert sub.fidelity["agree"] == int((teacher.argmax(1) == student.argmax(1)).sum())


def _softmax_head_model(tail):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                      nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32),
                      nn.ReLU(), nn.Linear(32, 5), *tail).eval()
    with torch.no_grad():
        m[10].weight.mul_(20), m[8].weight.mul_(3)  # confident predictions, like a trained model
    return m


@pytest.mark.parametrize("tail, kind", [([nn.Softmax(dim=1)], "probabilities"),
                                        ([nn.LogSoftmax(dim=1)], "log_probabilities"), ([], "logits")])
def test_probability_outputs_are_detected_and_the_reported_kl_is_the_true_kl(tail, kind):
    model = _softmax_head_model(tail)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16) + torch.randn(8, 3, 1, 1) * 2
    sub, p, q = _fitted(model, x, steps=40, lr=0.05)
    assert sub.sites.classifier == "10" and "10" not in [s.name for s in sub.sites.filters]
    assert sub.sites.output.kind == kind
    to_logp = {"probabilities": torch.log, "log_probabilities": lambda t: t, "logits": lambda t: t.log_softmax(1)}[kind]
    true_kl = float((to_logp(p).exp() * (to_logp(p) - to_logp(q))).sum(1).mean())
    assert true_kl > 0.01   # the sub-network is not the model, so the figure is a real check
    assert sub.fidelity["kl"] == pytest.approx(true_kl, rel=1e-4)
    if kind == "probabilities":  # what was reported before: probabilities taken as logits
        assert _kl(p, q) < true_kl / 3


def test_conv_classifier_then_pool_and_flatten_is_the_classifier():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(8, 5, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with attach(model, example=torch.randn(1, 3, 8, 8)) as hooks:
        assert hooks.sites.classifier == "4" and [s.name for s in hooks.sites.filters] == ["0"]


def test_class_scores_turn_probabilities_into_log_probabilities():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert torch.allclose(class_scores(p, OutputSpec(kind="auto")).log_softmax(-1), p.log())


# ---------------------------------------------------------------- kind 6: in-place ops around gates
class ConvBN(nn.Module):
    def __init__(self, c, k):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


class RepBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.scale, self.kxk, self.act = ConvBN(c, 1), ConvBN(c, 3), nn.ReLU()

    def forward(self, x):
        out = self.scale(x)
        out += self.kxk(x)
        out += x
        return self.act(out)


class RepNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.b1, self.b2, self.fc = nn.Conv2d(3, 8, 3, padding=1), RepBlock(8), RepBlock(8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.stem(x))).mean((2, 3)))


def test_in_place_accumulation_after_a_closed_branch_gate_is_exact_and_materialises():
    torch.manual_seed(0)
    model, x = _randomise_bn(RepNet()).eval(), torch.randn(3, 3, 8, 8)
    with attach(model, example=x[:1]) as hooks:
        assert "b1.scale" in [g.name for g in hooks.sites.gates] and not hooks.sites.refused["gates"]
        closed = _hard(hooks, x, closed=("b1.scale",))
        sub = _sub(hooks, closed=("b1.scale",))
    with torch.no_grad():  # Eq. 7 with G = 0 for the branch: its output is its input
        h = model.stem(x)
        out = h.clone()
        out += model.b1.kxk(h)
        out += h
        expected = model.fc(model.b2(model.b1.act(out)).mean((2, 3)))
    assert torch.allclose(closed, expected, atol=1e-5)
    small, report = materialize(sub, model, x)
    with torch.no_grad():
        assert torch.allclose(small(x), expected, atol=1e-5)


class InPlaceTop(nn.Module):
    """A block whose first op is an in-place activation of its own input."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = F.relu_(x)
        return x + self.conv(x)


def test_block_gate_sees_its_input_before_the_block_ran():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), InPlaceTop(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    x = torch.randn(2, 3, 8, 8)
    with attach(model, example=x[:1]) as hooks:
        assert [g.name for g in hooks.sites.gates] == ["1"]
        closed = _hard(hooks, x, closed=("1",))
    with torch.no_grad():  # block removed: the pre-activation featuremap goes on, negative values and all
        expected = model[4](model[0](x).mean((2, 3)))
    assert torch.allclose(closed, expected, atol=1e-6)


# ---------------------------------------------------------------- kind 7: several inputs
class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.meta, self.fc = nn.Linear(4, 8), nn.Linear(16, 5)

    def forward(self, x, meta):
        return self.fc(torch.cat([F.relu(self.bn(self.conv(x))).mean((2, 3)), F.relu(self.meta(meta))], 1))


def test_several_inputs_as_a_tuple_or_dict_fit_with_the_true_kl():
    torch.manual_seed(0)
    model = _randomise_bn(TwoInput()).eval()
    x, meta = torch.randn(4, 3, 8, 8), torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"TwoInput.forward failed on an input of shape \(1, 3, 8, 8\).*tuple or dict"):
        attach(model, example=x[:1])
    with attach(model, example={"x": x[:1], "meta": meta[:1]}) as hooks:
        assert sorted(s.name for s in hooks.sites.filters) == ["conv", "meta"]
    sub, teacher, student = _fitted(model, (x, meta), steps=5, lam=0.1)
    assert sub.fidelity["kl"] == pytest.approx(_kl(teacher, student), abs=1e-6)
    small, report = materialize(sub, model, (x, meta))
    with torch.no_grad():
        assert torch.allclose(small(x, meta), student, atol=1e-5)
    with pytest.raises(ValueError, match="same number of examples"):
        fit(attach(model, example=(x[:1], meta[:1])), (x, meta[:2]), steps=1, progress=False)


# ---------------------------------------------------------------- kind 8: 1-D and 3-D convs
def _signal_net(conv, norm, pool):
    return nn.Sequential(conv(2, 8, 3, padding=1), norm(8), nn.ReLU(), conv(8, 8, 3, padding=1), norm(8), nn.ReLU(),
                         pool(1), nn.Flatten(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("conv, norm, pool, shape", [
    (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d, (4, 2, 32)),
    (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d, (4, 2, 4, 6, 6))])
def test_1d_and_3d_convs_end_to_end(conv, norm, pool, shape):
    torch.manual_seed(0)
    model, x = _randomise_bn(_signal_net(conv, norm, pool)), torch.randn(*shape)
    sub, teacher, student = _fitted(model, x, steps=5, lam=0.3)
    assert [(s.name, s.channels, s.hook_module) for s in sub.sites.filters] == [("0", 8, "1"), ("3", 8, "4")]
    assert [g.members for g in sub.sites.gates] == [("3", "4", "5")]
    assert sub.fidelity["kl"] == pytest.approx(_kl(teacher, student), abs=1e-6)
    small, report = materialize(sub, model, x)
    assert report.channels_before == 8 + 8 + 3  # every conv and linear unit is counted
    with torch.no_grad():
        assert torch.allclose(small(x), student, atol=1e-4)


def test_wrong_rank_input_names_the_modality_and_the_right_fix():
    model = _signal_net(nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d)
    with attach(model, example=torch.randn(1, 2, 16)) as hooks:
        with pytest.raises(ValueError, match=r"takes 1-D signals \(N, C, L\) .*got shape \(2, 16\): add a batch dim"):
            fit(hooks, torch.randn(2, 16), steps=1, progress=False)
        with pytest.raises(ValueError, match=r"takes 1-D signals \(N, C, L\) .*got shape \(1, 2, 4, 4\)$"):
            fit(hooks, torch.randn(1, 2, 4, 4), steps=1, progress=False)


# ---------------------------------------------------------------- kind 10: torch.compile
def test_compiled_module_is_attached_through_the_module_it_wraps():
    model = _signal_net(nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d)
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    x = torch.randn(2, 2, 16)
    with attach(compiled, example=x[:1]) as hooks:
        assert hooks.model is model
        assert any("torch.compile" in n and "_orig_mod" in n for n in hooks.sites.notes)
        silenced = _hard(hooks, x, zero=("0", "3"))
    with torch.no_grad():  # both conv layers silenced: only the classifier's bias is left
        assert torch.allclose(silenced, model[8].bias.expand(2, 3), atol=1e-6)


def test_materialize_cut_uses_a_copying_pass_through():
    model = RepNet().eval()
    with attach(model, example=torch.randn(1, 3, 8, 8)) as hooks:
        sub = _sub(hooks, closed=("b1.scale",))
    small, _ = materialize(sub, copy.deepcopy(model), torch.randn(2, 3, 8, 8))
    assert type(small.b1.scale).__name__ == "PassThrough"
