"""One fit, the whole size-fidelity curve: select the sub-network at any size without refitting.

A fit ranks every filter (``Subnetwork.importance`` when the recipe has such values, e.g. the mask
logits of :class:`hookchains.core.recipes.Mask`, else the scores ``S``). Keeping the ``n`` best-ranked
filters is thresholding that ranking at its ``n``-th value, so one fit gives a sub-network at every
size:

* :func:`select` -- exactly ``n`` filters (ties broken by site order, then index), or
* :func:`select_kl` -- the fewest filters whose thresholded network is within a KL tolerance
  (binary search over ``n``).

Each selection is a plain :class:`~hookchains.Subnetwork` (exact and materialisable): a selected
filter the fit kept keeps its learned scale ``S``; one the fit removed re-enters at the threshold
(``S = tau``, the smallest scale a kept filter has: the least change to the fitted network; at
scale 1 the re-entered filters of a digits fit raised the KL from 0.42 to 3.3). Gates stay as fitted
and filters inside a removed block cannot be selected.

:func:`size_fidelity` measures KL against filters kept on a log grid, with the magnitude and random
pruning baselines of :mod:`hookchains.evaluation.baselines` at the same budgets (the paper's way: spread over
layers by width, gates open), and :func:`area` turns each curve into one number, the mean KL over
``log10`` of the kept share (trapezoid rule; lower is better), as circuit-discovery work summarises
faithfulness curves by their area (Conmy et al. 2023; Hanna et al. 2024). :func:`plot` draws them.

Example (a hand-built net; a real fit runs a few hundred steps):

    >>> import torch, hookchains
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                     nn.Flatten(), nn.Linear(8, 3)).eval()
    >>> images = torch.randn(6, 1, 8, 8)
    >>> with hookchains.attach(net, example=images[:1]) as hooks:
    ...     sub = hookchains.fit(hooks, images, steps=3, progress=False)
    ...     three = select(sub, 3)
    ...     curve = size_fidelity(hooks, images, sub, points=3)
    >>> three.counts()["filters_kept"], curve["sizes"]
    (3, [1, 3, 8])
    >>> sorted(curve["area"])
    ['magnitude', 'neurochains', 'random']
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from hookchains.core.attach import ScoreHooks
from hookchains.core.fit import logits_of
from hookchains.core.metrics import fidelity
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.baselines import baseline
from hookchains.evaluation.sandbox import sandbox

__all__ = ["ranking", "select", "select_kl", "measure", "size_fidelity", "area", "plot"]


def ranking(sub: Subnetwork) -> List[tuple]:
    """Every selectable filter as ``(site, index)``, best first (filters inside removed blocks excluded)."""
    values = sub.importance or sub.scores
    hidden = {f for g in sub.sites.gates if not sub.gate_open(g.name) for f in g.filter_sites}
    entries = [(float(v), site.name, i) for site in sub.sites.filters if site.name not in hidden
               for i, v in enumerate(values[site.name].float().tolist())]
    entries.sort(key=lambda e: -e[0])  # stable: ties keep site order, then index
    return [(name, i) for _, name, i in entries]


def select(sub: Subnetwork, filters: int) -> Subnetwork:
    """The sub-network of ``sub``'s ``filters`` best-ranked filters (module doc; at ``sub``'s own
    count it is ``sub``); raises ``ValueError`` unless ``1 <= filters <=`` the selectable filters."""
    order = ranking(sub)
    if not 1 <= filters <= len(order):
        raise ValueError(f"filters must be between 1 and {len(order)} (the filters outside removed blocks), "
                         f"got {filters}")
    scores = {name: torch.zeros_like(s) for name, s in sub.scores.items()}
    for name, i in order[:filters]:
        value = float(sub.scores[name][i])
        scores[name][i] = max(value, sub.tau)
    config = {**sub.config, "selected_from": sub.counts()["filters_kept"], "selected": filters}
    return dataclasses.replace(sub, scores=scores, gate_logits={k: v.clone() for k, v in sub.gate_logits.items()},
                               fidelity={}, config=config, history={}, importance={})


def measure(chains: ScoreHooks, images: torch.Tensor, sub: Subnetwork,
            teacher: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Fidelity (:func:`hookchains.core.metrics.fidelity`) of ``sub``'s thresholded network on ``images``;
    ``chains`` are restored afterwards. ``teacher``: the original's logits (default: computed)."""
    images = images.to(next(chains.model.parameters()).device)
    with sandbox(chains, sub):
        teacher = logits_of(chains, images, "off") if teacher is None else teacher
        return fidelity(teacher.cpu(), logits_of(chains, images, "hard").cpu())


def select_kl(chains: ScoreHooks, images: torch.Tensor, sub: Subnetwork, kl: float) -> Subnetwork:
    """The smallest selection (:func:`select`) whose KL on ``images`` is at most ``kl`` (binary
    search over the size, which assumes KL falls as filters are added); raises ``ValueError`` when
    even every selectable filter is above ``kl``. Its ``fidelity`` is filled in."""
    teacher = logits_of(chains, images.to(next(chains.model.parameters()).device), "off")
    low, high = 1, len(ranking(sub))
    best = select(sub, high)
    best.fidelity = measure(chains, images, best, teacher)
    if best.fidelity["kl"] > kl:
        raise ValueError(f"even all {high} selectable filters give KL {best.fidelity['kl']:.3f} > {kl}: "
                         "raise the tolerance or refit with more gates open")
    while low < high:
        middle = (low + high) // 2
        candidate = select(sub, middle)
        candidate.fidelity = measure(chains, images, candidate, teacher)
        if candidate.fidelity["kl"] <= kl:
            high, best = middle, candidate
        else:
            low = middle + 1
    return best


def _grid(smallest: int, largest: int, points: int) -> List[int]:
    """About ``points`` sizes spaced evenly in ``log`` from ``smallest`` to ``largest``, distinct."""
    ratio = (largest / smallest) ** (1.0 / max(points - 1, 1))
    return sorted({min(largest, round(smallest * ratio ** k)) for k in range(points)})


def size_fidelity(chains: ScoreHooks, images: torch.Tensor, sub: Subnetwork, sizes: Optional[Sequence[int]] = None,
                  baselines: Sequence[str] = ("magnitude", "random"), baseline_steps: int = 0,
                  points: int = 12, largest: Optional[int] = None, seed: int = 0) -> Dict[str, object]:
    """KL of the thresholded network against filters kept, for ``sub``'s selections and the baselines.

    Args:
        chains, images: the hooks and images ``sub`` was fitted on.
        sub: a fit result.
        sizes: filter counts to measure (default: ``points`` sizes, log-spaced from one filter per
            layer to ``largest``, default every selectable filter; give the same ``largest`` to
            compare fits, since an area depends on its size range).
        baselines: kinds of :func:`hookchains.evaluation.baselines.baseline` at the same budgets (``"proportional"``).
        baseline_steps: their score fine-tuning steps (0: none, like the selections).
        seed: the random baseline's draw.

    Returns:
        ``{"sizes": [...], "total": filters in the model, "kl": {"neurochains": [...], kind: [...]},
        "agree": {...}, "area": {name: area(...)}}`` (the module doc has an example).
    """
    total = sub.counts()["filters_total"]
    sizes = list(sizes) if sizes else _grid(len(sub.sites.filters), largest or len(ranking(sub)), points)
    teacher = logits_of(chains, images.to(next(chains.model.parameters()).device), "off")
    figures = {"neurochains": [measure(chains, images, select(sub, n), teacher) for n in sizes]}
    for kind in baselines:
        figures[kind] = [baseline(chains, images, sub, kind, allocation="proportional", budget=n,
                                  steps=baseline_steps, seed=seed, teacher=teacher).fidelity for n in sizes]
    kls = {name: [f["kl"] for f in rows] for name, rows in figures.items()}
    return {"sizes": sizes, "total": total, "kl": kls,
            "agree": {name: [f["agree"] for f in rows] for name, rows in figures.items()},
            "area": {name: area(sizes, values, total) for name, values in kls.items()}}


def area(sizes: Sequence[int], kls: Sequence[float], total: int) -> float:
    """Mean KL over ``x = log10(size / total)`` (trapezoid rule divided by the x range); lower is better.

    Example:
        >>> area([1, 10, 100], [2.0, 1.0, 0.0], 100)
        1.0
    """
    xs = [math.log10(n / total) for n in sizes]
    if len(xs) < 2 or xs[-1] == xs[0]:
        raise ValueError("the area needs at least two different sizes")
    trapezoids = sum((xs[i + 1] - xs[i]) * (kls[i] + kls[i + 1]) / 2 for i in range(len(xs) - 1))
    return trapezoids / (xs[-1] - xs[0])


def plot(curves: Dict[str, Dict[str, object]], path, title: str = "") -> Path:
    """Write a PNG of filters kept (% of the model, log x) against KL: one line per recipe/baseline.

    Args:
        curves: label -> ``{"sizes", "total", "kl"}`` (e.g. :func:`size_fidelity`'s result per recipe,
            or its ``kl`` entries spread out); each label's legend entry shows its area.
        path: the PNG to write.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        shares = [100.0 * n / curve["total"] for n in curve["sizes"]]
        axes.plot(shares, curve["kl"], marker="o", markersize=3,
                  label=f"{label} (area {area(curve['sizes'], curve['kl'], curve['total']):.3f})")
    axes.set_xscale("log")
    axes.set_yscale("symlog", linthresh=0.1)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("filters kept (% of the model)")
    axes.set_ylabel("mean KL(original || sub-network)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
