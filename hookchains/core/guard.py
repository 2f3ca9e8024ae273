"""The exactness self-check at attach time: never explain a network other than the user's.

Everything later (the fit's KL, the counts, the chains, the materialised module) relies on three facts
about the hooks, which :func:`verify` checks on the example input before any fit (DESIGN.md, "Trust
rules"), each against a reference network built *without* hookchains' hooks:

1. all scores at 1 and all gates open, in ``"hard"`` mode, give the model's original outputs;
2. for each filter site, zeroing its scores equals the network in which the conv/linear unit's output
   channels are zero, together with the affine norm right after it, **at every call** of the unit
   (a unit applied to two views, each with its own BatchNorm, is caught here);
3. for each gate site, a closed gate equals the network with the layer/block replaced by a
   pass-through (:class:`~hookchains.core.state.PassThrough`), so a block that changes its input in place,
   or a module shared with other places, is caught here.

A site that breaks 2 or 3 is refused (dropped from the site map with its reason, shown by
``inspect`` and saved with every result); a model that breaks 1 is refused as a whole. Cost: one
forward for fact 1 and two per site (hooked and reference) on one example; timm ``resnet50``
(53 filter + 16 gate sites) takes 139 forwards, about 8 s on one CPU thread at 224 px.

Example:
    >>> hooks = ScoreHooks(model, sites)                  # hookchains.attach does this
    >>> verify(hooks, images[:1])                         # nothing refused when every site is exact
    {'filters': {}, 'gates': {}}
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

from hookchains.adapters.graph import is_norm
from hookchains.core.forward import call, class_scores, map_tensors
from hookchains.core.sites import FilterSite, GateSite
from hookchains.core.state import PassThrough, explaining, swapped

__all__ = ["verify", "tolerance", "InexactModelError"]


class InexactModelError(ValueError):
    """The hooks with everything kept do not reproduce the model: hookchains refuses it."""


def tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest difference counted as equal: ``max(1e-5, 4 eps(dtype)) * max|reference|`` (relative)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    finite = reference[torch.isfinite(reference)]
    return max(1e-5, 4 * eps) * max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-6)


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    return 0.0 if bool(same.all()) else float((a - b).abs().nan_to_num(float("inf")).max())


@contextlib.contextmanager
def _silenced(model: nn.Module, site: FilterSite) -> Iterator[List[int]]:
    """Reference for fact 2: the unit's output channels zero at every call, and the output of an
    affine norm that takes one of those outputs zero too. Yields a one-item list: the call count."""
    # id -> (tensor, its version): kept alive so ids stay unique; a tensor changed in place since
    # (``out = silenced; out += branch``) no longer holds the silenced channels
    zeroed: Dict[int, Tuple[torch.Tensor, int]] = {}
    calls = [0]

    def zero(out: torch.Tensor) -> torch.Tensor:
        silent = torch.zeros_like(out)
        zeroed[id(silent)] = (silent, silent._version)
        return silent

    def unit_hook(module, args, out):
        calls[0] += 1
        return zero(out)

    def norm_hook(module, args, out):
        found = zeroed.get(id(args[0])) if args else None
        return zero(out) if found is not None and found[1] == args[0]._version else None

    handles = [model.get_submodule(site.name).register_forward_hook(unit_hook)]
    handles += [m.register_forward_hook(norm_hook) for m in model.modules() if is_norm(m)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _passed_through(model: nn.Module, gate: GateSite):
    """Reference for fact 3: the gate's modules replaced by a pass-through (the first copies ``H``)."""
    return swapped(model, gate.members, lambda i: PassThrough() if i == 0 else nn.Identity())


def _check_filter(hooks, example, site: FilterSite, tol: float) -> str:
    scores = hooks.scores[site.name]
    saved = scores.detach().clone()
    try:
        scores.zero_()
        with hooks.using("hard"):
            silenced = class_scores(call(hooks.model, example), hooks.sites.output)
    finally:
        scores.copy_(saved)
    with hooks.using("off"), _silenced(hooks.model, site) as calls:
        reference = class_scores(call(hooks.model, example), hooks.sites.output)
    diff = _difference(silenced, reference)
    if diff <= tol:
        return ""
    shared = f"; {site.name!r} runs {calls[0]} times per forward" if calls[0] > 1 else ""
    return (f"zeroing its scores differs by {diff:.3g} from silencing {site.name!r} (and the norm after it) "
            f"at every use{shared}")


def _check_gate(hooks, example, gate: GateSite, tol: float) -> str:
    alpha = hooks.gate_logits[gate.name]
    saved = alpha.detach().clone()
    try:
        alpha.fill_(-1.0)
        with hooks.using("hard"):
            closed = class_scores(call(hooks.model, example), hooks.sites.output)
    finally:
        alpha.copy_(saved)
    with hooks.using("off"), _passed_through(hooks.model, gate):
        reference = class_scores(call(hooks.model, example), hooks.sites.output)
    diff = _difference(closed, reference)
    return "" if diff <= tol else (f"a closed gate differs by {diff:.3g} from {gate.members} replaced by a "
                                   "pass-through (a block that changes its input in place, or a shared module)")


@torch.no_grad()
def verify(hooks, example) -> Dict[str, str]:
    """Check facts 1-3 on the first example of ``example`` (a tensor or a tuple/dict of inputs) with
    single-task ``hooks`` (:class:`~hookchains.core.attach.ScoreHooks`); the model's modes, flags and the
    hooks' values are restored. Returns ``{"filters": {name: reason}, "gates": {name: reason}}`` for the
    sites that break 2 or 3 (a layer-span gate shares its name with its conv's filter site).

    Raises:
        InexactModelError: when fact 1 fails (the hooks change the model with everything kept).
    """
    one = map_tensors(lambda t: t[:1], example)
    spec = hooks.sites.output
    with explaining(hooks.model), hooks.using("off"):
        original = class_scores(call(hooks.model, one), spec)
    tol = tolerance(original, next(hooks.model.parameters()).dtype)
    saved = {name: a.detach().clone() for name, a in hooks.gate_logits.items()}
    try:
        for alpha in hooks.gate_logits.values():
            alpha.fill_(1.0)
        with explaining(hooks.model):
            with hooks.using("hard"):
                diff = _difference(class_scores(call(hooks.model, one), spec), original)
            if diff > tol:
                raise InexactModelError(
                    f"with every score at 1 and every gate open the hooked {type(hooks.model).__name__} differs from "
                    f"the model by {diff:.3g} (> {tol:.3g}): hookchains cannot explain it exactly; please report it")
            filters = {s.name: _check_filter(hooks, one, s, tol) for s in hooks.sites.filters}
            gates = {g.name: _check_gate(hooks, one, g, tol) for g in hooks.sites.gates}
    finally:
        for name, alpha in hooks.gate_logits.items():
            alpha.copy_(saved[name])
    return {"filters": {n: why for n, why in filters.items() if why}, "gates": {n: why for n, why in gates.items() if why}}
