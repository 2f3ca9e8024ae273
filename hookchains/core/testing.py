"""Random sub-networks for structure checks: set scores/gates at random and materialise.

Used by the materialisation tests and ``benchmarks/coverage.py``: with random weights and random
masks the only claim checked is the exactness contract of :func:`hookchains.core.materialize.materialize`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from hookchains.adapters import discover
from hookchains.core.materialize import MaterializeReport, materialize
from hookchains.core.subnetwork import Subnetwork

__all__ = ["random_subnetwork", "check_model", "input_for"]


def random_subnetwork(model: nn.Module, example: torch.Tensor, *, keep: float = 0.3, seed: int = 0,
                      tau: float = 0.1) -> Subnetwork:
    """A :class:`Subnetwork` of ``model`` with about ``keep`` of each site's filters kept (random scores
    in [tau, 1]) and each gate open with probability 1/2."""
    gen = torch.Generator().manual_seed(seed)
    sites = discover(model, example=example)
    scores = {}
    for site in sites.filters:
        on = torch.rand(site.channels, generator=gen) < keep
        scores[site.name] = torch.where(on, tau + (1 - tau) * torch.rand(site.channels, generator=gen),
                                        torch.zeros(site.channels))
    gates = {g.name: torch.randn((), generator=gen) for g in sites.gates}
    return Subnetwork(sites, scores, gates, tau=tau)


def check_model(model: nn.Module, example: torch.Tensor, seed: int = 0) -> Tuple[nn.Module, MaterializeReport, Subnetwork]:
    """Random sub-network of ``model`` materialised and checked; raises if the contract fails."""
    sub = random_subnetwork(model.eval(), example, seed=seed)
    module, report = materialize(sub, model, example)
    return module, report, sub


def input_for(model: nn.Module, size: Optional[int] = None) -> torch.Tensor:
    """A seeded random 1-image batch at the model's configured input size (or ``size``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    if size is not None and not cfg.get("fixed_input_size", False):
        h = w = size
    return torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0))
