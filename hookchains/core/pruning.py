"""Physical removal of channels that are exactly zero, with torch-pruning's ``DependencyGraph``.

A channel index of a coupled group (a residual stream, a depthwise conv and its producer, a
concatenation) is removed only when removing it cannot change any output:

* every *producer* in the group (a conv/linear, or the norm layer after it) has that channel folded
  to exactly zero: its weight and bias are 0 there, so the value is 0 for every input (structural);
* every *consumer* (a conv/linear reading the group's channels) reads exactly 0 there on the check
  inputs: this catches an activation with ``f(0) != 0`` (sigmoid), a constant added by an unwrapped
  parameter (position embeddings) or a norm layer's bias on the way;
* no layer in the group normalises across channels (LayerNorm, GroupNorm): removing a zero channel
  changes their mean and variance.

A channel that is zero at its site but stays gets one reason, reported per site (:data:`REASONS`).
The rule follows DESIGN.md ("residual-coupled channels"): torch-pruning has no such rule built in.

Example:
    >>> removal = remove_zero_channels(model, zero_at, normed, inputs, ignored=[model.fc])
    >>> removal.removed["layer1.0.bn1"]    # channels removed at that fold module
    12
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["ChannelRemoval", "REASONS", "remove_zero_channels", "zero_input_channels"]

REASONS = {
    "coupled": "another producer coupled to it (residual stream, concatenation, depthwise) is not zero there",
    "read non-zero": "a consumer reads a non-zero value there (an activation with f(0) != 0, a norm's bias, "
                     "an added parameter)",
    "cross-channel norm": "a LayerNorm/GroupNorm in its group normalises across channels",
    "grouped conv": "a grouped (not depthwise) conv reads or writes its group; torch-pruning cannot resize it "
                    "at arbitrary indices",
    "not prunable": "its channels reach the model output or a layer torch-pruning cannot resize",
    "last channel": "every channel of its group could go, but a layer keeps at least one",
    "torch-pruning error": "torch-pruning failed on its group",
    "exactness fallback": "the pruned module failed the exactness check, so nothing was removed",
}
"""Why a zeroed channel was not removed (the key is what reports print)."""

_CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CROSS_CHANNEL_NAMES = ("LayerNorm", "GroupNorm", "RmsNorm", "RMSNorm")


@dataclass
class ChannelRemoval:
    """What :func:`remove_zero_channels` did, per fold module path (norm, or conv/linear without norm).

    Attributes:
        removed: fold module path -> channels removed there.
        stayed: fold module path -> {reason: zeroed channels that stayed}; reasons are :data:`REASONS` keys.
        errors: one line per torch-pruning failure.
    """

    removed: Dict[str, int] = field(default_factory=dict)
    stayed: Dict[str, Dict[str, int]] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)

    def stay(self, path: str, reason: str, count: int = 1) -> None:
        """Record ``count`` zeroed channels of ``path`` that stayed for ``reason``."""
        if count:
            reasons = self.stayed.setdefault(path, {})
            reasons[reason] = reasons.get(reason, 0) + count


def _is_real(module) -> bool:
    """A module of the user's model (torch-pruning adds pseudo-modules for elementwise/concat/reshape ops)."""
    return isinstance(module, nn.Module) and not type(module).__module__.startswith("torch_pruning")


def _blocking(module) -> Optional[str]:
    """The reason a module stops its whole group from being resized, or None."""
    if isinstance(module, _CROSS_CHANNEL_NORMS) or any(n in type(module).__name__ for n in _CROSS_CHANNEL_NAMES):
        return "cross-channel norm"
    if isinstance(module, _ConvNd) and module.groups > 1 and not module.groups == module.in_channels == module.out_channels:
        return "grouped conv"
    return None


@torch.no_grad()
def zero_input_channels(model: nn.Module, inputs: torch.Tensor) -> Dict[nn.Module, List[bool]]:
    """Conv/linear module -> per input channel, whether it read exactly 0 there on every one of ``inputs``.

    Channels are dim 1 of a conv's input (N x C x ...) and the last dim of a linear's input; a module
    called several times must read 0 at every call."""
    seen: Dict[nn.Module, torch.Tensor] = {}

    def record(module, args):
        x = args[0]
        dim = 1 if isinstance(module, _ConvNd) else x.ndim - 1
        zero = x.detach().movedim(dim, 0).reshape(x.shape[dim], -1).eq(0).all(dim=1)
        seen[module] = zero & seen[module] if module in seen else zero

    layers = [m for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {m: z.tolist() for m, z in seen.items()}


def _group_plan(dg, group, zero_at: Dict[nn.Module, List[bool]], normed: Set[nn.Module],
                reads_zero: Dict[nn.Module, List[bool]]):
    """(removable root indices, {root index: reason it stays}) of one torch-pruning group."""
    reasons: Dict[int, str] = {}
    producers = 0
    for item in group.items:
        module, handler = item.dep.target.module, item.dep.handler
        if not _is_real(module):
            continue  # elementwise/concat/reshape ops and unwrapped parameters: checked at the consumers
        if _blocking(module):
            return set(), {root: _blocking(module) for root in group.items[0].root_idxs}
        if dg.is_out_channel_pruning_fn(handler):
            if module in normed or isinstance(module, nn.PReLU):
                continue  # its output only feeds its folded norm / maps 0 to 0
            zero = zero_at.get(module)
            producers += zero is not None
            for idx, root in zip(item.idxs, item.root_idxs):
                if zero is None or not zero[idx]:
                    reasons.setdefault(root, "coupled")
        else:
            reads = reads_zero.get(module)
            for idx, root in zip(item.idxs, item.root_idxs):
                if reads is None or not reads[idx]:
                    reasons.setdefault(root, "read non-zero")
    if not producers:
        return set(), reasons
    roots = list(group.items[0].root_idxs)
    removable = [root for root in roots if root not in reasons]
    if removable and len(removable) == len(roots):
        reasons[removable.pop()] = "last channel"
    return set(removable), reasons


def _site_counts(dg, group, zero_at: Dict[nn.Module, List[bool]]) -> Dict[nn.Module, Dict[int, int]]:
    """Fold module -> {root index: 1} for each of its zeroed output channels in ``group``."""
    out: Dict[nn.Module, Dict[int, int]] = {}
    for item in group.items:
        produces = _is_real(item.dep.target.module) and dg.is_out_channel_pruning_fn(item.dep.handler)
        zero = zero_at.get(item.dep.target.module) if produces else None
        if zero is not None:
            out.setdefault(item.dep.target.module, {}).update(
                {root: 1 for idx, root in zip(item.idxs, item.root_idxs) if zero[idx]})
    return out


def _plans(dg, model: nn.Module, zero_at, normed, reads_zero, ignored, removal: ChannelRemoval, names):
    """Per group: (root module, handler, removable root indices, {fold path: channels removed})."""
    plans = []
    for group in dg.get_all_groups(ignored_layers=list(ignored)):
        removable, reasons = _group_plan(dg, group, zero_at, normed, reads_zero)
        counted: Dict[str, int] = {}
        for module, roots in _site_counts(dg, group, zero_at).items():
            path = names[module]
            counted[path] = sum(1 for root in roots if root in removable)
            for root in roots:
                if root not in removable:
                    removal.stay(path, reasons.get(root, "coupled"))
        if removable:
            root = group.items[0]
            plans.append((root.dep.target.module, root.dep.handler, sorted(removable), counted))
    return plans


def remove_zero_channels(model: nn.Module, zero_at: Dict[str, Sequence[bool]], normed: Sequence[str],
                         inputs: torch.Tensor, ignored: Sequence[nn.Module] = ()) -> ChannelRemoval:
    """Remove, in place, every channel of ``model`` that is exactly zero wherever it is produced and read.

    Args:
        model: a hook-free module whose removed filters are already folded to zero (weight and bias).
        zero_at: fold module path (the norm after a conv, or a conv/linear without norm) -> per output
            channel, whether it is folded to zero.
        normed: paths of convs/linears whose output only feeds their (folded) norm.
        inputs: a batch (N x ...) the consumers' inputs are checked on; ``inputs[:1]`` traces the graph.
        ignored: modules whose output channels must keep their size (the classifier).

    Returns:
        a :class:`ChannelRemoval` with the channels removed per fold module and why the others stayed.
        The caller checks the pruned module's outputs (torch-pruning can fail silently on rare graphs).
    """
    import torch_pruning as tp
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    zero_mod = {modules[p]: list(z) for p, z in zero_at.items() if p in modules}
    normed_mod = {modules[p] for p in normed if p in modules}
    removal = ChannelRemoval()
    reads_zero = zero_input_channels(model, inputs)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs[:1])
    plans = _plans(dg, model, zero_mod, normed_mod, reads_zero, ignored, removal, names)
    for module, handler, roots, counted in plans:
        try:
            dg.get_pruning_group(module, handler, roots).prune()
            outcome = None
        except Exception as exc:  # torch-pruning cannot resize every layer: those channels stay, zeroed
            removal.errors.append(f"{names.get(module, '?')}: {type(exc).__name__}: {str(exc)[:120]}")
            outcome = "torch-pruning error"
        for path, count in counted.items():
            if outcome:
                removal.stay(path, outcome, count)
            elif count:
                removal.removed[path] = removal.removed.get(path, 0) + count
    for path, zero in zero_at.items():
        seen = removal.removed.get(path, 0) + sum(removal.stayed.get(path, {}).values())
        removal.stay(path, "not prunable", max(0, sum(map(bool, zero)) - seen))
    return removal
