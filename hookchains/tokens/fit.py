"""Fit per-image token scores of a ViT (paper section 4.5, Eq. 8 with the L1 term on token scores), or
per-sentence token scores of a text objective around a BERT-like encoder (:mod:`hookchains.tokens.encoder`).

The optimisation is :func:`hookchains.core.fit.optimise`, the filter fit's loop (one stop rule, one
KL-weight rule, one progress bar): the hooks are :class:`TokenScores` (:class:`~hookchains.tokens.hooks.TokenChains`
with the loop's view: one task, the mean kept token slots per image as its count), the recipes
:class:`TokenSte` and :class:`TokenPaper` (the filter recipes with the L1 term on token scores), the
result a :class:`~hookchains.tokens.result.TokenSubnetwork`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hookchains.core.fit import Fidelities, FitConfig, KLTerm, chunks, fidelity_per_task, optimise
from hookchains.core.metrics import fidelity
from hookchains.core.recipes import Paper, Recipe, Ste, recipe_named
from hookchains.core.state import eval_mode, frozen_weights, seeded
from hookchains.inputs.data import validate_images
from hookchains.inputs.forward import call, count, map_tensors, validate_inputs
from hookchains.tokens.hooks import TokenChains, check_token_model, is_text_model
from hookchains.tokens.result import TokenSubnetwork

__all__ = ["fit_tokens", "TOKEN_DEFAULTS", "TokenScores", "TokenSte", "TokenPaper", "token_recipe", "rows_of"]

# Defaults of fit_tokens. lr 0.05: a score needs ~18 Adam steps to fall from 1 to tau = 0.1, so pruning
# starts early (with the paper's 0.005 it would take ~180). lam: the paper's 0.005, on the per-image L1
# so it does not depend on the number of images. lam_gate is unused for tokens. Checked only on random
# weights (mechanics, timing) and on a toy ViT trained on scikit-learn digits (module doc,
# benchmarks/token_stop.py); no real ImageNet ViT weights were available, so these are not tuned for
# fidelity on DeiT. Stop rule (recipe ste): the core's, on the mean kept slots per image.
TOKEN_DEFAULTS = FitConfig(steps=150, lr=0.05, lam=0.005, lam_gate=0.0, kl_target=0.1, kl_rate=0.05,
                           patience=20, min_steps=30, kl_tol=0.1, loss_tol=0.05)


class TokenScores(TokenChains):
    """:class:`~hookchains.tokens.hooks.TokenChains` as :func:`hookchains.core.fit.optimise` sees them:
    one task, whose kept count is ``slots``, the mean kept token slots per image.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_vit", img_size=32).eval()      # 6 blocks x 5 tokens
        >>> with TokenScores(model, 2, example=torch.randn(1, 3, 32, 32)) as scores:
        ...     scores.kept_counts()
        {'slots': 30.0}
    """

    task_count = 1

    def per_task(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` with a leading task axis (one task)."""
        return values.unsqueeze(0)

    def kept_counts(self, task: int = 0) -> Dict[str, float]:
        """``{"slots": mean kept token slots per image}`` right now (what the progress bar shows)."""
        return {"slots": float(self.kept().sum((1, 2)).float().mean())}


class TokenRecipe(Recipe):
    """What a token fit changes in a filter recipe: the scores are one ``N x blocks x T`` tensor in
    ``[0, 1]`` (no gates), the cost ``lam * mean_n ||s_n||_1``, the stop rule's count ``slots``."""

    counted = "slots"

    def reset(self, chains, cfg) -> List[Dict[str, Any]]:
        with torch.no_grad():
            chains.scores.fill_(1.0)
        return [{"params": [chains.scores]}]

    def penalty(self, chains, cfg) -> torch.Tensor:
        return (cfg.lam * chains.l1()).reshape(1)

    def project(self, chains, cfg) -> None:
        chains.clamp_()


@dataclasses.dataclass
class TokenSte(TokenRecipe, Ste):
    """Recipe ``ste`` for tokens: the ``hard`` forward with straight-through gradients (pruned tokens get
    the gradient of re-admitting them), the adaptive KL weight and the core's stop rule."""


@dataclasses.dataclass
class TokenPaper(TokenRecipe, Paper):
    """Recipe ``paper`` for tokens: the ``soft`` network, a fixed KL weight, stop when the loss changes by
    less than ``loss_tol`` between steps."""


def token_recipe(recipe) -> Recipe:
    """The token recipe for a :class:`~hookchains.core.fit.FitConfig` ``recipe`` (``None``/``"ste"``:
    :class:`TokenSte`; ``"paper"``: :class:`TokenPaper`). Raises ``ValueError`` for the filter-only recipes.

    Example:
        >>> type(token_recipe("paper")).__name__
        'TokenPaper'
    """
    chosen = recipe_named(recipe)
    if type(chosen) not in (Ste, Paper):
        raise ValueError(f"token scores are fitted with recipe 'ste' (default) or 'paper', not {chosen.name!r}: "
                         "the mask and l0 recipes are for filters")
    return TokenPaper() if isinstance(chosen, Paper) else TokenSte()


def rows_of(inputs, part):
    """The rows ``part`` (a slice or indices) of ``inputs`` (images, or a dict of token ids and mask)."""
    return map_tensors(lambda t: t[part], inputs)


def _kl_backward(chains: TokenChains, images, teacher_logp: torch.Tensor,
                 parts: Sequence[slice], weight: float) -> Tuple[float, float]:
    """Mean KL and top-1 agreement over the images; backpropagates ``weight * KL`` chunk by chunk
    (each with its rows)."""
    total, agreeing = 0.0, 0
    for part in parts:
        with chains.select(part):
            logq = F.log_softmax(call(chains.model, rows_of(images, part)).float(), -1)
        kl = F.kl_div(logq, teacher_logp[part], log_target=True, reduction="sum") / count(images)
        (weight * kl).backward()
        total += float(kl.detach())
        agreeing += int((logq.argmax(-1) == teacher_logp[part].argmax(-1)).sum())
    return total, agreeing / count(images)


@torch.no_grad()
def _logits(chains: TokenChains, images, masking: str, batch_size: Optional[int]) -> torch.Tensor:
    outs = []
    with chains.using(masking):
        for part in chunks(count(images), batch_size):
            with chains.select(part):
                outs.append(call(chains.model, rows_of(images, part)).float())
    return torch.cat(outs)


def _kl_term(chains: TokenChains, images, teacher_logp: torch.Tensor, batch_size: Optional[int]) -> KLTerm:
    parts = chunks(count(images), batch_size)

    def backward(weights: torch.Tensor) -> Fidelities:
        kl, agreement = _kl_backward(chains, images, teacher_logp, parts, float(weights[0]))
        return [kl], [agreement]
    return KLTerm(backward,
                  lambda: fidelity_per_task(_logits(chains, images, "hard", batch_size)[None], teacher_logp[None]))


def fit_tokens(model: nn.Module, images, *, steps: Optional[int] = None, lr: Optional[float] = None,
               lam: Optional[float] = None, tau: float = 0.1, seed: Optional[int] = None,
               progress: Optional[bool] = None, config: Optional[FitConfig] = None, **options) -> TokenSubnetwork:
    """Learn per-image token scores so the thresholded ViT keeps the model's outputs (Eq. 8, section 4.5).

    Model weights are frozen for the duration (``requires_grad_(False)``, restored afterwards) and the
    model runs in eval mode; teacher logits are computed once; every hook is removed at the end.

    Args:
        model: a timm ViT/DeiT with class-token pooling, or a text objective around a BERT-like encoder
            (see :func:`check_token_model`).
        images: ``N x 3 x H x W``, preprocessed for the model; score row ``n`` belongs to image ``n``.
            For a text model, a dict of ``input_ids`` and ``attention_mask`` (``N x L``): row ``n`` is
            sentence ``n``, and its padded positions are never kept nor counted.
        steps, lr, lam, seed, progress: override :data:`TOKEN_DEFAULTS` (``None``: keep the default).
        tau: keep threshold on the presence ``min_{j<=i} s``.
        config: a :class:`~hookchains.core.fit.FitConfig` to start from instead of :data:`TOKEN_DEFAULTS`.
        **options: any other ``FitConfig`` field (``recipe``, ``kl_target``, ``patience``, ``batch_size``...).
            Recipe ``ste`` (default) trains in masking ``ste`` (the ``hard`` forward; pruned tokens
            get the gradient of re-admitting them) in :func:`hookchains.core.fit.optimise`, the filter
            fit's loop: adaptive KL weight, and a stop once the mean kept slots per image moved by at
            most ``size_tol`` over ``patience`` steps with the ``hard`` network's KL within ``kl_tol``;
            ``paper`` trains the ``soft`` network with a fixed weight and stops when the loss changes
            by < ``loss_tol`` between steps.

    Returns:
        a :class:`TokenSubnetwork` whose fidelity is measured on the ``hard`` network.

    Example:
        >>> import timm, torch
        >>> images = torch.randn(2, 3, 64, 64)
        >>> result = fit_tokens(timm.create_model("test_vit", img_size=64).eval(), images, steps=2, progress=False)
        >>> result.counts()["slots_total"]          # 6 blocks x 17 tokens (deit_small: 12 x 197 = 2364)
        102
    """
    text = is_text_model(model)
    if text and not (isinstance(images, dict) and "attention_mask" in images):
        raise ValueError("token scores of a text model need a dict of input_ids and attention_mask "
                         "(hookchains.inputs.text.tokenize makes one)")
    check_inputs = validate_inputs if text else validate_images
    check_inputs(images)
    check_token_model(model)
    given: Dict[str, Any] = {"steps": steps, "lr": lr, "lam": lam, "seed": seed, "progress": progress}
    cfg = dataclasses.replace(config or TOKEN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}, **options)
    recipe = token_recipe(cfg.recipe)
    device = next(model.parameters()).device
    images = map_tensors(lambda t: t.to(device), images)
    valid = images["attention_mask"].bool() if text else None
    with seeded(cfg.seed, device), eval_mode(model), frozen_weights(model), \
            TokenScores(model, count(images), tau=tau, example=rows_of(images, slice(0, 1)), valid=valid) as chains:
        teacher = _logits(chains, images, "off", cfg.batch_size)
        track = optimise(chains, recipe, _kl_term(chains, images, F.log_softmax(teacher, -1), cfg.batch_size), cfg,
                         desc="fit tokens")[0]
        student = _logits(chains, images, "hard", cfg.batch_size)
    scores = chains.scores.detach().cpu().clone()
    scores[..., :chains.prefix] = 1.0  # prefix scores never change; stored as 1 for readability
    if valid is not None:
        scores *= valid.cpu()[:, None, :]  # padded positions: 0, never kept
    if any(math.isnan(v) for v in track.history["loss"]):
        raise FloatingPointError("the loss became NaN while fitting token scores; lower lr or check the images")
    config_out = {**dataclasses.asdict(cfg), "tau": tau, "steps_run": len(track.history["loss"]),
                  **track.ending(cfg, recipe.counted)}
    return TokenSubnetwork(scores, chains.sites, tau, fidelity(teacher, student), config_out, track.history,
                           valid=None if valid is None else valid.cpu())
