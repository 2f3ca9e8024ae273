"""Graph facts about a model, read once: which module runs, with what shapes, feeding what.

Two sources, as docs/design.md prescribes:

* ``torch.fx`` (with timm's registered leaf modules and functions) gives the true users of every
  module output, so "the norm that follows a conv" means the conv's *only* consumer;
* when a model does not trace, one probe forward pass with hooks on every module records input and
  output tensors; a norm follows a conv when it is the only module that consumes the conv's output.

Shapes always come from the probe pass (fx gives no shapes without running anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from hookchains.inputs.forward import Selector, call, select

__all__ = ["ModuleCall", "ModelGraph", "read_graph", "NORM_TYPES", "SCORED_TYPES", "is_container", "is_norm"]

NORM_TYPES: Tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)
SCORED_TYPES: Tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CONTAINER_TYPES: Tuple[type, ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_container(module: nn.Module) -> bool:
    """A plain container (Sequential/ModuleList/ModuleDict) rather than a layer with its own forward."""
    return type(module) in CONTAINER_TYPES or (isinstance(module, nn.Sequential)
                                                and type(module).forward is nn.Sequential.forward)


def is_norm(module: nn.Module) -> bool:
    """An affine per-channel norm (BatchNorm, GroupNorm, timm LayerNorm2d): where a conv's score sits."""
    if isinstance(module, NORM_TYPES):
        return getattr(module, "affine", True) and getattr(module, "weight", None) is not None
    # timm LayerNorm2d: per-channel affine over a channels-first tensor.
    return type(module).__name__ in {"LayerNorm2d"} and getattr(module, "weight", None) is not None


@dataclass
class ModuleCall:
    """What one module did in the probe pass (first call only; ``calls`` counts them all, ``args`` is
    the number of inputs it took: only single-input modules can be replaced by ``nn.Identity``;
    ``tensor_out`` whether it returned one plain tensor, not a tuple or dict)."""

    path: str
    order: int
    in_shape: Optional[Tuple[int, ...]]
    out_shape: Optional[Tuple[int, ...]]
    calls: int = 1
    args: int = 1
    tensor_out: bool = True


@dataclass
class ModelGraph:
    """Facts adapters build sites from.

    Attributes:
        calls: module path -> :class:`ModuleCall`, for every module that ran.
        follower: conv/linear path -> path of the affine norm that is its only consumer.
        output_module: path of the module whose output is the model's output (if any).
        discovery: ``"fx"`` or ``"probe"``.
        reason: why fx was not used (empty when it was).
    """

    calls: Dict[str, ModuleCall]
    follower: Dict[str, str]
    output_module: Optional[str]
    discovery: str
    reason: str = ""


def _first_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _probe(model: nn.Module, example, selector: Selector = None):
    calls: Dict[str, ModuleCall] = {}
    produced: Dict[int, str] = {}
    consumers: Dict[int, List[str]] = {}
    keep: List[torch.Tensor] = []  # keeps tensors alive so ids stay unique during the pass
    handles = []

    def make_hook(path: str):
        def hook(module, args, kwargs, output):
            x, y = _first_tensor(args), _first_tensor(output)
            if path in calls:
                calls[path].calls += 1
                return
            inputs = len(args) + len(kwargs)  # nn.Identity takes exactly one positional input
            calls[path] = ModuleCall(path, len(calls), tuple(x.shape) if x is not None else None,
                                     tuple(y.shape) if y is not None else None, args=inputs,
                                     tensor_out=isinstance(output, torch.Tensor))
            if x is not None:
                consumers.setdefault(id(x), []).append(path)
                keep.append(x)
            if y is not None and next(module.children(), None) is None:
                produced[id(y)] = path
                keep.append(y)
        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(make_hook(path), with_kwargs=True))
    try:
        with torch.no_grad():
            out = select(call(model, example), selector)
    finally:
        for h in handles:
            h.remove()
    output_module = produced.get(id(out))
    return calls, produced, consumers, output_module


def _followers_from_probe(model, calls, produced, consumers) -> Dict[str, str]:
    modules = dict(model.named_modules())
    follower = {}
    for tensor_id, path in produced.items():
        if not isinstance(modules[path], SCORED_TYPES):
            continue
        users = consumers.get(tensor_id, [])
        leaf_users = [u for u in users if next(modules[u].children(), None) is None or is_norm(modules[u])]
        if len(leaf_users) == 1 and is_norm(modules[leaf_users[0]]):
            follower[path] = leaf_users[0]
    return follower


def _followers_from_fx(model: nn.Module) -> Dict[str, str]:
    """Trace with timm's leaf modules/functions; raise if the model does not trace."""
    from torch import fx
    try:
        from timm.layers import _fx as timm_fx
        leaves = tuple(timm_fx.get_notrace_modules())
        autowrap = tuple(timm_fx.get_notrace_functions())
    except Exception:  # timm missing or API moved: plain fx
        leaves, autowrap = (), ()
    modules = dict(model.named_modules())

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or is_norm(m) or super().is_leaf_module(m, qualname)

    tracer = _Tracer(autowrap_functions=autowrap)
    graph = tracer.trace(model)
    norms: Dict[str, List[Optional[str]]] = {}  # per conv: the norm after each of its calls (None: no sole norm)
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), SCORED_TYPES):
            continue
        users = list(node.users)
        sole_norm = (len(users) == 1 and users[0].op == "call_module"
                     and is_norm(modules.get(users[0].target, nn.Identity())))
        norms.setdefault(node.target, []).append(users[0].target if sole_norm else None)
    # a conv called several times (two views, each with its own norm) has a follower only when every
    # call feeds the same norm: a score on one of several norms would reach only one use
    return {conv: found[0] for conv, found in norms.items() if found[0] is not None and len(set(found)) == 1}


def read_graph(model: nn.Module, example, use_fx: bool = True, selector: Selector = None) -> ModelGraph:
    """Probe ``model`` once on ``example`` (a tensor, or a tuple/dict of inputs) and, when it traces,
    read conv->norm pairs from fx. ``selector`` picks the class scores from the output
    (:func:`hookchains.inputs.forward.select`).

    Example:
        >>> import torchvision
        >>> g = read_graph(torchvision.models.resnet18().eval(), torch.zeros(1, 3, 224, 224))
        >>> g.follower["layer1.0.conv1"]
        'layer1.0.bn1'
    """
    calls, produced, consumers, output_module = _probe(model, example, selector)
    if use_fx:
        try:
            follower = _followers_from_fx(model)
            return ModelGraph(calls, follower, output_module, "fx")
        except Exception as exc:  # any tracing failure -> documented probe fallback
            reason = f"torch.fx could not trace the model ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    else:
        reason = "fx disabled"
    follower = _followers_from_probe(model, calls, produced, consumers)
    return ModelGraph(calls, follower, output_module, "probe", reason)
