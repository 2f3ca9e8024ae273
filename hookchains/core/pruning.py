"""Physical removal of channels that are exactly zero or constant, with torch-pruning's ``DependencyGraph``.

A channel index of a coupled group (a residual stream, a depthwise conv and its producer, a
concatenation) is removed only when removing it cannot change any output:

* every *producer* in the group (a conv/linear, or the norm layer after it) has that channel folded
  to a fixed value: weight 0 there and bias 0 (zero ablation) or a constant (mean ablation, a dead
  filter; :func:`hookchains.core.ablation.fold_constant_channels`), for every input (structural);
* every *consumer* (a conv/linear reading the group's channels) reads one constant ``k`` there on all
  the check inputs and positions: ``k = 0`` is dropped as is; ``k != 0`` is folded into the consumer's
  bias (``bias += W[:, c] * k``), which is exact for linear layers and 1 x 1, unpadded, ungrouped convs
  only. This catches an activation with ``f(0) != 0`` (sigmoid), a constant added by an unwrapped
  parameter (position embeddings), and padding that makes a constant non-constant at borders;
* no layer in the group normalises across channels (LayerNorm, GroupNorm): removing a channel
  changes their mean and variance;
* no reshape in the group turns its channel axis into the length axis of a single-channel conv (ECA
  attention: ``x.mean((2, 3)).view(N, 1, C)`` into a ``Conv1d(1, 1, k)``): removing a channel would shift
  its neighbours under the kernel. torch-pruning maps such a reshape by expanding every channel index
  ``C`` times, and following that mapping through a network of ECA blocks took minutes per group
  (ecaresnet50t: 122 of 146 s), so the search stops there (:class:`MixingGuard`).

A channel that is zero at its site but stays gets one reason, reported per site (:data:`REASONS`).
The rule follows DESIGN.md ("residual-coupled channels"): torch-pruning has no such rule built in.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    >>> with torch.no_grad():                # filters 1 and 2 folded to zero (weight and bias)
    ...     net[0].weight[1:3] = 0; net[0].bias[1:3] = 0
    >>> removal = remove_zero_channels(net, {"0": [None, 0.0, 0.0, None]}, [], torch.randn(2, 3, 8, 8),
    ...                                ignored=[net[2]])
    >>> removal.removed, net[0].out_channels, net[2].in_channels
    ({'0': 2}, 2, 2)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

__all__ = ["ChannelRemoval", "MixingGuard", "REASONS", "remove_zero_channels", "constant_input_channels"]

REASONS = {
    "coupled": "another producer coupled to it (residual stream, concatenation, depthwise) computes "
               "an input-dependent value there",
    "read non-zero": "a consumer reads a value there that it cannot absorb: not constant (padding, an added "
                     "input-dependent term), or a non-zero constant (an activation with f(0) != 0, a mean) "
                     "read by a layer other than a linear or a 1 x 1 unpadded, ungrouped conv",
    "cross-channel norm": "a LayerNorm/GroupNorm in its group normalises across channels",
    "search limit": "torch-pruning's search of its group went round a cycle of index mappings and was "
                    "stopped (see pruning.SEARCH_STEPS)",
    "split": "its channels are split (q/k/v, CSP halves) by code with sizes of its own, which removing a "
             "channel would break",
    "channel mixing": "a reshape in its group moves the channels onto another axis: the length axis of a "
                      "1-channel conv (ECA attention: removing one would shift its neighbours under the "
                      "kernel) or attention heads (torch-pruning cannot map the indices)",
    "grouped conv": "a grouped (not depthwise) conv reads or writes its group; torch-pruning cannot resize it "
                    "at arbitrary indices",
    "not prunable": "its group has a producer that is never fixed (an unscored layer), reaches the model "
                    "output, or holds a layer torch-pruning cannot resize",
    "last channel": "every channel of its group could go, but a layer keeps at least one",
    "torch-pruning error": "torch-pruning failed on its group",
    "exactness fallback": "removing them broke the forward or changed the outputs (e.g. a reshape or split "
                          "with hard-coded sizes: attention heads), so they stay",
}
"""Why a zeroed channel was not removed (the key is what reports print)."""

#: torch-pruning node types whose resizing may break code with hard-coded sizes: a group that holds one
#: is checked against the reference outputs right after it is pruned, and restored if they changed
_CHECKED_NODES = frozenset({"CONCAT", "SPLIT", "CUSTOMIZED", "MHA", "LSTM", "RESHAPE", "UNBIND", "EXPAND", "SLICE",
                            "EMBED"})
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


class MixingGuard:
    """Stops torch-pruning's group search where a reshape moves channels onto another axis, and records
    that a group reached one (:meth:`take`): at every reshape that feeds (or is fed by) a conv/linear with
    a single channel on the reshaped side (ECA), and wherever a reshape's index mapping would give more
    indices than the widest layer of the model has channels (attention heads split off the channel axis:
    torch-pruning expands every index by the reshape's stride, and chains of such reshapes grow the lists
    without bound -- efficientformerv2_s1 spent minutes there).

    Used as a context manager around the group search: torch-pruning recomputes its index mappings before
    building each group, so the guard wraps that step and replaces such flatten mappings by itself (a
    mapping to no index: the search does not go on) or by a :class:`_Bounded` one."""

    def __init__(self) -> None:
        self.hit: Optional[str] = None
        self._saved: tuple = ()
        self._limit = 0
        self._unmapped: Set = set()  # reshape nodes torch-pruning's shape inference failed on
        self.steps, self.budget = 0, 0  # index mappings applied in the current group's search, and the most allowed

    def __call__(self, idxs, reason: str = "channel mixing") -> list:
        self.hit = self.hit or reason
        return []

    def stop_at_norm(self, idxs) -> list:
        """The mapping into a LayerNorm/GroupNorm: the search stops there (a transformer's residual stream
        reaches every block's norm, and searching all of it took most of mobilevitv2's materialise)."""
        return self(idxs, "cross-channel norm")

    def stop_at_split(self, idxs) -> list:
        """The mapping through a split of the channels: the search stops there (code splits with sizes of
        its own, ``qkv.split([1, d, d])``, which removing a channel breaks; and torch-pruning's search went
        round mobilevitv2's split for 28 s per group)."""
        return self(idxs, "split")

    def take(self) -> Optional[str]:
        """Why the search of the group built last was stopped (a key of :data:`REASONS`), or None; resets."""
        hit, self.hit = self.hit, None
        return hit

    def _guard(self, graph) -> None:
        self._limit = self._limit or max([c for m in graph.module2node for c in _widths(m)] or [1])
        for node in graph.module2node.values():
            unmapped = node in self._unmapped
            if unmapped or node.type.name == "RESHAPE" and (
                    _single_channel(node, "inputs") or _single_channel(node, "outputs")):
                for dep in node.dependencies + [d for n in node.inputs + node.outputs for d in n.dependencies
                                                if d.target is node]:
                    dep.index_mapping = [self if unmapped or _is_flatten(m) else m for m in dep.index_mapping]
            for dep in node.dependencies:
                dep.index_mapping = [_Bounded(m, self._limit, self) if _is_flatten(m) else m
                                     for m in dep.index_mapping]
                if _blocking(dep.target.module) == "cross-channel norm":  # nothing in its group can go
                    dep.index_mapping[0] = self.stop_at_norm
                if any(type(m).__name__ == "_SplitIndexMapping" for m in dep.index_mapping):
                    dep.index_mapping = [self.stop_at_split] * len(dep.index_mapping)
                if not isinstance(dep.index_mapping[0], _Counted):
                    dep.index_mapping[0] = _Counted(dep.index_mapping[0], self)
        self.budget = self.budget or SEARCH_STEPS * sum(len(n.dependencies) for n in graph.module2node.values())

    def __enter__(self) -> MixingGuard:
        from torch_pruning.dependency import index_mapping
        self._saved = original, reshape = index_mapping.update_index_mapping, index_mapping.update_reshape_index_mapping

        def update(graph) -> None:  # called when the graph is built and at the start of each group's search
            self.hit, self.steps = None, 0
            original(graph)
            self._guard(graph)

        def update_reshape(graph, node) -> None:  # its shape inference fails on some graphs (split sizes)
            try:
                reshape(graph, node)
            except Exception:  # noqa: BLE001 -- then the search stops at this reshape
                self._unmapped.add(node)
        index_mapping.update_index_mapping, index_mapping.update_reshape_index_mapping = update, update_reshape
        return self

    def __exit__(self, *exc) -> None:
        from torch_pruning.dependency import index_mapping
        index_mapping.update_index_mapping, index_mapping.update_reshape_index_mapping = self._saved


SEARCH_STEPS = 4
"""A group's search may follow each dependency of the graph this many times on average; beyond that it is
going round a cycle of index mappings (focalnet_tiny_srf: minutes) and is stopped (``search limit``)."""


class _Counted:
    """An index ``mapping`` (or the identity, for None) that counts the steps of the group search."""

    def __init__(self, mapping, guard: MixingGuard) -> None:
        self.mapping, self.guard = mapping, guard

    def __call__(self, idxs) -> list:
        self.guard.steps += 1
        if self.guard.steps > self.guard.budget:
            return self.guard(idxs, "search limit")
        return idxs if self.mapping is None else self.mapping(idxs)


class _Bounded:
    """torch-pruning's flatten index ``mapping``, refused (``guard`` records it, no index is returned) when it
    would give more than ``limit`` indices."""

    def __init__(self, mapping, limit: int, guard: MixingGuard) -> None:
        self.mapping, self.limit, self.guard = mapping, limit, guard

    def __call__(self, idxs) -> list:
        if not self.mapping.reverse and len(idxs) * self.mapping._stride > self.limit:
            return self.guard(idxs)
        return self.mapping(idxs)


def _is_flatten(mapping) -> bool:
    return type(mapping).__name__ == "_FlattenIndexMapping"


def _widths(module) -> List[int]:
    """Input and output channels (features) of a conv/linear; [] for anything else."""
    if isinstance(module, _ConvNd):
        return [module.in_channels, module.out_channels]
    return [module.in_features, module.out_features] if isinstance(module, nn.Linear) else []


def _single_channel(node, side: str, hops: int = 3) -> bool:
    """Whether a conv/linear with one channel towards ``node`` is reached from it on ``side`` (``"inputs"``
    or ``"outputs"``), through at most ``hops`` elementwise ops (an activation between conv and view)."""
    attrs = ("out_channels", "out_features") if side == "inputs" else ("in_channels", "in_features")
    for n in getattr(node, side):
        module = n.module
        if isinstance(module, (_ConvNd, nn.Linear)):
            if getattr(module, attrs[0] if isinstance(module, _ConvNd) else attrs[1]) == 1:
                return True
        elif hops and n.type.name == "ELEMENTWISE" and _single_channel(n, side, hops - 1):
            return True
    return False


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
def constant_input_channels(model: nn.Module, inputs: torch.Tensor) -> Dict[nn.Module, List[Optional[float]]]:
    """Conv/linear module -> per input channel, the one value it read there at every position of every
    one of ``inputs`` (and every call), or None where the values vary.

    Channels are dim 1 of a conv's input (N x C x ...) and the last dim of a linear's input."""
    seen: Dict[nn.Module, List[Optional[float]]] = {}

    def record(module, args):
        x = args[0].detach()
        dim = 1 if isinstance(module, _ConvNd) else x.ndim - 1
        flat = x.movedim(dim, 0).reshape(x.shape[dim], -1)
        high, low = flat.amax(dim=1), flat.amin(dim=1)
        values = [float(h) if h == lo else None for h, lo in zip(high.tolist(), low.tolist())]
        if module in seen:
            values = [v if v == old else None for v, old in zip(values, seen[module])]
        seen[module] = values

    layers = [m for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear))]
    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _absorbs(module: nn.Module) -> bool:
    """Whether a constant input channel folds exactly into ``module``'s bias (linear; 1 x 1 unpadded,
    ungrouped conv)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, _ConvNd) and module.groups == 1 and set(module.kernel_size) == {1}
            and not isinstance(module.padding, str) and set(module.padding) == {0})


def _group_plan(dg, group, fixed_at: Dict[nn.Module, List[Optional[float]]], normed: Set[nn.Module],
                reads: Dict[nn.Module, List[Optional[float]]]):
    """(removable root indices, {root index: reason it stays}, [(consumer, input index, constant read)])
    of one torch-pruning group."""
    reasons: Dict[int, str] = {}
    absorb = []
    producers = 0
    for item in group.items:
        module, handler = item.dep.target.module, item.dep.handler
        if not _is_real(module):
            continue  # elementwise/concat/reshape ops and unwrapped parameters: checked at the consumers
        if _blocking(module):
            return set(), {root: _blocking(module) for root in group.items[0].root_idxs}, []
        if dg.is_out_channel_pruning_fn(handler):
            if module in normed or isinstance(module, nn.PReLU):
                continue  # its output only feeds its folded norm / maps 0 to 0
            fixed = fixed_at.get(module)
            producers += fixed is not None
            for idx, root in zip(item.idxs, item.root_idxs):
                if fixed is None or idx >= len(fixed) or fixed[idx] is None:
                    reasons.setdefault(root, "coupled")
            continue
        read = reads.get(module)
        for idx, root in zip(item.idxs, item.root_idxs):
            k = read[idx] if read is not None and idx < len(read) else None  # a layout it did not read as C
            if k is None or (k != 0 and not _absorbs(module)):
                reasons.setdefault(root, "read non-zero")
            elif k != 0:
                absorb.append((module, idx, k, root))
    if not producers:
        return set(), reasons, []
    roots = list(group.items[0].root_idxs)
    removable = [root for root in roots if root not in reasons]
    if removable and len(removable) == len(roots):
        reasons[removable.pop()] = "last channel"
    return set(removable), reasons, [a[:3] for a in absorb if a[3] in removable]


@torch.no_grad()
def _absorb(absorb) -> None:
    """Fold constant inputs ``k`` at input index ``idx`` into each consumer's bias: ``bias += W[:, idx] * k``."""
    for module, idx, k in absorb:
        weight = module.weight
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if module.bias is None \
            else module.bias  # a new Parameter, not in place: a restored group gets its old bias back
        module.bias = nn.Parameter(bias + weight[:, idx].reshape(weight.shape[0], -1).sum(1) * k,
                                   requires_grad=weight.requires_grad)


def _site_counts(dg, group, fixed_at: Dict[nn.Module, List[Optional[float]]]) -> Dict[nn.Module, Dict[int, int]]:
    """Fold module -> {root index: 1} for each of its fixed (ablated) output channels in ``group``."""
    out: Dict[nn.Module, Dict[int, int]] = {}
    for item in group.items:
        produces = _is_real(item.dep.target.module) and dg.is_out_channel_pruning_fn(item.dep.handler)
        fixed = fixed_at.get(item.dep.target.module) if produces else None
        if fixed is not None:
            out.setdefault(item.dep.target.module, {}).update(
                {root: 1 for idx, root in zip(item.idxs, item.root_idxs) if idx < len(fixed) and fixed[idx] is not None})
    return out


def _prune_items(dg, group, removable: Set[int]) -> None:
    """Prune ``group`` (just built by ``dg``, so its indices are current) at the ``removable`` root indices,
    without building it a second time (building a group dominates the time on large graphs)."""
    from torch_pruning.dependency.group import Group
    chosen = Group()
    chosen._DG = dg
    for item in group.items:
        idxs = [idx for idx, root in zip(item.idxs, item.root_idxs) if root in removable]
        if idxs:
            chosen.add_dep(item.dep, idxs)
    chosen.prune()


def _groups(dg, ignored: Sequence[nn.Module], promising: Set[nn.Module]):
    """torch-pruning's ``get_all_groups`` (conv and linear roots, whole channel range), except that a group
    is built only from a root in ``promising`` (a fixed producer, or a conv feeding its folded norm).

    A channel is removable only where every conv/linear producing the group is fixed there, so a group
    whose first root is not promising has nothing to remove; its members are tried as roots later, and a
    group none of them opens is never built (on large graphs building a group dominates the time)."""
    skip = set(ignored) | set(dg.IGNORED_LAYERS_IN_TRACING)
    visited: Set[nn.Module] = set()
    for module in list(dg.module2node):
        if module in skip or module in visited or module not in promising or \
                not isinstance(module, (_ConvNd, nn.Linear)):
            continue
        pruner = dg.get_pruner_of_module(module)
        channels = None if pruner is None else pruner.get_out_channels(module)
        if channels is None:
            continue
        group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        members = {item.dep.target.module for item in group.items if dg.is_out_channel_pruning_fn(item.dep.handler)}
        visited |= members
        if not members & skip:
            yield group


def _backup(group):
    """What pruning ``group`` changes (each module's parameters, buffers and public attributes such as
    ``out_channels``), when the group holds a node of :data:`_CHECKED_NODES` and no unwrapped parameter;
    else None."""
    targets = [item.dep.target for item in group.items]
    if not any(t.type.name in _CHECKED_NODES for t in targets) or any(t.type.name == "PARAMETER" for t in targets):
        return None
    modules = {t.module for t in targets if isinstance(t.module, nn.Module)}
    return [(m, dict(m._parameters), dict(m._buffers), {k: v for k, v in vars(m).items() if not k.startswith("_")})
            for m in modules]


def _restore(saved) -> None:
    """Undo a group's pruning from :func:`_backup`."""
    for module, parameters, buffers, attributes in saved:
        module._parameters.clear()
        module._parameters.update(parameters)
        module._buffers.clear()
        module._buffers.update(buffers)
        vars(module).update(attributes)


def _remove(dg, group, plan, fixed_at, removal: ChannelRemoval, names,
            check: Optional[Callable[[], bool]] = None) -> None:
    """Record why a group's fixed channels stay; absorb constants and prune the removable ones (and, for a
    group :func:`_backup` saves, put it back unless ``check()`` says the outputs are unchanged)."""
    removable, reasons, absorb = plan
    counted: Dict[str, int] = {}
    for module, roots in _site_counts(dg, group, fixed_at).items():
        path = names[module]
        counted[path] = sum(1 for root in roots if root in removable)
        for root in roots:
            if root not in removable:
                removal.stay(path, reasons.get(root, "coupled"))
    if not removable:
        return
    saved = _backup(group) if check is not None else None
    try:
        _absorb(absorb)
        _prune_items(dg, group, removable)
        failed: Union[bool, str] = saved is not None and check is not None and not check()
    except Exception as exc:  # torch-pruning cannot resize every layer: those channels stay
        removal.errors.append(f"{names.get(group.items[0].dep.target.module, '?')}: {type(exc).__name__}: "
                              f"{str(exc)[:120]}")
        failed = "torch-pruning error"
    if failed:
        if saved is not None:
            _restore(saved)
        for path, count in counted.items():
            removal.stay(path, failed if isinstance(failed, str) else "exactness fallback", count)
        return
    for path, count in counted.items():
        if count:
            removal.removed[path] = removal.removed.get(path, 0) + count


def remove_zero_channels(model: nn.Module, fixed_at: Dict[str, Sequence[Optional[float]]], normed: Sequence[str],
                         inputs: torch.Tensor, ignored: Sequence[nn.Module] = (),
                         check: Optional[Callable[[], bool]] = None) -> ChannelRemoval:
    """Remove, in place, every channel of ``model`` that is fixed (zero or a constant) wherever it is
    produced and that its consumers read as 0 or can absorb into their bias.

    Args:
        model: a hook-free module whose removed filters are already folded (weight 0, bias 0 or a constant).
        fixed_at: fold module path (the norm after a conv, or a conv/linear without norm) -> per output
            channel, its folded value (0.0 for zero ablation, the mean for mean ablation) or None
            where the channel is kept.
        normed: paths of convs/linears whose output only feeds their (folded) norm.
        inputs: a batch (N x ...) the consumers' inputs are checked on; ``inputs[:1]`` traces the graph.
        ignored: modules whose output channels must keep their size (the classifier).
        check: called after pruning a group that passes through a reshape, split, concatenation or
            other op torch-pruning may resize wrongly (:data:`_CHECKED_NODES`): whether ``model`` still
            gives the reference outputs. If not, that group is put back and its channels stay
            (``exactness fallback``), instead of the whole model falling back.

    Returns:
        a :class:`ChannelRemoval` with the channels removed per fold module and why the others stayed.
        A group torch-pruning fails on may be left half-resized, with constants already folded into
        its consumers: the caller must check the outputs (and fall back to the unpruned module).
    """
    import torch_pruning as tp
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    fixed_mod = {modules[p]: list(v) for p, v in fixed_at.items() if p in modules}
    normed_mod = {modules[p] for p in normed if p in modules}
    removal = ChannelRemoval()
    reads = constant_input_channels(model, inputs)
    promising = {m for m in fixed_mod if any(v is not None for v in fixed_mod[m])} | normed_mod
    with MixingGuard() as guard:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs[:1])
        for group in _groups(dg, ignored, promising):  # groups are built after earlier prunes
            stopped = guard.take()
            plan = (set(), dict.fromkeys(group.items[0].root_idxs, stopped), []) if stopped else \
                _group_plan(dg, group, fixed_mod, normed_mod, reads)
            _remove(dg, group, plan, fixed_mod, removal, names, check)
    for path, fixed in fixed_at.items():
        seen = removal.removed.get(path, 0) + sum(removal.stayed.get(path, {}).values())
        removal.stay(path, "not prunable", max(0, sum(v is not None for v in fixed) - seen))
    return removal
