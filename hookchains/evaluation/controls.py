"""The random-weights sanity check of an explanation (Adebayo et al., 2018, "Sanity checks for saliency maps").

An explanation that reflects what a network *learned* must change when the learned weights are
destroyed. :func:`random_weights_control` runs the same NeuroChains fit on a copy of the model whose
weights are re-initialised and reports it beside the real sub-network: its size, its fidelity (to the
randomised model's own outputs) and how many of its kept filters the real sub-network also keeps,
against the overlap two random choices of the same per-layer sizes would have by chance. A randomised
network often ignores its input (its outputs barely vary over the images), and then an empty
sub-network reproduces it: :func:`output_spread` of both models says whether that is the case.

Re-initialisation: every module with a ``reset_parameters()`` method (conv, linear, norm layers; a
norm layer's running statistics are reset too) draws fresh weights from its default initialiser; a
parameter of any other module (e.g. a ViT's position embedding) has its entries shuffled, so it keeps
its distribution and loses its structure. The draw is seeded (``seed`` plus a fixed offset, so a model
built right after ``torch.manual_seed(seed)`` is not redrawn with its own initial weights) and the
global RNG state is restored.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Optional, Set, Tuple

import torch
from torch import nn

from hookchains.core.attach import attach, strip_hooks
from hookchains.core.fit import FitConfig, fit
from hookchains.core.metrics import kl_per_image
from hookchains.core.subnetwork import Subnetwork

__all__ = ["randomized_copy", "random_weights_control", "kept_overlap", "output_spread"]

SEED_OFFSET = 0x5EEDC0DE
"""Added to the control's seed (module doc)."""


@torch.no_grad()
def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` (without hookchains' hooks) with every weight re-initialised (module doc).

    ``model`` itself is untouched; the copy is in eval mode on the model's device.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> _ = model(torch.zeros(1, 3, 8, 8))
        >>> twin = randomized_copy(model, seed=0)
        >>> any(torch.equal(a, b) for a, b in zip(model[0].parameters(), twin[0].parameters()))
        False
    """
    twin = strip_hooks(copy.deepcopy(model))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + SEED_OFFSET)
        for module in twin.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                for param in module.parameters(recurse=False):
                    order = torch.randperm(param.numel()).to(param.device)
                    param.copy_(param.flatten()[order].view_as(param))
    return twin.eval()


def _kept_set(sub: Subnetwork) -> Set[Tuple[str, int]]:
    return {(site, i) for site, indices in sub.kept_filters().items() for i in indices}


def kept_overlap(real: Subnetwork, other: Subnetwork) -> Dict[str, float]:
    """How many kept filters two sub-networks of one model share, and how many two random choices of
    the same per-layer sizes would share on average (``sum_l a_l * b_l / width_l``).

    Returns ``{"shared", "shared_by_chance", "jaccard", "real_kept_share"}``: ``jaccard`` = shared /
    union; ``real_kept_share`` = shared / filters ``real`` keeps.

    Example:
        >>> import hookchains
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 16, 16)
        >>> sub = hookchains.fit(hookchains.attach(model), images, steps=3, progress=False)
        >>> kept_overlap(sub, sub)["jaccard"]
        1.0
    """
    a, b = _kept_set(real), _kept_set(other)
    ka, kb = real.kept_filters(), other.kept_filters()
    chance = sum(len(ka.get(s.name, ())) * len(kb.get(s.name, ())) / s.channels for s in real.sites.filters)
    return {"shared": len(a & b), "shared_by_chance": float(chance),
            "jaccard": len(a & b) / len(a | b) if a | b else 1.0,
            "real_kept_share": len(a & b) / len(a) if a else 0.0}


def output_spread(logits: torch.Tensor) -> float:
    """How much a model's output distribution varies over images: the mean ``KL(p_i ‖ p_mean)`` in nats,
    ``p_i`` the softmax of ``logits[i]`` (shape ``(N, classes)``), ``p_mean`` their average; 0 when
    the model gives every image the same output.

    Example:
        >>> output_spread(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        0.0
    """
    mean = torch.softmax(logits.float(), -1).mean(0, keepdim=True)
    return float(kl_per_image(logits.float(), mean.log().expand_as(logits)).mean())


def random_weights_control(model: nn.Module, images: torch.Tensor, sub: Subnetwork, *, seed: int = 0,
                           score_max: Optional[float] = 1.0, teacher: Optional[torch.Tensor] = None,
                           **fit_options) -> Dict[str, Any]:
    """Fit the model with re-initialised weights exactly as ``sub`` was fitted, and compare (module doc).

    Args:
        model: the model ``sub`` was fitted on (hooked or not; it is copied, never changed).
        images: the images ``sub`` was fitted on, shape ``(N, C, H, W)``.
        sub: the real sub-network; its sites, ``tau``, temperature and fit options are reused.
        seed: seeds the re-initialisation.
        score_max: the score bound the real fit used (:func:`hookchains.core.attach.attach`).
        teacher: the real model's logits on ``images``, to report its :func:`output_spread` too.
        **fit_options: :class:`~hookchains.core.fit.FitConfig` fields overriding those in ``sub.config``.

    Returns:
        ``{"seed", "size": counts, "fidelity": fit figures vs the randomised model's own outputs,
        "steps_run", "overlap": kept_overlap(sub, random_sub), "output_spread": {"random"[, "real"]}}``.

    Example:
        >>> import hookchains
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 16, 16)
        >>> with hookchains.attach(model) as hooks:
        ...     sub = hookchains.fit(hooks, images, steps=3, progress=False)   # real fits: ~300 steps
        >>> control = random_weights_control(model, images, sub)
        >>> sorted(control["overlap"]), control["steps_run"] <= 3
        (['jaccard', 'real_kept_share', 'shared', 'shared_by_chance'], True)
    """
    fields = {f.name for f in dataclasses.fields(FitConfig)}
    options = {**{k: v for k, v in sub.config.items() if k in fields}, "progress": False, **fit_options}
    twin = randomized_copy(model, seed)
    images = images.to(next(twin.parameters()).device)
    with torch.no_grad():
        spread = {"random": output_spread(twin(images))}
    if teacher is not None:
        spread["real"] = output_spread(teacher)
    with attach(twin, sites=sub.sites, tau=sub.tau, temperature=sub.temperature, score_max=score_max) as chains:
        control = fit(chains, images, **options)
    return {"seed": seed, "size": control.counts(), "fidelity": dict(control.fidelity),
            "steps_run": control.config.get("steps_run"), "overlap": kept_overlap(sub, control),
            "output_spread": spread}
