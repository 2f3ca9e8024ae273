"""Per-image token pruning (paper section 4.5) and token attribution (Eq. 10) on timm ViTs.

Random weights throughout: these tests check mechanics and exactness, never fidelity.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import timm
import torch

from hookchains.adapters import discover
from hookchains.core.state import frozen_weights
from hookchains.tokens.attribution import (
    attention_maps,
    class_token_heatmaps,
    kept_patches_figure,
    patch_token_heatmaps,
    rollout,
    token_attribution,
)
from hookchains.tokens.fit import TOKEN_DEFAULTS, fit_tokens
from hookchains.tokens.hooks import TokenChains, check_token_model, token_presence
from hookchains.tokens.materialize import materialize_tokens
from hookchains.tokens.result import TokenSubnetwork

_MODELS = {}


def _vit(name: str, **kwargs) -> torch.nn.Module:
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = timm.create_model(name, **kwargs).eval()
    return _MODELS[key]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _sites(model):
    return discover(model, "vit", example=_images(1)).tokens


def _random_scores(n: int, seed: int, blocks: int = 12, tokens: int = 197, drop: float = 0.12) -> torch.Tensor:
    """Per-image scores: most in [0.2, 1], about ``drop`` of each block's at 0 (pruned from there on)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, blocks, tokens, generator=g) * 0.8 + 0.2
    return torch.where(torch.rand(n, blocks, tokens, generator=g) < drop, torch.zeros(()), scores)


@contextmanager
def _fused(model, flag: bool):
    before = [b.attn.fused_attn for b in model.blocks]
    for b in model.blocks:
        b.attn.fused_attn = flag
    try:
        yield
    finally:
        for b, f in zip(model.blocks, before):
            b.attn.fused_attn = f


def _masked_logits(model, tsub: TokenSubnetwork, images, masking: str) -> torch.Tensor:
    with TokenChains(model, images.shape[0], tau=tsub.tau, sites=tsub.sites) as chains, torch.no_grad():
        chains.load_scores(tsub.scores)
        with chains.using(masking):
            return model(images)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max())


# ---------------------------------------------------------------------- masked == dropped
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_tiny_patch16_224"])
def test_masked_model_equals_the_model_that_drops_the_tokens(name):
    model, images = _vit(name), _images(3)
    tsub = TokenSubnetwork(_random_scores(3, seed=1), _sites(model))
    with torch.no_grad():
        full = model(images)
    results = {}
    for fused in (True, False):
        with _fused(model, fused):
            for masking in ("hard", "mask"):
                dropped = materialize_tokens(tsub, model, images, masking=masking)  # raises unless exact
                with torch.no_grad():
                    results[fused, masking] = (_masked_logits(model, tsub, images, masking), dropped(images))
    for (fused, masking), (masked, dropped_logits) in results.items():
        assert _close(dropped_logits, masked), (fused, masking)
        assert _close(masked, results[True, masking][0]), "fused and manual attention disagree"
        assert not _close(masked, full), "the random masks did not change the outputs"
    lengths = dropped.tokens_per_block()
    assert lengths[:, 0].lt(197).all() and (lengths[:, 1:] <= lengths[:, :-1]).all()
    assert lengths.tolist() == tsub.masks.sum(2).tolist()


def test_dropped_module_takes_a_subset_of_the_fitting_images():
    model, images = _vit("deit_tiny_patch16_224"), _images(3)
    tsub = TokenSubnetwork(_random_scores(3, seed=2), _sites(model))
    dropped = materialize_tokens(tsub, model)
    with torch.no_grad():
        both = dropped(images)
        part = dropped(images[[2, 0]], rows=[2, 0])
    assert torch.allclose(part, both[[2, 0]], atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        dropped(images[:2])


# ---------------------------------------------------------------------- semantics of a pruned token
def test_a_pruned_token_influences_nothing_downstream():
    model, images = _vit("deit_tiny_patch16_224"), _images(2)
    scores = torch.ones(2, 12, 197)
    scores[:, 0, 1:29] = 0.0        # patches 0..27 (top two patch rows) pruned from block 1 on
    scores[:, 6, 100] = 0.0         # token 100 pruned from block 7 on
    tsub = TokenSubnetwork(scores, _sites(model))
    perturbed = images.clone()
    perturbed[:, :, :32, :] += 5.0 * torch.randn(2, 3, 32, 224, generator=torch.Generator().manual_seed(3))

    noise = 10.0 * torch.randn(192, generator=torch.Generator().manual_seed(4))

    def shake_token_100(module, args):
        x = args[0].clone()
        x[:, 100] += noise
        return (x,)
    for fused in (True, False):
        with _fused(model, fused):
            base = _masked_logits(model, tsub, images, "mask")
            assert _close(_masked_logits(model, tsub, perturbed, "mask"), base)
            handle = model.blocks[6].register_forward_pre_hook(shake_token_100)
            try:
                assert _close(_masked_logits(model, tsub, images, "mask"), base)
                with torch.no_grad():
                    shaken_full = model(images)
            finally:
                handle.remove()
            with torch.no_grad():   # controls: without the masks both perturbations do reach the output
                assert not _close(model(perturbed), model(images))
                assert not _close(shaken_full, model(images))


def test_class_token_is_never_pruned():
    model, images = _vit("deit_tiny_patch16_224"), _images(2)
    with TokenChains(model, 2, example=images[:1]) as chains:
        with torch.no_grad():
            chains.scores.zero_()                         # every score 0, the class token's too
        assert chains.kept()[:, :, 0].all() and not chains.kept()[:, :, 1:].any()
        with torch.no_grad(), chains.using("mask"):
            only_class = model(images)
    assert torch.isfinite(only_class).all()
    tsub = TokenSubnetwork(torch.zeros(2, 12, 197), _sites(model))
    assert tsub.masks[:, :, 0].all() and tsub.counts()["slots_kept"] == [12, 12]
    dropped = materialize_tokens(tsub, model, images, masking="mask")
    assert dropped.tokens_per_block().eq(1).all()
    with torch.no_grad():
        assert _close(dropped(images), only_class)


def test_pruning_is_cumulative_over_blocks():
    scores = torch.tensor([[[0.3, 0.9, 1.0], [0.2, 0.05, 1.0], [0.5, 1.0, 0.4], [1.0, 1.0, 0.2]]])
    presence = token_presence(scores, prefix_tokens=1)
    assert torch.equal(presence, torch.tensor([[[1.0, 0.9, 1.0], [1.0, 0.05, 1.0],
                                                 [1.0, 0.05, 0.4], [1.0, 0.05, 0.2]]]))
    model, images = _vit("deit_tiny_patch16_224"), _images(1)
    raw = torch.ones(1, 12, 197)
    raw[0, 2, 50] = 0.0          # token 50 pruned in block 3 ...
    raw[0, 5, 50] = 1.0          # ... stays pruned although block 6 scores it 1
    tsub = TokenSubnetwork(raw, _sites(model))
    assert tsub.masks[0, :2, 50].all() and not tsub.masks[0, 2:, 50].any()
    revived = raw.clone()
    revived[0, 5:, 50] = 0.7
    base = _masked_logits(model, tsub, images, "mask")
    assert torch.equal(_masked_logits(model, TokenSubnetwork(revived, tsub.sites), images, "mask"), base)
    reweighted = raw.clone()
    reweighted[0, 0, 60] = 0.3      # a kept token's weight does matter in the hard network
    assert not _close(_masked_logits(model, TokenSubnetwork(reweighted, tsub.sites), images, "hard"), base)


def test_straight_through_mode_is_the_hard_network_and_can_readmit_tokens():
    model, images = _vit("deit_tiny_patch16_224"), _images(1, seed=4)
    scores = _random_scores(1, seed=5, drop=0.05)
    presence = token_presence(scores, 1)
    pruned = int(torch.nonzero((presence[0, 10] > 0) & (scores[0, 11] == 0))[0])   # pruned only in block 12
    kept = int(torch.nonzero(presence[0, 10] > 0.3)[0])
    scores[0, 11, kept] = 0.15                         # the binding (minimum) score of a kept token
    weights = torch.randn(1000, generator=torch.Generator().manual_seed(6))
    grads = {}
    with frozen_weights(model), TokenChains(model, 1, tau=0.1, sites=_sites(model)) as chains:
        chains.load_scores(scores)
        for masking in ("ste", "hard"):
            with chains.using(masking):
                out = model(images) @ weights
            out.backward()
            grads[masking], chains.scores.grad = chains.scores.grad[0, 11].clone(), None
            grads[masking + "_value"] = out.detach()
    assert all(b.attn.fused_attn for b in model.blocks), "masking ste must restore fused attention"
    assert torch.allclose(grads["ste_value"], grads["hard_value"], rtol=1e-4, atol=1e-4)
    assert grads["hard"][pruned] == 0.0 and grads["ste"][pruned] != 0.0
    for token, value, delta, tau in ((pruned, 0.0, 1e-2, 5e-3), (kept, 0.15, 1e-2, 0.1)):
        moved = scores.clone()
        moved[0, 11, token] = value + delta
        ref = TokenSubnetwork(scores, _sites(model), tau=tau)
        fd = (_masked_logits(model, TokenSubnetwork(moved, ref.sites, tau=tau), images, "hard")
              - _masked_logits(model, ref, images, "hard")) @ weights / delta
        assert abs(float(fd) - float(grads["ste"][token])) <= 0.05 * abs(float(fd)) + 1e-4, token


# ---------------------------------------------------------------------- attribution (Eq. 10)
def test_rollout_matches_a_hand_computed_case():
    a1 = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    a2 = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.5, 0.0, 0.5]])
    attn = torch.stack([a1, a2])[None]
    # Attribution_1 = A1 + I; Attribution_2 = A2 @ Attribution_1 + Attribution_1 (worked out by hand)
    first = torch.tensor([[1.5, 0.25, 0.25], [0.5, 1.5, 0.0], [0.25, 0.25, 1.5]])
    second = torch.tensor([[2.5, 1.125, 0.375], [1.25, 2.6875, 0.0625], [1.125, 0.5, 2.375]])
    assert torch.equal(rollout(attn, normalize=False)[0], torch.stack([first, second]))
    assert torch.equal(rollout(attn)[0], torch.stack([first / 2, second / 4]))
    # token 2 absent from block 2: its column of A2 and its rows are zeroed
    a2_col = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.75, 0.0], [0.5, 0.0, 0.5]])
    keep = torch.tensor([[[True, True, True], [True, True, False]]])
    masked_second = torch.tensor([[2.375, 0.75, 0.375], [1.25, 2.6875, 0.0625], [0.0, 0.0, 0.0]])
    got = rollout(torch.stack([a1, a2_col])[None], keep, normalize=False)[0]
    assert torch.equal(got, torch.stack([first, masked_second]))


def test_captured_attention_is_timms_and_attribution_rows_are_distributions():
    model, images = _vit("deit_tiny_patch16_224"), _images(2, seed=7)
    masks = _random_scores(2, seed=8, drop=0.1) > 0
    keep = token_presence(masks.float(), 1) >= 0.5
    sites = _sites(model)
    maps = {}
    for fused in (True, False):
        with _fused(model, fused):
            maps[fused] = attention_maps(model, images, masks)
    assert torch.allclose(maps[True], maps[False], atol=1e-6)
    caught = []
    handles = [b.attn.attn_drop.register_forward_hook(lambda m, i, o: caught.append(o.mean(1))) for b in model.blocks]
    try:
        with _fused(model, False):
            _masked_logits(model, TokenSubnetwork.from_masks(masks, sites), images, "mask")
    finally:
        for h in handles:
            h.remove()
    timm_probs = torch.stack(caught, 1) * keep[..., None]
    assert torch.allclose(maps[False], timm_probs, atol=1e-7)
    assert maps[False][~keep[:, :, None, :].expand_as(maps[False])].abs().max() == 0   # pruned keys
    attr = token_attribution(model, images, masks)
    sums = attr.sum(-1)
    assert torch.allclose(sums[keep], torch.ones(()), atol=1e-5) and sums[~keep].abs().max() == 0
    raw = token_attribution(model, images, masks, normalize=False)
    assert torch.allclose(raw[:, 3], attr[:, 3] * 16, rtol=1e-5, atol=1e-6)


def test_heatmaps_and_kept_patches_figure():
    model, images = _vit("deit_tiny_patch16_224"), _images(2, seed=9)
    tsub = TokenSubnetwork(_random_scores(2, seed=10, drop=0.15), _sites(model))
    attr = token_attribution(model, images, tsub)
    cls = class_token_heatmaps(model, images, tsub, attribution=attr)
    assert cls.maps.shape == (2, 12, 14, 14) and cls.tokens.tolist() == [0, 0]
    assert torch.equal(cls.maps[1, 4].flatten(), attr[1, 4, 0, 1:])
    patch = patch_token_heatmaps(model, images, tsub, attribution=attr)
    depth = tsub.masks[:, :, 1:].sum(1)
    assert all(depth[n, t - 1] == depth[n].max() for n, t in enumerate(patch.tokens.tolist()))
    assert torch.equal(patch.maps[0, 2].flatten(), attr[0, 2, patch.tokens[0], 1:])
    chosen = patch_token_heatmaps(model, images, tsub, tokens=[5, 9], attribution=attr)
    assert torch.equal(chosen.maps[1, 0].flatten(), attr[1, 0, 9, 1:])
    keep = torch.zeros(2, 197, dtype=torch.bool)
    keep[0, 1:] = True              # block 1: every patch; block 2: only patch 0 (top-left)
    keep[1, 1] = True
    picture = kept_patches_figure(torch.full((3, 224, 224), 0.5), keep, columns=2)
    pixels = torch.from_numpy(np.array(picture)).long()
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 0)
    first, second = red[:, :picture.width // 2], red[:, picture.width // 2:]
    assert picture.size == (2 * 224 + 3 * 4, 224 + 14 + 2 * 4)
    assert first.sum() > 100 * second.sum() > 0


# ---------------------------------------------------------------------- fitting
def test_fit_tokens_mechanics_and_save_load_round_trip(tmp_path):
    model, images = _vit("deit_tiny_patch16_224"), _images(2, seed=11)
    with torch.no_grad():
        before = model(images)
    result = fit_tokens(model, images, steps=6, lr=0.2, progress=False)
    assert sum(len(b._forward_pre_hooks) + len(b.attn.attn_drop._forward_hooks) for b in model.blocks) == 0
    assert all(p.requires_grad for p in model.parameters()) and all(b.attn.fused_attn for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(images), before)
    assert result.scores.shape == (2, 12, 197) and result.scores[..., 0].eq(1).all()
    assert result.scores[..., 1:].ne(1).float().mean() > 0.9, "the patch scores should have moved"
    counts = result.counts()
    assert counts["slots_total"] == 2364 and counts["slots_kept"] == result.masks.sum((1, 2)).tolist()
    assert 12 <= min(counts["slots_kept"]) and max(counts["slots_kept"]) < 2364
    assert len(result.history["kl"]) == result.config["steps_run"] == 6
    assert set(result.fidelity) >= {"kl", "agree", "quotient_mean"} and result.fidelity["images"] == 2
    again = fit_tokens(model, images, steps=6, lr=0.2, progress=False)
    assert torch.equal(again.scores, result.scores), "seeded fits must be deterministic"
    loaded = TokenSubnetwork.load(result.save(tmp_path / "run"))
    assert torch.equal(loaded.scores, result.scores) and torch.equal(loaded.masks, result.masks)
    assert (loaded.fidelity, loaded.config, loaded.history, loaded.sites, loaded.tau) == \
        (result.fidelity, result.config, result.history, result.sites, result.tau)
    materialize_tokens(loaded, model, images)


def test_token_fit_runs_the_filter_fits_loop_stop_rule_and_kl_weight():
    """The stop step and the KL weights, recomputed from the history with the core's rules (module doc
    of hookchains.core.fit): kept slots within size_tol over patience steps, KL within kl_tol and top-1
    agreement at least min_agreement, not before travel / lr + patience steps; dual ascent of the KL
    weight toward kl_target, at the largest step while agreement is below min_agreement."""
    model, images = _vit("test_vit", img_size=32, num_classes=10), _images(4, seed=3)[:, :, :32, :32]
    result, cfg = fit_tokens(model, images, progress=False), TOKEN_DEFAULTS
    slots, kl, weight = result.history["slots"], result.history["kl"], result.history["kl_weight"]
    agreement = result.history["agreement"]
    earliest = max(cfg.min_steps, math.ceil((1 - result.tau) / cfg.lr) + cfg.patience)
    first = next(t for t in range(earliest, len(slots) + 1) if kl[t - 1] <= cfg.kl_tol and
                 agreement[t - 1] >= cfg.min_agreement and
                 abs(slots[t - 1] - slots[t - 1 - cfg.patience]) <= cfg.size_tol * slots[t - 1 - cfg.patience])
    assert (result.config["ended"], result.config["steps_run"]) == ("converged", first) and first < cfg.steps
    expected = [1.0]
    for value, share in zip(kl[:-1], agreement[:-1]):
        step = max(-1.0, min(1.0, value / cfg.kl_target - 1.0)) if share >= cfg.min_agreement else 1.0
        expected.append(min(1e4, max(1.0, expected[-1] * math.exp(cfg.kl_rate * step))))
    assert weight == pytest.approx(expected, rel=1e-12)
    assert slots[-1] == result.counts()["slots_kept_mean"]


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a timm ViT"):
        check_token_model(timm.create_model("resnet18"))
    with pytest.raises(ValueError, match="global_pool='avg'"):
        fit_tokens(_vit("vit_tiny_patch16_224", global_pool="avg"), _images(1))
    model = _vit("deit_tiny_patch16_224")
    with TokenChains(model, 2, example=_images(1)) as chains, chains.using("mask"):
        with pytest.raises(ValueError, match="2 images x 197 tokens"):
            model(_images(3))
    with pytest.raises(ValueError, match="bool tensor"):
        token_attribution(model, _images(1), torch.ones(1, 12, 197))
    with pytest.raises(FileNotFoundError, match="tokens.json"):
        TokenSubnetwork.load(tmp_path)
    first = TokenSubnetwork(_random_scores(1, seed=12), _sites(model)).save(tmp_path / "a")
    other = TokenSubnetwork(_random_scores(1, seed=13), _sites(model)).save(tmp_path / "b")
    (first / "token_scores.safetensors").write_bytes((other / "token_scores.safetensors").read_bytes())
    with pytest.raises(ValueError, match="mixed up"):
        TokenSubnetwork.load(first)
