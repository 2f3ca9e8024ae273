"""``sandbox(chains)``: change a hooked model's scores freely, leave no trace.

The evaluations of section 4.2 and appendix A.5 (faithfulness, Fig. 2 / 11; robustness, Fig. 12;
pruning baselines, Fig. 3) all load some scores into the hooks, zero or fine-tune a few of them and
differentiate through the network. NeuroChains never changes a weight (section 3.1), and neither may
an evaluation: inside the sandbox every model parameter has ``requires_grad=False`` (no weight
gradient is ever formed) and the model is in eval mode; on exit -- also on an error -- the chains'
scores, gate logits and their ``.grad`` are put back, as are each submodule's train/eval flag and
each parameter's ``requires_grad`` (:mod:`hookchains.core.state`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from hookchains.core.attach import ScoreHooks
from hookchains.core.state import explaining
from hookchains.core.subnetwork import Subnetwork

__all__ = ["sandbox"]


def _check_matches(chains: ScoreHooks, sub: Subnetwork) -> None:
    if set(sub.scores) != set(chains.scores) or set(sub.gate_logits) != set(chains.gate_logits):
        raise ValueError("the sub-network's sites are not these chains' sites: was it fitted on another "
                         "model, or with other sites?")


@contextmanager
def sandbox(chains: ScoreHooks, sub: Optional[Subnetwork] = None) -> Iterator[ScoreHooks]:
    """Frozen weights, eval mode and, when given, ``sub``'s scores and gates loaded into ``chains``;
    everything restored on exit.

    Example:
        >>> import hookchains, timm, torch
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> chains = hookchains.attach(model)
        >>> sub = hookchains.fit(chains, images, steps=3, progress=False)
        >>> with sandbox(chains, sub) as c, c.using("hard"), torch.no_grad():
        ...     logits = c.model(images)          # the thresholded sub-network
        >>> logits.shape
        torch.Size([4, 2])
    """
    if sub is not None:
        _check_matches(chains, sub)
    saved = [(p, p.detach().clone(), p.grad) for p in chains.parameters()]
    try:
        with explaining(chains.model):
            if sub is not None:
                chains.load_state(sub.scores, sub.gate_logits)
            yield chains
    finally:
        with torch.no_grad():
            for param, value, grad in saved:
                param.copy_(value)
                param.grad = grad
