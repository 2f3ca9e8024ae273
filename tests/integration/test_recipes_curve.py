"""Fit recipes, how a fit ends, and sub-networks selected at any size from one fit (digits net)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import hookchains
from hookchains.core.fit import logits_of
from hookchains.core.materialize import materialize
from hookchains.core.recipes import HardConcrete, Mask, Ste, recipe_named
from hookchains.evaluation.curve import area, measure, plot, ranking, select, select_kl, size_fidelity
from hookchains.evaluation.sandbox import sandbox

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"lr": 0.02, "lam": 0.01, "progress": False}


@pytest.fixture(scope="module")
def fitted(digits_net, digits_task):
    """A default-recipe fit of the digits task, its model and hooks (kept attached for the module)."""
    images, _ = digits_task
    model = copy.deepcopy(digits_net)
    chains = hookchains.attach(model, example=images[:1])
    result = hookchains.fit(chains, images, recipe=Mask(m_max=None), **FAST)
    yield chains, images, result
    chains.detach()


def test_recipe_names_alias_and_errors():
    assert isinstance(recipe_named("mask"), Mask) and isinstance(recipe_named("l0"), HardConcrete)
    with pytest.warns(DeprecationWarning, match="'ste'"):
        assert isinstance(recipe_named("hookchains"), Ste)
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipe_named("magic")
    with pytest.raises(ValueError, match="m_max must be >= 1"):
        Mask(m_max=0.5)


def test_converged_fit_ends_early_and_says_so(fitted, tmp_path):
    chains, images, result = fitted
    assert result.config["ended"] == "converged", result.summary()
    assert result.config["steps_run"] < 300
    assert result.fidelity["kl"] <= result.config["kl_tol"]  # the stop was confirmed on the final network
    assert "step limit" not in result.summary()
    result.save(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "subnetwork.json").read_text())
    assert saved["config"]["ended"] == "converged" and saved["config"]["recipe"] == "mask"


def test_step_limit_ending_is_reported_with_the_trend(digits_net, digits_task, tmp_path):
    images, _ = digits_task
    with hookchains.attach(copy.deepcopy(digits_net), example=images[:1]) as chains:
        result = hookchains.fit(chains, images, steps=40, **{**FAST, "lr": 0.05})
    history = result.history["filters"]
    expected = 100.0 * (history[-1] - history[-31]) / history[-31] * 10 / 30
    assert result.config["ended"] == "step_limit" and result.config["steps_run"] == 40
    assert result.config["recipe"] == "ste" and result.config["recipe_options"] == {"m_max": None}  # the default
    assert result.config["kept_change_per_10_steps"] == pytest.approx(expected, abs=1e-3)
    assert expected < 0  # the fit was still shrinking the network
    assert f"stopped at the step limit, kept filters still falling {abs(expected):.1f} % per 10 steps" \
        in result.summary()
    result.save(tmp_path / "run")
    assert "stopped at the step limit" in json.loads((tmp_path / "run" / "subnetwork.json").read_text())["summary"]


def test_mask_recipe_scores_are_magnitudes_of_kept_filters(fitted):
    chains, images, result = fitted
    kept = result.kept_filters()
    for name, s in result.scores.items():
        logits = result.importance[name]
        assert torch.equal(s >= result.tau, logits >= 0)  # kept exactly where the mask is on
    assert sum(len(v) for v in kept.values()) == result.counts()["filters_kept"]
    assert measure(chains, images, result)["kl"] == pytest.approx(result.fidelity["kl"], abs=1e-6)


def test_fit_restores_the_global_rng(digits_net, digits_task):
    images, _ = digits_task
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with hookchains.attach(copy.deepcopy(digits_net), example=images[:1]) as chains:
        hookchains.fit(chains, images, steps=3, recipe="l0", **FAST)
    assert torch.equal(torch.rand(3), expected)


def test_selection_at_the_fitted_size_is_the_fit(fitted):
    chains, images, result = fitted
    same = select(result, result.counts()["filters_kept"])
    assert same.kept_filters() == result.kept_filters()
    assert measure(chains, images, same)["kl"] == pytest.approx(result.fidelity["kl"], abs=1e-6)
    smaller = select(result, 5)
    assert smaller.counts()["filters_kept"] == 5
    assert set(ranking(result)[:5]) == {(n, i) for n, idx in smaller.kept_filters().items() for i in idx}
    with pytest.raises(ValueError, match="filters must be between 1 and"):
        select(result, 10_000)


def test_a_selection_materialises_exactly(fitted):
    chains, images, result = fitted
    sub = select(result, max(result.counts()["filters_kept"] // 2, 4))
    small, report = materialize(sub, chains.model, images)
    with torch.no_grad():
        sub_logits = small(images)
    with sandbox(chains, sub):
        thresholded = logits_of(chains, images, "hard")
    assert report.max_abs_diff <= report.tolerance
    assert torch.allclose(sub_logits, thresholded, atol=1e-4, rtol=1e-4)


def test_select_kl_is_the_smallest_within_tolerance(fitted):
    chains, images, result = fitted
    tolerance = result.fidelity["kl"] + 0.05
    best = select_kl(chains, images, result, tolerance)
    n = best.counts()["filters_kept"]
    assert best.fidelity["kl"] <= tolerance
    assert n == 1 or measure(chains, images, select(result, n - 1))["kl"] > tolerance
    with pytest.raises(ValueError, match="raise the tolerance"):
        select_kl(chains, images, result, -1.0)


def test_size_fidelity_curve_with_baselines_and_plot(fitted, tmp_path):
    chains, images, result = fitted
    curve = size_fidelity(chains, images, result, points=5)
    assert curve["sizes"][0] == len(result.sites.filters) and len(curve["sizes"]) == 5
    for name in ("neurochains", "magnitude", "random"):
        assert curve["area"][name] == pytest.approx(area(curve["sizes"], curve["kl"][name], curve["total"]))
    assert curve["area"]["neurochains"] < curve["area"]["random"]
    path = plot({name: {"sizes": curve["sizes"], "total": curve["total"], "kl": kls}
                 for name, kls in curve["kl"].items()}, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_area_is_the_mean_kl_over_log_size():
    assert area([1, 10, 100], [2.0, 1.0, 0.0], 100) == pytest.approx(1.0)
    assert area([10, 100], [0.5, 0.5], 1000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two different sizes"):
        area([10], [0.5], 100)


def test_token_fit_refuses_the_filter_recipes():
    import timm
    model = timm.create_model("test_vit", pretrained=False).eval()
    images = torch.zeros(2, *model.pretrained_cfg["input_size"])
    with pytest.raises(ValueError, match="mask and l0 recipes are for filters"):
        hookchains.fit_tokens(model, images, steps=1, progress=False, recipe="mask")


def test_networks_before_min_steps_are_never_returned(digits_net, digits_task):
    """The same short fit with the default min_steps (50, more than its 40 steps): its only feasible
    networks are the unpruned start, so it returns its last network and says the KL is above kl_tol."""
    images, _ = digits_task
    with hookchains.attach(copy.deepcopy(digits_net), example=images[:1]) as chains:
        result = hookchains.fit(chains, images, steps=40, **{**FAST, "lr": 0.05})
    h, tol = result.history, result.config["kl_tol"]
    assert any(k <= tol for k in h["kl"][:8]) and result.config["min_steps"] == 50  # a feasible start existed
    assert result.config["returned_step"] is None and result.counts()["filters_kept"] == h["filters"][-1]
    assert f"above kl_tol {tol:g}" in result.summary() and "returned the network" not in result.summary()
