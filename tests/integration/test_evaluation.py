"""Evaluation of a fitted sub-network: faithfulness (Fig. 2, 11), robustness (Fig. 12), baselines (Fig. 3)."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import hookchains
from hookchains.core.fit import logits_of
from hookchains.core.metrics import accuracy, kl_per_image, quotient, spearman
from hookchains.evaluation.baselines import baseline, featuremap_norms
from hookchains.evaluation.faithfulness import Faithfulness, faithfulness
from hookchains.evaluation.robustness import fgsm, pgd, robustness


@pytest.fixture(scope="module")
def fitted(one_thread, digits_net, digits_task):
    """A NeuroChains fit on the trained digits net (the set-up of test_attach_fit), hooks left on."""
    images, labels = digits_task
    model = copy.deepcopy(digits_net)
    chains = hookchains.attach(model, example=images[:1])
    sub = hookchains.fit(chains, images, steps=200, lr=0.02, lam=0.01, progress=False)
    weights = copy.deepcopy(model.state_dict())
    yield chains, sub, images, labels
    chains.detach()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()), "weights changed"


def _snapshot(chains):
    """Scores/gates, their gradients and the weights' requires_grad flags, to compare after a call."""
    return ([p.detach().clone() for p in chains.parameters()],
            [None if p.grad is None else p.grad.clone() for p in chains.parameters()],
            [p.requires_grad for p in chains.model.parameters()])


def _assert_untouched(chains, snapshot):
    values, grads, flags = snapshot
    assert all(torch.equal(p, v) for p, v in zip(chains.parameters(), values)), "chains' scores changed"
    assert all((g is None and p.grad is None) or torch.equal(p.grad, g)
               for p, g in zip(chains.parameters(), grads)), "chains' gradients changed"
    assert [p.requires_grad for p in chains.model.parameters()] == flags
    assert all(p.grad is None for p in chains.model.parameters()), "a weight received a gradient"


def _restore(chains, snapshot):
    values = snapshot[0]
    chains.load_state(dict(zip(chains.scores, values)), dict(zip(chains.gate_logits, values[len(chains.scores):])))


def _original(chains):
    """The original model (hooks off) as a differentiable forward function."""
    def forward(x):
        with chains.using("off"):
            return chains.model(x)
    return forward


def _hard_logits(chains, sub, images, zero=None):
    """The thresholded network's logits by hand, optionally with filter ``zero = (site, index)`` removed."""
    chains.load_state(sub.scores, sub.gate_logits)
    if zero is not None:
        with torch.no_grad():
            chains.scores[zero[0]][zero[1]] = 0.0
    return logits_of(chains, images, "hard")


# ---------------------------------------------------------------------------------------- metrics
def test_spearman_and_accuracy_by_hand():
    # ranks of y with a tie: [0, 1.5, 1.5, 3]; centred x ranks [-1.5, -.5, .5, 1.5], y [-1.5, 0, 0, 1.5]
    assert spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(4.5 / math.sqrt(5 * 4.5), abs=1e-12)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), [1, 8, 27]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([3, 1, 2], [1, 3, 2]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    assert math.isnan(spearman([1], [2])) and math.isnan(spearman([], []))
    assert math.isnan(spearman([1, 2, float("nan")], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1, 2, 3])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 2])) == 0.5


# ----------------------------------------------------------------------------------- faithfulness
def _class_prob(logits, classes):
    return F.softmax(logits, -1).gather(-1, classes[:, None]).squeeze(-1)


def test_faithfulness_lists_align_and_one_removal_reproduces_by_hand(fitted):
    chains, sub, images, _ = fitted
    snapshot = _snapshot(chains)
    result = faithfulness(chains, sub, images)
    _assert_untouched(chains, snapshot)
    kept = [(name, i) for name, indices in sub.kept_filters().items() for i in indices]
    assert result.filters == [f"{sub.sites.filter(n).label}_{i}" for n, i in kept]
    assert result.scores == [float(sub.scores[n][i]) for n, i in kept]
    assert len(result.degradation) == len(result.negative_share) == len(kept)
    assert result.spearman == spearman(result.scores, result.degradation)
    assert max(result.degradation) > 0.05  # some kept filter matters
    worst = max(range(len(kept)), key=result.degradation.__getitem__)
    name, index = kept[worst]
    teacher = logits_of(chains, images, "off")
    base, removed = _hard_logits(chains, sub, images), _hard_logits(chains, sub, images, (name, index))
    _restore(chains, snapshot)
    predicted = teacher.argmax(-1)
    drop = _class_prob(base, predicted) - _class_prob(removed, predicted)
    assert result.degradation[worst] == float(drop.mean())  # exactly what faithfulness() reported
    assert result.negative_share[worst] == float((quotient(teacher, removed) < 0).float().mean())
    assert set(json.loads(json.dumps(result.to_json()))) == {
        "spearman", "spearman_negative", "spearman_untied", "untied", "spearman_taylor", "filters", "scores",
        "degradation", "negative_share", "taylor"}
    untied = [(s, d) for s, d in zip(result.scores, result.degradation) if s < max(result.scores)]
    assert result.untied == len(untied)
    assert result.spearman_untied == spearman(*zip(*untied)) if untied else math.isnan(result.spearman_untied)
    assert result.spearman_taylor == spearman(result.taylor, result.degradation)
    some = set(kept[::3])  # a subset (what the report measures): the same values, in the same order
    subset = faithfulness(chains, sub, images, filters=some)
    picked = [k for k, key in enumerate(kept) if key in some]
    assert subset.filters == [result.filters[k] for k in picked]
    assert subset.degradation == [result.degradation[k] for k in picked]
    assert subset.taylor == [result.taylor[k] for k in picked]


def test_faithfulness_json_is_nan_free_and_state_survives_errors(fitted):
    chains, sub, images, _ = fitted
    undefined = Faithfulness(["L_0"], [1.0], [0.2], [0.0], float("nan"), float("nan"))
    assert undefined.to_json()["spearman"] is None and undefined.to_json()["spearman_negative"] is None
    snapshot = _snapshot(chains)
    with pytest.raises(RuntimeError):
        faithfulness(chains, sub, images.repeat(1, 3, 1, 1))  # 3 channels into a 1-channel conv
    with pytest.raises(ValueError, match="not these chains' sites"):
        faithfulness(chains, dataclasses.replace(sub, scores={}), images)
    _assert_untouched(chains, snapshot)


# ------------------------------------------------------------------------------------- robustness
def test_fgsm_and_pgd_attack_the_original_within_the_eps_ball(fitted):
    chains, _, images, labels = fitted
    snapshot = _snapshot(chains)
    eps, original = 0.3, _original(chains)
    with torch.no_grad():
        clean = _class_prob(original(images), labels).mean()
    x_fgsm, x_pgd = fgsm(original, images, labels, eps), pgd(original, images, labels, eps, steps=10)
    assert (x_fgsm - images).abs().max() <= eps + 1e-6 and (x_pgd - images).abs().max() <= eps + 1e-6
    assert (x_fgsm - images).abs().max() >= eps - 1e-6  # FGSM moves to the border of the ball
    with torch.no_grad():
        p_fgsm, p_pgd = _class_prob(original(x_fgsm), labels).mean(), _class_prob(original(x_pgd), labels).mean()
    assert p_fgsm < clean - 0.2, (float(clean), float(p_fgsm))
    assert p_pgd <= p_fgsm + 1e-6, (float(p_fgsm), float(p_pgd))
    assert torch.equal(x_pgd, pgd(original, images, labels, eps, steps=10))  # seeded
    assert not torch.equal(x_pgd, pgd(original, images, labels, eps, steps=10, seed=1))
    with pytest.raises(ValueError, match="eps"):
        fgsm(original, images, labels, -0.1)
    _assert_untouched(chains, snapshot)


def test_robustness_report_matches_hand_evaluation(fitted):
    chains, sub, images, labels = fitted
    snapshot = _snapshot(chains)
    report = robustness(chains, sub, images, labels, eps=0.3, pgd_steps=5)
    _assert_untouched(chains, snapshot)
    assert report["eps"] == 0.3 and report["pgd_steps"] == 5
    assert set(report["original"]) == set(report["subnetwork"]) == {"clean", "fgsm", "pgd"}
    assert set(report["transfer"]) == {"fgsm", "pgd"}
    assert all(len(v) == len(images) for part in ("original", "subnetwork", "transfer")
               for v in report[part].values())
    mean = {k: sum(v) / len(v) for k, v in report["original"].items()}
    assert mean["pgd"] < mean["clean"] - 0.2, report["original"]
    clean = _class_prob(logits_of(chains, images, "off"), labels)
    assert report["original"]["clean"] == pytest.approx(clean.tolist(), abs=1e-6)
    on_sub = _class_prob(_hard_logits(chains, sub, fgsm(_original(chains), images, labels, 0.3)), labels)
    sub_clean = _class_prob(_hard_logits(chains, sub, images), labels)
    _restore(chains, snapshot)
    assert report["transfer"]["fgsm"] == pytest.approx(on_sub.tolist(), abs=1e-6)
    assert report["subnetwork"]["clean"] == pytest.approx(sub_clean.tolist(), abs=1e-6)
    # top-1 correctness beside each probability: clean by hand; a probability > 0.5 is always the top-1
    correct = report["correct"]
    assert set(correct) == {"original", "subnetwork", "transfer"} and set(correct["transfer"]) == {"fgsm", "pgd"}
    assert correct["original"]["clean"] == (logits_of(chains, images, "off").argmax(-1) == labels).tolist()
    for part in ("original", "subnetwork", "transfer"):
        for attack, probs in report[part].items():
            assert all(c for c, p in zip(correct[part][attack], probs) if p > 0.5)
            assert not any(c for c, p in zip(correct[part][attack], probs) if p < 1 / 10)  # 10 classes
    json.dumps(report)


# -------------------------------------------------------------------------------------- baselines
def _kept_counts(sub):
    kept = sub.kept_filters()
    return [len(kept.get(s.name, [])) for s in sub.sites.filters]


def test_featuremap_norms_by_hand(fitted):
    chains, _, images, _ = fitted
    norms = featuremap_norms(chains, images)
    assert [s.name for s in norms] == [s.name for s in chains.sites.filters]
    with torch.no_grad(), chains.using("off"):
        after_bn = chains.model.features[:2](images)  # site features.0 is scored at features.1 (its BN)
    expected = after_bn.flatten(2).norm(dim=2).mean(0)
    assert torch.allclose(norms[chains.sites.filters[0]], expected, rtol=1e-5, atol=1e-6)


def test_matched_baselines_keep_the_layout_and_magnitude_keeps_top_norms(fitted):
    chains, sub, images, _ = fitted
    snapshot = _snapshot(chains)
    raw = baseline(chains, images, sub, "magnitude", allocation="matched", steps=0)
    tuned = baseline(chains, images, sub, "magnitude", allocation="matched", steps=60, lr=0.05)
    _assert_untouched(chains, snapshot)
    assert _kept_counts(raw) == _kept_counts(tuned) == _kept_counts(sub)
    assert all(torch.equal(raw.gate_logits[k], v) for k, v in sub.gate_logits.items())
    norms = featuremap_norms(chains, images)
    for site, count in zip(sub.sites.filters, _kept_counts(sub)):
        expected = sorted(torch.topk(norms[site], count).indices.tolist()) if count else None
        assert raw.kept_filters().get(site.name) == expected
    assert tuned.kept_filters() == raw.kept_filters()  # fine-tuning cannot change the budget
    for name, s in tuned.scores.items():
        keep = raw.scores[name] > 0
        assert torch.all(s[~keep] == 0) and torch.all((s[keep] >= chains.tau) & (s[keep] <= 1.0))
    assert tuned.fidelity["kl"] <= raw.fidelity["kl"], (raw.fidelity["kl"], tuned.fidelity["kl"])
    assert tuned.config == {"kind": "magnitude", "allocation": "matched", "budget": sum(_kept_counts(sub)),
                            "gates": "as sub-network", "steps": 60, "lr": 0.05, "seed": 0}
    # fidelity is that of the thresholded network: recompute it by hand
    teacher, student = logits_of(chains, images, "off"), _hard_logits(chains, tuned, images)
    _restore(chains, snapshot)
    assert float(kl_per_image(teacher, student).mean()) == pytest.approx(tuned.fidelity["kl"], abs=1e-6)


def test_random_baseline_is_seeded_and_proportional_allocation_keeps_the_budget(fitted):
    chains, sub, images, _ = fitted
    snapshot = _snapshot(chains)
    a, b = (baseline(chains, images, sub, "random", allocation="matched", steps=5, seed=3) for _ in range(2))
    c = baseline(chains, images, sub, "random", allocation="matched", steps=5, seed=4)
    assert all(torch.equal(a.scores[k], b.scores[k]) for k in a.scores) and a.fidelity == b.fidelity
    assert a.kept_filters() != c.kept_filters()
    assert _kept_counts(a) == _kept_counts(sub)
    prop = baseline(chains, images, sub, "magnitude", allocation="proportional", budget=37, steps=0)
    assert _kept_counts(prop) == [6, 6, 13, 12]  # widths 16/16/32/32: quotas 6.17/6.17/12.33/12.33
    assert prop.removed_gates == [] and prop.counts()["filters_kept"] == 37
    default = baseline(chains, images, sub, "random", allocation="proportional", steps=0)
    assert default.counts()["filters_kept"] == sub.counts()["filters_kept"]
    assert min(_kept_counts(default)) >= 1
    with pytest.raises(ValueError, match="budget"):
        baseline(chains, images, sub, "random", allocation="proportional", budget=3, steps=0)
    with pytest.raises(ValueError, match="budget applies"):
        baseline(chains, images, sub, "random", allocation="matched", budget=10, steps=0)
    with pytest.raises(ValueError, match="kind"):
        baseline(chains, images, sub, "largest", steps=0)
    _assert_untouched(chains, snapshot)
