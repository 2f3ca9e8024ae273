"""Random sub-networks for structure checks: set scores/gates at random and materialise.

Used by the materialisation tests and ``benchmarks/coverage.py``: with random weights and random
masks the only claim checked is the exactness contract of :func:`hookchains.core.materialize.materialize`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from hookchains.adapters import discover
from hookchains.core.materialize import MaterializeReport, materialize
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.forward import Selector

__all__ = ["random_subnetwork", "check_model", "input_for"]


def random_subnetwork(model: nn.Module, example: torch.Tensor, *, keep: float = 0.3, seed: int = 0,
                      tau: float = 0.1, counts: Optional[Dict[str, int]] = None,
                      gates_open: Optional[bool] = None, output: Selector = None) -> Subnetwork:
    """A :class:`Subnetwork` of ``model`` with random scores in [tau, 1] on the kept filters.

    Each filter is kept with probability ``keep``, except at sites named in ``counts`` (filter site ->
    exactly that many kept, chosen at random). Each gate is open with probability 1/2, or all open /
    all closed when ``gates_open`` is given.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> random_subnetwork(net, torch.zeros(1, 3, 8, 8), counts={"0": 3}).counts()["filters_kept"]
        3
    """
    gen = torch.Generator().manual_seed(seed)
    sites = discover(model, example=example, output=output)
    scores = {}
    for site in sites.filters:
        if counts is not None and site.name in counts:
            on = torch.zeros(site.channels, dtype=torch.bool)
            on[torch.randperm(site.channels, generator=gen)[:counts[site.name]]] = True
        else:
            on = torch.rand(site.channels, generator=gen) < keep
        scores[site.name] = torch.where(on, tau + (1 - tau) * torch.rand(site.channels, generator=gen),
                                        torch.zeros(site.channels))
    gates = {g.name: torch.randn((), generator=gen) if gates_open is None else torch.tensor(1.0 if gates_open else -1.0)
             for g in sites.gates}
    return Subnetwork(sites, scores, gates, tau=tau)


def check_model(model: nn.Module, example: torch.Tensor, seed: int = 0,
                output: Selector = None) -> Tuple[nn.Module, MaterializeReport, Subnetwork]:
    """Random sub-network of ``model`` materialised and checked; raises if the contract fails. ``output``
    picks the class scores of a dict/tuple/list output (:class:`~hookchains.inputs.forward.OutputSpec`)."""
    sub = random_subnetwork(model.eval(), example, seed=seed, output=output)
    module, report = materialize(sub, model, example)
    return module, report, sub


def input_for(model: nn.Module, size: Optional[int] = None) -> torch.Tensor:
    """A seeded random 1-image batch at the model's configured input size (or ``size``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if size is not None and not cfg.get("fixed_input_size", False):
        h = w = size
    return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
