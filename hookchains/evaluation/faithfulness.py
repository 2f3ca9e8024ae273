"""Faithfulness: does a filter's score say how much the sub-network needs it? (section 4.2, A.5)

For each filter a sub-network keeps, remove it (its score set to 0) and measure on the fitting images

* ``degradation`` -- paper Fig. 2: "the decrease of the sub-network's probability on the
  original-DNN predicted class after removing a filter", averaged over the images;
* ``negative_share`` -- paper Fig. 11 right: the share of images whose quotient ``Q(p, q)`` (Eq. 9,
  ``p`` the original model, ``q`` the sub-network without the filter) is negative, i.e. whose
  predicted class changed.

Scores are faithful when both grow with the score; :func:`hookchains.core.metrics.spearman` condenses each
scatter into one number per sub-network. Two checks keep that number honest:

* ``spearman_untied`` -- the same correlation over the *untied* filters only, those whose score is
  strictly below the sub-network's top score (scores clamped at their bound tie, and ties alone can
  make a rank correlation look good or bad);
* ``taylor`` -- a gradient x activation importance per filter (first-order Taylor expansion, Molchanov
  et al., 2017 and 2019, "Importance estimation for neural network pruning"), the cheap baseline a
  learned score has to beat: ``spearman_taylor`` is its correlation with the same degradation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from hookchains.core.attach import ScoreHooks
from hookchains.core.fit import logits_of
from hookchains.core.metrics import quotient, spearman
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.sandbox import sandbox

__all__ = ["Faithfulness", "faithfulness", "taylor_importance"]


def _json_float(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


@dataclass
class Faithfulness:
    """Per kept filter: its label, score and the damage its removal does (Fig. 2, Fig. 11 right).

    Attributes:
        filters: paper labels ``f"{site.label}_{index}"``, in the order of ``Subnetwork.kept_filters()``.
        scores: the filters' learned scores ``S``.
        degradation: mean decrease of the sub-network's probability of the original's predicted class.
        negative_share: share of images with ``Q(p, q) < 0`` once the filter is removed.
        spearman: rank correlation of ``scores`` and ``degradation`` (nan when undefined).
        spearman_negative: rank correlation of ``scores`` and ``negative_share``.
        taylor: gradient x activation importance of each filter (:func:`taylor_importance`).
        spearman_untied: rank correlation of ``scores`` and ``degradation`` over the filters whose
            score is strictly below the top score; untied: how many filters that is.
        spearman_taylor: rank correlation of ``taylor`` and ``degradation``.
    """

    filters: List[str]
    scores: List[float]
    degradation: List[float]
    negative_share: List[float]
    spearman: float
    spearman_negative: float
    taylor: List[float] = dataclasses.field(default_factory=list)
    spearman_untied: float = math.nan
    untied: int = 0
    spearman_taylor: float = math.nan

    def to_json(self) -> Dict[str, Any]:
        """Plain JSON (NaN becomes ``None``).

        Example:
            >>> import hookchains, torch
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
            ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
            >>> images = torch.randn(4, 3, 16, 16)
            >>> import json
            >>> chains = hookchains.attach(model)
            >>> sub = hookchains.fit(chains, images, steps=3, progress=False)
            >>> json.dumps(faithfulness(chains, sub, images).to_json())
            '{"spearman": ..., "filters": [...], ...}'
        """
        return {"spearman": _json_float(self.spearman), "spearman_negative": _json_float(self.spearman_negative),
                "spearman_untied": _json_float(self.spearman_untied), "untied": self.untied,
                "spearman_taylor": _json_float(self.spearman_taylor),
                "filters": list(self.filters), "scores": [_json_float(v) for v in self.scores],
                "degradation": [_json_float(v) for v in self.degradation],
                "negative_share": [_json_float(v) for v in self.negative_share],
                "taylor": [_json_float(v) for v in self.taylor]}


def _class_prob(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits, -1).gather(-1, classes[:, None]).squeeze(-1)


def taylor_importance(chains: ScoreHooks, sub: Subnetwork, images: torch.Tensor, *,
                      teacher: Optional[torch.Tensor] = None, batch_size: Optional[int] = None) -> List[float]:
    """Gradient x activation importance of each kept filter of ``sub`` (Molchanov et al., 2017/2019).

    With ``J`` the thresholded sub-network's probability of the original's predicted class, averaged
    over ``images``, and ``a`` a kept filter's scaled featuremap (what the next layer reads), the
    importance is ``sum(dJ/da * a)`` over the images and the featuremap's positions: the first-order
    Taylor estimate of the degradation that removing the filter causes (same units as
    :attr:`Faithfulness.degradation`). Computed in one backward pass as ``S * dJ/dS`` (the
    featuremap is ``a = S * x``, so both are equal).

    Returns:
        one value per kept filter, in the order of ``sub.kept_filters()``; the chains' scores and
        gradients are restored.

    Example:
        >>> import hookchains
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 16, 16)
        >>> chains = hookchains.attach(model)
        >>> sub = hookchains.fit(chains, images, steps=3, progress=False)
        >>> taylor = taylor_importance(chains, sub, images)
        >>> len(taylor) == sub.counts()["filters_kept"]
        True
    """
    images = images.to(next(chains.model.parameters()).device)
    with sandbox(chains, sub):
        if teacher is None:
            teacher = logits_of(chains, images, "off", batch_size)
        predicted = teacher.to(images.device).argmax(-1)
        kept = sub.kept_filters()
        scores = [chains.scores[name] for name in kept]
        grads = [torch.zeros_like(s) for s in scores]
        step = batch_size or images.shape[0]
        with chains.using("hard"), torch.enable_grad():
            for start in range(0, images.shape[0], step):
                part = slice(start, start + step)
                j = _class_prob(chains.model(images[part]).float(), predicted[part]).sum() / images.shape[0]
                for total, grad in zip(grads, torch.autograd.grad(j, scores, allow_unused=True)):
                    if grad is not None:
                        total += grad
        return [float(s[i].detach() * g[i]) for s, g, indices in zip(scores, grads, kept.values()) for i in indices]


def _untied(scores: List[float], degradation: List[float]) -> Tuple[float, int]:
    """Spearman of the filters scored strictly below the top score, and how many they are."""
    top = max(scores, default=0.0)
    pairs = [(s, d) for s, d in zip(scores, degradation) if s < top]
    return spearman([s for s, _ in pairs], [d for _, d in pairs]), len(pairs)


def faithfulness(chains: ScoreHooks, sub: Subnetwork, images: torch.Tensor, *,
                 teacher: Optional[torch.Tensor] = None, batch_size: Optional[int] = None,
                 filters: Optional[Collection[Tuple[str, int]]] = None) -> Faithfulness:
    """Remove each kept filter of ``sub`` in turn and measure what the thresholded network loses.

    Args:
        chains: hooks on the model ``sub`` was fitted on (their scores are restored afterwards).
        sub: the sub-network to test.
        images: the images to average over (the paper: the 20 fitting images).
        teacher: the original model's logits on ``images`` (default: computed with the hooks off).
        batch_size: images per forward pass (default: all at once).
        filters: only these kept filters ``(site name, index)`` (default: every kept filter); the
            report measures the filters its chains use.

    Returns:
        a :class:`Faithfulness`; one forward pass over the images per measured filter, and one
        backward pass for the Taylor importance (of every kept filter).

    Example:
        >>> import hookchains, torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 16, 16)
        >>> chains = hookchains.attach(model)
        >>> sub = hookchains.fit(chains, images, steps=3, progress=False)   # real fits: ~300 steps
        >>> result = faithfulness(chains, sub, images)
        >>> -1 <= result.spearman <= 1    # > 0 on a real fit: higher-scored filters matter more (Fig. 2)
        True
        >>> len(result.taylor) == len(result.scores) and result.untied <= len(result.scores)
        True
    """
    images = images.to(next(chains.model.parameters()).device)
    with sandbox(chains, sub), torch.no_grad():
        if teacher is None:
            teacher = logits_of(chains, images, "off", batch_size)
        teacher = teacher.to(images.device).float()
        predicted = teacher.argmax(-1)
        base = _class_prob(logits_of(chains, images, "hard", batch_size), predicted)
        labels, scores, degradation, negative = [], [], [], []
        for name, indices in sub.kept_filters().items():
            score = chains.scores[name]
            for index in indices:
                if filters is not None and (name, index) not in filters:
                    continue
                kept_value = score[index].clone()
                score[index] = 0.0
                removed = logits_of(chains, images, "hard", batch_size)
                score[index] = kept_value
                labels.append(f"{sub.sites.filter(name).label}_{index}")
                scores.append(float(kept_value))
                degradation.append(float((base - _class_prob(removed, predicted)).mean()))
                negative.append(float((quotient(teacher, removed) < 0).float().mean()))
    taylor = taylor_importance(chains, sub, images, teacher=teacher, batch_size=batch_size)
    if filters is not None:
        taylor = [t for t, key in zip(taylor, ((n, j) for n, idx in sub.kept_filters().items() for j in idx))
                  if key in filters]
    rho_untied, untied = _untied(scores, degradation)
    return Faithfulness(labels, scores, degradation, negative, spearman(scores, degradation),
                        spearman(scores, negative), taylor, rho_untied, untied, spearman(taylor, degradation))
