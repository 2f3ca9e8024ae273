"""Pruning baselines of paper Fig. 3: magnitude-based and random pruning to the same budget.

Section 4.2: "magnitude-based pruning (removing the filters whose output featuremaps' average
magnitude (L2 norm) over all considered samples is small) and random pruning ('by chance') ...
retain the filters with the largest featuremap magnitude in each layer or randomly, 180 in total ...
and we then fine-tune the filters' scores." :func:`baseline` does exactly that on the same images a
NeuroChains fit used, so the KL of the three sub-networks can be compared (Fig. 3).

How many filters each layer keeps (``allocation``):

* ``"proportional"`` (default, the paper's protocol): a fixed total ``budget`` (default: as many
  filters as the NeuroChains sub-network keeps; the paper: 180) spread over the layers in proportion
  to their width (at least one each), every gate open;
* ``"matched"`` (a second view): every layer keeps as many filters as the NeuroChains sub-network
  keeps there, and its gates are copied, so only *which* filters differ.

Fine-tuning moves only the kept filters' scores (Adam on the KL to the original's output, thresholded
network), kept in ``[tau, score_max]`` so the budget never changes; weights and gates stay frozen. By
default it runs as many steps, at the same learning rate, as the NeuroChains fit did. The protocol
(allocation, budget, gates, steps, lr, seed) is the returned sub-network's ``config``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from hookchains.core.attach import ScoreHooks
from hookchains.core.fit import GATE_BOUND, chunks, kl_backward, logits_of
from hookchains.core.metrics import fidelity
from hookchains.core.sites import FilterSite
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.sandbox import sandbox

__all__ = ["featuremap_norms", "proportional_counts", "baseline", "KINDS", "ALLOCATIONS"]

KINDS = ("magnitude", "random")
ALLOCATIONS = ("proportional", "matched")


@torch.no_grad()
def featuremap_norms(chains: ScoreHooks, images: torch.Tensor) -> Dict[FilterSite, torch.Tensor]:
    """Per filter site, the mean over ``images`` of each channel's featuremap L2 norm (section 4.2).

    The featuremap is the output of the site's ``hook_module`` (the norm layer after the conv, where
    scores act) of the original model (hooks off); ``site.channel_dim`` indexes its channels.

    Example:
        >>> import hookchains, timm, torch
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> chains = hookchains.attach(model)
        >>> norms = featuremap_norms(chains, images)
        >>> norms[chains.sites.filters[0]].shape       # one value per channel
        torch.Size([16])
    """
    images = images.to(next(chains.model.parameters()).device)
    totals: Dict[FilterSite, torch.Tensor] = {}

    def recorder(site: FilterSite):
        def hook(module, args, out):
            per_image = out.detach().float().movedim(site.channel_dim, 1)
            norms = per_image.reshape(*per_image.shape[:2], -1).norm(dim=2).sum(0)
            totals[site] = totals.get(site, 0) + norms
        return hook

    handles = [chains.model.get_submodule(s.hook_module).register_forward_hook(recorder(s))
               for s in chains.sites.filters]
    try:
        logits_of(chains, images, "off")
    finally:
        for handle in handles:
            handle.remove()
    return {site: total.cpu() / images.shape[0] for site, total in totals.items()}


def proportional_counts(widths: List[int], budget: int) -> List[int]:
    """Split ``budget`` filters over layers of ``widths`` channels in proportion to the widths (the
    paper's "180 in total" spread by layer), at least 1 and at most the width per layer, by largest
    remainder (Hamilton's method): the counts sum to ``budget`` and, unless clamped to ``[1, width]``,
    each is its quota ``budget * w / sum(widths)`` rounded up or down.

    Raises:
        ValueError: ``budget`` below one per layer or above every filter.

    Example:
        >>> proportional_counts([16, 16, 32, 32], 37)
        [6, 6, 13, 12]
    """
    if not len(widths) <= budget <= sum(widths):
        raise ValueError(f"budget must be between {len(widths)} (one filter per layer) and {sum(widths)} "
                         f"(every filter), got {budget}: pass a budget in that range (sweep: --baseline-budget) "
                         "or allocation='matched'")
    quota = [budget * w / sum(widths) for w in widths]
    counts = [min(w, max(1, math.floor(q))) for w, q in zip(widths, quota)]
    while sum(counts) < budget:
        i = max((i for i in range(len(widths)) if counts[i] < widths[i]), key=lambda i: quota[i] - counts[i])
        counts[i] += 1
    while sum(counts) > budget:
        i = min((i for i in range(len(widths)) if counts[i] > 1), key=lambda i: quota[i] - counts[i])
        counts[i] -= 1
    return counts


def _allocation(chains: ScoreHooks, sub: Subnetwork, allocation: str,
                budget: Optional[int]) -> Tuple[Dict[str, int], Dict[str, torch.Tensor]]:
    """Filters to keep per site, and the gate logits to use."""
    if allocation == "matched":
        kept = sub.kept_filters()
        return ({s.name: len(kept.get(s.name, [])) for s in chains.sites.filters},
                {k: v.clone() for k, v in sub.gate_logits.items()})
    counts = proportional_counts([s.channels for s in chains.sites.filters], budget)
    open_gate = torch.tensor(GATE_BOUND * chains.temperature)
    return ({s.name: k for s, k in zip(chains.sites.filters, counts)},
            {g.name: open_gate.clone() for g in chains.sites.gates})


def _protocol(sub: Subnetwork, allocation: str, budget: Optional[int], steps: Optional[int],
              lr: Optional[float]) -> Tuple[Optional[int], int, float]:
    """The budget, steps and learning rate to use: given ones, else the NeuroChains fit's."""
    if budget is not None and allocation != "proportional":
        raise ValueError("budget applies to allocation='proportional' ('matched' keeps sub's per-layer counts)")
    if allocation == "proportional" and budget is None:
        budget = sub.counts()["filters_kept"]
    fitted = {"steps": sub.config.get("steps_run"), "lr": sub.config.get("lr")}
    steps, lr = (fitted["steps"] if steps is None else steps), (fitted["lr"] if lr is None else lr)
    if steps is None or lr is None:
        raise ValueError("sub does not record its fit's steps_run and lr (a hand-made or old result): "
                         "pass steps= and lr= for the baselines' fine-tuning")
    if steps < 0 or lr <= 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    return budget, int(steps), float(lr)


def _chosen_masks(chains: ScoreHooks, images: torch.Tensor, kind: str, counts: Dict[str, int],
                  seed: int) -> Dict[str, torch.Tensor]:
    """Boolean keep-mask per site: the ``counts[site]`` largest featuremap norms, or a seeded draw."""
    if kind == "magnitude":
        norms = {site.name: v for site, v in featuremap_norms(chains, images).items()}
        order = {s.name: torch.argsort(norms[s.name], descending=True, stable=True) for s in chains.sites.filters}
    else:
        generator = torch.Generator().manual_seed(seed)
        order = {s.name: torch.randperm(s.channels, generator=generator) for s in chains.sites.filters}
    masks = {}
    for site in chains.sites.filters:
        mask = torch.zeros(site.channels, dtype=torch.bool)
        mask[order[site.name][:counts[site.name]]] = True
        masks[site.name] = mask
    return masks


def _fine_tune(chains: ScoreHooks, images: torch.Tensor, teacher: torch.Tensor, masks: Dict[str, torch.Tensor],
               steps: int, lr: float) -> List[float]:
    """Adam on the kept scores only (KL to the teacher, thresholded network); returns the KL per step."""
    keep = {n: m.to(images.device) for n, m in masks.items()}
    optimiser = torch.optim.Adam(list(chains.scores.values()), lr=lr)
    teacher_logp, parts, history = F.log_softmax(teacher, -1), chunks(images.shape[0], None), []
    with chains.using("hard"):
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            history.append(kl_backward(chains, images, teacher_logp, parts, 1.0))
            optimiser.step()
            with torch.no_grad():
                for name, score in chains.scores.items():
                    kept = score.clamp(min=chains.tau, max=chains.score_max)
                    score.copy_(torch.where(keep[name], kept, torch.zeros_like(score)))
    return history


def baseline(chains: ScoreHooks, images: torch.Tensor, sub: Subnetwork, kind: str, *,
             allocation: str = "proportional", budget: Optional[int] = None, steps: Optional[int] = None,
             lr: Optional[float] = None, seed: int = 0, teacher: Optional[torch.Tensor] = None) -> Subnetwork:
    """A magnitude- or random-pruned sub-network of ``sub``'s size, scores fine-tuned (Fig. 3).

    Args:
        chains: hooks on the model ``sub`` was fitted on (their state is restored afterwards).
        images: the images ``sub`` was fitted on.
        sub: the NeuroChains sub-network whose budget (and, ``"matched"``, layout and gates) to use.
        kind: ``"magnitude"`` (largest mean featuremap norms, :func:`featuremap_norms`) or ``"random"``.
        allocation: ``"proportional"`` (the paper's) or ``"matched"`` (module doc); budget: total
            filters for ``"proportional"`` (default: as many as ``sub`` keeps).
        steps, lr: Adam fine-tuning of the kept scores (start at 1; ``steps=0``: no fine-tuning);
            default: the steps the fit of ``sub`` ran (``config["steps_run"]``) and its ``lr``.
        seed: the random draw's seed (same seed, same sub-network).
        teacher: the original's logits on ``images`` (default: computed with the hooks off).

    Returns:
        a :class:`Subnetwork` whose fidelity is that of the thresholded network after fine-tuning;
        its ``config`` is the protocol: kind, allocation, budget, gates (``"open"`` or
        ``"as sub-network"``), steps, lr, seed.

    Raises:
        ValueError: unknown kind/allocation, a budget outside [layers, filters], or no steps/lr
            known (a ``sub`` without ``steps_run``/``lr`` in its config: pass them).

    Example:
        >>> import hookchains, timm, torch
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> chains = hookchains.attach(model)
        >>> nc = hookchains.fit(chains, images, steps=3, progress=False)
        >>> mag = baseline(chains, images, nc, "magnitude", steps=2)
        >>> mag.counts()["filters_kept"] == nc.counts()["filters_kept"]   # the same budget
        True
        >>> mag.config["allocation"], mag.config["gates"], mag.config["lr"] == nc.config["lr"]
        ('proportional', 'open', True)
    """
    if kind not in KINDS or allocation not in ALLOCATIONS:
        raise ValueError(f"kind must be one of {KINDS} and allocation one of {ALLOCATIONS}, "
                         f"got {kind!r} and {allocation!r}")
    budget, steps, lr = _protocol(sub, allocation, budget, steps, lr)
    images = images.to(next(chains.model.parameters()).device)
    with sandbox(chains, sub):
        counts, gates = _allocation(chains, sub, allocation, budget)
        masks = _chosen_masks(chains, images, kind, counts, seed)
        chains.load_state({n: m.float() for n, m in masks.items()}, gates)
        teacher = logits_of(chains, images, "off") if teacher is None else teacher.to(images.device).float()
        history = _fine_tune(chains, images, teacher, masks, steps, lr)
        student = logits_of(chains, images, "hard")
        scores = {k: v.detach().cpu().clone() for k, v in chains.scores.items()}
        gate_logits = {k: v.detach().cpu().clone() for k, v in chains.gate_logits.items()}
    config = {"kind": kind, "allocation": allocation, "budget": sum(counts.values()),
              "gates": "open" if allocation == "proportional" else "as sub-network", "steps": steps,
              "lr": lr, "seed": seed}
    return Subnetwork(chains.sites, scores, gate_logits, chains.tau, chains.temperature,
                      fidelity(teacher, student), config, {"kl": history}, sub.model_ref, dict(sub.task))
