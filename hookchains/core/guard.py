"""The exactness self-check at attach time: never explain a network other than the user's.

Everything later (the fit's KL, the counts, the chains, the materialised module) relies on three facts
about the hooks, which :func:`verify` checks on the example input before any fit (DESIGN.md, "Trust
rules"), each against a reference network built *without* hookchains' hooks:

1. all scores at 1 and all gates open, in ``"hard"`` mode, give the model's original outputs;
2. for each filter site, zeroing its scores equals the network in which the conv/linear unit's output
   channels are zero, together with the affine norm right after it, **at every call** of the unit
   (a unit applied to two views, each with its own BatchNorm, is caught here); for a site scored on a
   module's input (attention heads), the network in which that input is zero at every call;
3. for each gate site, a closed gate equals the network with the layer/block replaced by a
   pass-through (:class:`~hookchains.core.state.PassThrough`), so a block that changes its input in place,
   or a module shared with other places, is caught here.

A site that breaks 2 or 3 is refused (dropped from the site map with its reason, shown by
``inspect`` and saved with every result); a model that breaks 1 is refused as a whole. Cost, on one
example: two forwards for fact 1, two batched forwards per :data:`CHUNK` filter sites (hooked and
reference, one row per site), and per gate one reference forward plus one batched forward per
:data:`CHUNK` gates; measured figures are in CHANGELOG.md.

Example:
    >>> from torch import nn
    >>> from hookchains.adapters import discover
    >>> from hookchains.core.attach import ScoreHooks
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> sites = discover(model, example=x)
    >>> verify(model, sites, x, lambda s, tasks: ScoreHooks(model, s, tasks=tasks))  # what attach runs
    {'filters': {}, 'gates': {}}
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from hookchains.adapters.graph import is_norm
from hookchains.core.sites import FilterSite, GateSite, SiteMap
from hookchains.core.state import PassThrough, explaining, swapped
from hookchains.inputs.forward import call, class_scores, map_tensors

__all__ = ["verify", "tolerance", "InexactModelError", "CHUNK"]

CHUNK = 16  # sites checked per batched forward (rows of one example): bounds the check's memory


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
def _silenced(model: nn.Module, sites: Sequence[FilterSite]) -> Iterator[Dict[str, int]]:
    """Reference for fact 2 on a batch with one row per site: in row ``k`` the output of unit
    ``sites[k]`` is zero at every call, and so is the output of an affine norm that takes it.
    Yields ``{site name: calls of its unit per forward}``."""
    # id -> (tensor, its version, rows): kept alive so ids stay unique; a tensor changed in place since
    # (``out = silenced; out += branch``) no longer holds the silenced channels
    zeroed: Dict[int, Tuple[torch.Tensor, int, List[int]]] = {}
    calls = {s.name: 0 for s in sites}

    def zero(out: torch.Tensor, rows: List[int]) -> torch.Tensor:
        silent = out.clone()
        silent[rows] = 0
        zeroed[id(silent)] = (silent, silent._version, rows)
        return silent

    def unit_hook(name: str, row: int):
        def hook(module, args, out):
            calls[name] += 1
            return zero(out, [row])
        return hook

    def norm_hook(module, args, out):
        found = zeroed.get(id(args[0])) if args else None
        return zero(out, found[2]) if found is not None and found[1] == args[0]._version else None

    def input_hook(name: str, row: int):  # a site scored on its module's input (attention heads)
        def hook(module, args):
            calls[name] += 1
            return (zero(args[0], [row]), *args[1:])
        return hook

    handles = [model.get_submodule(s.hook_module).register_forward_pre_hook(input_hook(s.name, k)) if s.on_input
               else model.get_submodule(s.name).register_forward_hook(unit_hook(s.name, k)) for k, s in enumerate(sites)]
    handles += [m.register_forward_hook(norm_hook) for m in model.modules() if is_norm(m)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _passed_through(model: nn.Module, gate: GateSite):
    """Reference for fact 3: the gate's modules replaced by a pass-through (the first copies ``H``)."""
    return swapped(model, gate.members, lambda i: PassThrough() if i == 0 else nn.Identity())


def _rows(example, count: int):
    """``count`` copies of the one-example batch ``example``."""
    return map_tensors(lambda t: t.expand(count, *t.shape[1:]).clone(), example)


def _hard_rows(make_hooks, sites: SiteMap, example, count: int, set_values) -> torch.Tensor:
    """Class scores of ``count`` rows in ``"hard"`` mode, row ``k`` with the values ``set_values(hooks)``
    gives task ``k`` (every score 1 and gate open otherwise)."""
    hooks = make_hooks(sites, count)
    try:
        for alpha in hooks.gate_logits.values():
            alpha.fill_(1.0)
        set_values(hooks)
        with hooks.using("hard"):
            return class_scores(call(hooks.model, _rows(example, count)), sites.output)
    finally:
        hooks.detach()


def _compared(make_hooks, sites: SiteMap, example, items: Sequence, tol: float, set_own, reference, reason):
    """Per chunk of ``items``: hooked rows (row ``k`` with ``set_own(hooks, k, items[k])``) against
    ``reference(chunk)`` (rows, facts); ``{name: reason(item, difference, facts)}`` where they differ."""
    reasons = {}
    for start in range(0, len(items), CHUNK):
        part = items[start:start + CHUNK]

        def own_values(hooks, part=part):
            for k, item in enumerate(part):
                set_own(hooks, k, item)
        hooked = _hard_rows(make_hooks, sites, example, len(part), own_values)
        rows, facts = reference(part)
        for k, item in enumerate(part):
            diff = _difference(hooked[k], rows[k])
            if diff > tol:
                reasons[item.name] = reason(item, diff, facts)
    return reasons


def _check_filters(make_hooks, model, sites: SiteMap, example, tol: float) -> Dict[str, str]:
    def reference(part):
        with _silenced(model, part) as calls:
            return class_scores(call(model, _rows(example, len(part))), sites.output), calls

    def reason(site, diff, calls):
        shared = f"; {site.name!r} runs {calls[site.name]} times per forward" if calls[site.name] > 1 else ""
        return f"zeroing its scores differs by {diff:.3g} from silencing {site.name!r} (and the norm after it) " \
               f"at every use{shared}"

    def zero(hooks, k, site):
        hooks.scores[site.name][k] = 0
    return _compared(make_hooks, sites, example, sites.filters, tol, zero, reference, reason)


def _check_gates(make_hooks, model, sites: SiteMap, example, tol: float) -> Dict[str, str]:
    def reference(part):
        rows = []
        for gate in part:
            with _passed_through(model, gate):
                rows.append(class_scores(call(model, example), sites.output)[0])
        return rows, None

    def close(hooks, k, gate):
        hooks.per_task(hooks.gate_logits[gate.name])[k] = -1.0
    return _compared(make_hooks, sites, example, sites.gates, tol, close, reference, lambda gate, diff, _: (
        f"a closed gate differs by {diff:.3g} from {gate.members} replaced by a pass-through "
        "(a block that changes its input in place, or a shared module)"))


@torch.no_grad()
def verify(model: nn.Module, sites: SiteMap, example,
           make_hooks: Callable[[SiteMap, Optional[int]], object]) -> Dict[str, Dict[str, str]]:
    """Check facts 1-3 for ``sites`` of ``model`` on the first example of ``example`` (a tensor or a
    tuple/dict of inputs).

    ``make_hooks(sites, tasks)`` attaches :class:`~hookchains.core.attach.ScoreHooks` for ``sites``
    (``tasks=k``: one score set per row of a ``k``-row batch, so up to :data:`CHUNK` sites are checked
    per forward); every set is detached again and the model's modes and flags are restored.
    Returns ``{"filters": {name: reason}, "gates": {name: reason}}`` for the sites that break 2 or 3
    (a layer-span gate shares its name with its conv's filter site).

    Raises:
        InexactModelError: when fact 1 fails (the hooks change the model with everything kept).
    """
    one = map_tensors(lambda t: t[:1], example)
    with explaining(model):
        original = class_scores(call(model, one), sites.output)
        tol = tolerance(original, next(model.parameters()).dtype)
        kept = _hard_rows(make_hooks, sites, one, 1, lambda hooks: None)
        diff = _difference(kept, original)
        if diff > tol:
            raise InexactModelError(
                f"with every score at 1 and every gate open the hooked {type(model).__name__} differs from the "
                f"model by {diff:.3g} (> {tol:.3g}): hookchains cannot explain it exactly (is it random in eval "
                "mode?); please report it")
        return {"filters": _check_filters(make_hooks, model, sites, one, tol),
                "gates": _check_gates(make_hooks, model, sites, one, tol)}
