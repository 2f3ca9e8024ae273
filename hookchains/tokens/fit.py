"""Fit per-image token scores of a ViT (paper section 4.5, Eq. 8 with the L1 term on token scores), or
per-sentence token scores of a text objective around a BERT-like encoder (:mod:`hookchains.tokens.encoder`).

The optimisation reuses :mod:`hookchains.core.fit`'s pieces (chunks, KL weight, stop rule); the hooks
are :class:`~hookchains.tokens.hooks.TokenChains`, the result a
:class:`~hookchains.tokens.result.TokenSubnetwork`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hookchains.core.fit import FitConfig, chunks, next_kl_weight, stopped
from hookchains.core.metrics import fidelity
from hookchains.core.state import eval_mode, frozen_weights, seeded
from hookchains.inputs.data import validate_images
from hookchains.inputs.forward import call, count, map_tensors, validate_inputs
from hookchains.tokens.hooks import TokenChains, check_token_model, is_text_model
from hookchains.tokens.result import TokenSubnetwork

__all__ = ["fit_tokens", "TOKEN_DEFAULTS", "STABLE_FLIPS"]

# Defaults of fit_tokens. lr 0.05: a score needs ~18 Adam steps to fall from 1 to tau = 0.1, so pruning
# starts early (with the paper's 0.005 it would take ~180). lam: the paper's 0.005, on the per-image L1
# so it does not depend on the number of images. lam_gate is unused for tokens. Checked only on random
# weights (mechanics, timing) and on a toy ViT trained on scikit-learn digits (module doc); no real
# ImageNet ViT weights were available, so these are not tuned for fidelity on DeiT.
TOKEN_DEFAULTS = FitConfig(steps=150, lr=0.05, lam=0.005, lam_gate=0.0, kl_target=0.1, kl_rate=0.05,
                           patience=20, min_steps=30, kl_tol=0.1, loss_tol=0.05)
# Recipe "hookchains" stops once the kept set is stable for `patience` steps (and loss and KL settled,
# as in hookchains.core.fit). With tens of thousands of per-image slots, a few slots always flicker at the
# threshold, so "stable" means at most this fraction of slots changed since the previous step.
STABLE_FLIPS = 0.01



def rows_of(inputs, part):
    """The rows ``part`` (a slice or indices) of ``inputs`` (images, or a dict of token ids and mask)."""
    return map_tensors(lambda t: t[part], inputs)


def _kl_backward(chains: TokenChains, images, teacher_logp: torch.Tensor,
                 parts: Sequence[slice], weight: float) -> float:
    """Mean KL over the images; backpropagates ``weight * KL`` chunk by chunk (each with its rows)."""
    total = 0.0
    for part in parts:
        with chains.select(part):
            logq = F.log_softmax(call(chains.model, rows_of(images, part)).float(), -1)
        kl = F.kl_div(logq, teacher_logp[part], log_target=True, reduction="sum") / count(images)
        (weight * kl).backward()
        total += float(kl.detach())
    return total


@torch.no_grad()
def _logits(chains: TokenChains, images, mode: str, batch_size: Optional[int]) -> torch.Tensor:
    outs = []
    with chains.using(mode):
        for part in chunks(count(images), batch_size):
            with chains.select(part):
                outs.append(call(chains.model, rows_of(images, part)).float())
    return torch.cat(outs)


def _optimise(chains: TokenChains, images, teacher_logp: torch.Tensor,
              cfg: FitConfig) -> Dict[str, List[float]]:
    """Adam on the token scores; recipe ``hookchains``: mode ``ste``, adaptive KL weight, stable stop."""
    parts = chunks(count(images), cfg.batch_size)
    optimiser = torch.optim.Adam([chains.scores], lr=cfg.lr)
    history: Dict[str, List[float]] = {"loss": [], "kl": [], "slots": [], "kl_weight": []}
    weight, stable_for, last = 1.0, 0, None
    bar = tqdm(range(cfg.steps), desc="fit tokens", disable=not cfg.progress, leave=False)
    with chains.using("soft" if cfg.recipe == "paper" else "ste"):  # recipe None: ste
        for _ in bar:
            optimiser.zero_grad(set_to_none=True)
            kl = _kl_backward(chains, images, teacher_logp, parts, weight)
            penalty = cfg.lam * chains.l1()
            penalty.backward()
            optimiser.step()
            chains.clamp_()
            kept = chains.kept()
            slots = float(kept.sum((1, 2)).float().mean())
            figures = {"loss": kl + float(penalty.detach()), "kl": kl, "slots": slots, "kl_weight": weight}
            for key, value in figures.items():
                history[key].append(value)
            weight = next_kl_weight(weight, kl, cfg)
            settled = last is not None and int((kept != last).sum()) <= STABLE_FLIPS * kept.numel()
            stable_for, last = (stable_for + 1 if settled else 0), kept
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", kl=f"{kl:.3f}", slots=f"{slots:.0f}")
            if stopped(cfg, history, stable_for):
                break
    bar.close()
    return history


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
            Recipe ``hookchains`` (default) trains in mode ``ste`` (the ``hard`` forward; pruned tokens
            get the gradient of re-admitting them) with the adaptive KL weight of :mod:`hookchains.core.fit`
            and stops once at most 1 % of the slots change per step for ``patience`` steps, the loss
            has settled and the KL is within ``kl_tol``; ``paper`` trains the ``soft`` network with a
            fixed weight and stops when the loss changes by < ``loss_tol`` between steps.

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
    given = {"steps": steps, "lr": lr, "lam": lam, "seed": seed, "progress": progress}
    cfg = dataclasses.replace(config or TOKEN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}, **options)
    if cfg.recipe not in (None, "ste", "hookchains", "paper"):
        raise ValueError(f"token scores are fitted with recipe 'ste' (default) or 'paper', not {cfg.recipe!r}: "
                         "the mask and l0 recipes are for filters")
    device = next(model.parameters()).device
    images = map_tensors(lambda t: t.to(device), images)
    valid = images["attention_mask"].bool() if text else None
    with seeded(cfg.seed, device), eval_mode(model), frozen_weights(model), \
            TokenChains(model, count(images), tau=tau, example=rows_of(images, slice(0, 1)), valid=valid) as chains:
        teacher = _logits(chains, images, "off", cfg.batch_size)
        history = _optimise(chains, images, F.log_softmax(teacher, -1), cfg)
        student = _logits(chains, images, "hard", cfg.batch_size)
    scores = chains.scores.detach().cpu().clone()
    scores[..., :chains.prefix] = 1.0  # prefix scores never change; stored as 1 for readability
    if valid is not None:
        scores *= valid.cpu()[:, None, :]  # padded positions: 0, never kept
    if any(math.isnan(v) for v in history["loss"]):
        raise FloatingPointError("the loss became NaN while fitting token scores; lower lr or check the images")
    config_out = {**dataclasses.asdict(cfg), "tau": tau, "steps_run": len(history["loss"])}
    return TokenSubnetwork(scores, chains.sites, tau, fidelity(teacher, student), config_out, history,
                           valid=None if valid is None else valid.cpu())
