"""Turn a :class:`~hookchains.Subnetwork` into a real, smaller ``nn.Module`` with the same outputs.

Steps, on a deep copy of the model (docs/design.md's measured decisions):

1. **fold** each filter site's thresholded score ``S * [S >= tau]`` into the affine parameters of its
   norm layer (or into the conv/linear weight and bias when no norm follows), so a removed filter's
   output is exactly 0 and a kept one is the original filter scaled by its score (Eq. 3);
2. **cut** every removed gated layer/block: its modules become ``nn.Identity`` (exact, since a gate
   site's output shape equals its input shape, Eq. 7 with ``G = 0``);
3. **prune** physically with torch-pruning's ``DependencyGraph``, built on the folded, cut, hook-free
   copy: a channel index of a coupled group (residual streams, depthwise convs, concatenations) is
   removed only where *every* producer in the group outputs exactly 0 there and no layer in the group
   normalises across channels; other channels stay, zeroed;
4. **check** the contract: on the given images and a seeded random batch, the module's logits equal the
   thresholded hooked network's within ``1e-4 * max|logit|``. If physical pruning broke it (or
   torch-pruning cannot handle the model), the zero-only module of steps 1-2 is checked and returned
   instead, with the reason recorded; if that fails too, :class:`MaterializeError` is raised.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import torch
from torch import nn

from hookchains.core.attach import ScoreHooks, strip_hooks
from hookchains.core.state import PassThrough
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.forward import call, class_scores, map_tensors

__all__ = ["materialize", "MaterializeError", "MaterializeReport", "TOLERANCE"]

TOLERANCE = 1e-4
_CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm)


class MaterializeError(RuntimeError):
    """The materialised module does not reproduce the thresholded network."""


@dataclass
class MaterializeReport:
    """Physical facts of a materialised module (next to the paper's counts in ``Subnetwork.counts``)."""

    pruned: bool
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    max_abs_diff: float
    tolerance: float
    fold_scores: bool
    notes: List[str] = field(default_factory=list)


def _cached_tensors(model: nn.Module):
    """(container, key, tensor) of every non-leaf tensor a module caches between calls (e.g. timm
    LeViT's attention-bias cache, filled by a forward pass with gradients on): deepcopy refuses them."""
    for module in model.modules():
        for name, value in list(module.__dict__.items()):
            container = value if isinstance(value, dict) else module.__dict__
            for key, t in (list(value.items()) if isinstance(value, dict) else [(name, value)]):
                if isinstance(t, torch.Tensor) and not t.is_leaf:
                    yield container, key, t


def _copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of a user's model that also works when it caches non-leaf tensors."""
    return copy.deepcopy(model, {id(t): t.detach().clone() for _, _, t in _cached_tensors(model)})


def _detach_caches(model: nn.Module) -> nn.Module:
    """Detach cached non-leaf tensors of one of our own copies in place (torch-pruning deep-copies it)."""
    for container, key, t in list(_cached_tensors(model)):
        container[key] = t.detach()
    return model


def _multipliers(sub: Subnetwork, fold_scores: bool) -> Dict[str, torch.Tensor]:
    out = {}
    for site in sub.sites.filters:
        s = sub.scores[site.name].float()
        keep = (s >= sub.tau).float()
        out[site.name] = s * keep if fold_scores else keep
    return out


@torch.no_grad()
def _fold(model: nn.Module, sub: Subnetwork, mult: Dict[str, torch.Tensor]) -> None:
    for site in sub.sites.filters:
        module = model.get_submodule(site.fold_module)
        # weight-standardised convs (timm StdConv/ScaledStdConv) normalise their weight per output
        # channel, so a scale folded into it would vanish: their per-channel ``gain`` takes it instead
        scaled = getattr(module, "gain", None)
        scaled = scaled if isinstance(scaled, torch.Tensor) and scaled.shape[0] == site.channels else module.weight
        m = mult[site.name].to(scaled.device, scaled.dtype)
        scaled.mul_(m.view((-1,) + (1,) * (scaled.ndim - 1)))
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(m)


def _cut(model: nn.Module, sub: Subnetwork) -> None:
    removed = set(sub.removed_gates)
    for gate in sub.sites.gates:
        if gate.name in removed:
            for i, path in enumerate(gate.members):  # the first copies H: a later ``+=`` must not write into it
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, name, PassThrough() if i == 0 else nn.Identity())


def _channel_count(model: nn.Module) -> int:
    return sum(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
               for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))


def _zero_plan(dg, group, zero_at: Dict[nn.Module, List[bool]], normed: Set[nn.Module]) -> List[int]:
    """Root indices of ``group`` at which every producer outputs exactly zero.

    ``zero_at`` maps each fold module (norm, or conv/linear without norm) to its zeroed channels;
    ``normed`` holds convs/linears whose output only feeds their (folded) norm."""
    removable = None
    for item in group.items:
        dep, module = item.dep, item.dep.target.module
        if not isinstance(module, nn.Module):
            continue  # elementwise/concat/split ops carry no values of their own
        if isinstance(module, _CROSS_CHANNEL_NORMS) or type(module).__name__ == "LayerNorm2d":
            return []
        if not dg.is_out_channel_pruning_fn(dep.handler) and not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue  # a consumer: removing its input slice of zeros changes nothing
        zero = zero_at.get(module)
        if zero is None:
            if module in normed:
                continue  # its output only feeds its norm, which is in the group
            return []
        here = {root for idx, root in zip(item.idxs, item.root_idxs) if zero[idx]}
        removable = here if removable is None else removable & here
    return sorted(removable or [])


def _prune(model: nn.Module, sub: Subnetwork, mult: Dict[str, torch.Tensor], example: torch.Tensor) -> None:
    import torch_pruning as tp
    zero_at: Dict[nn.Module, List[bool]] = {}  # plain lists: indexed per channel below
    normed: Set[nn.Module] = set()
    for site in sub.sites.filters:
        try:
            fold = model.get_submodule(site.fold_module)
        except AttributeError:
            continue  # inside a cut gate
        zero_at[fold] = (mult[site.name] == 0).tolist()
        if site.fold_module != site.name:
            normed.add(model.get_submodule(site.name))
    ignored = [model.get_submodule(sub.sites.classifier)] if sub.sites.classifier else []
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    plans = []
    for group in dg.get_all_groups(ignored_layers=ignored):
        idxs = _zero_plan(dg, group, zero_at, normed)
        if idxs and len(idxs) < len(group.items[0].idxs):
            plans.append((group.items[0].dep.target.module, group.items[0].dep.handler, idxs))
    for module, handler, idxs in plans:
        dg.get_pruning_group(module, handler, idxs).prune()


def _reference_logits(model: nn.Module, sub: Subnetwork, inputs: torch.Tensor, mode: str) -> torch.Tensor:
    chains = ScoreHooks(model, sub.sites, tau=sub.tau, temperature=sub.temperature, score_max=None)
    try:
        chains.load_state(sub.scores, sub.gate_logits)
        with torch.no_grad(), chains.using(mode):
            return class_scores(call(model, inputs), sub.sites.output)
    finally:
        chains.detach()


def _check_inputs(sub: Subnetwork, images, device):
    if images is not None and not isinstance(images, torch.Tensor):  # several inputs: the given ones only
        return map_tensors(lambda t: t[:8].to(device), images)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((2, *sub.sites.input_shape[1:]), generator=gen)
    parts = [noise.to(device)]
    if images is not None:
        parts.insert(0, images[:8].to(device).float())
    return torch.cat([p for p in parts if p.shape[1:] == parts[-1].shape[1:]])


def _diff(module: nn.Module, inputs: torch.Tensor, reference: torch.Tensor, sub: Subnetwork) -> float:
    with torch.no_grad():
        return float((class_scores(call(module, inputs), sub.sites.output) - reference).abs().max())


def materialize(sub: Subnetwork, model: nn.Module, images: Optional[torch.Tensor] = None, *,
                fold_scores: bool = True, prune: bool = True, tolerance: float = TOLERANCE):
    """Build the sub-network as a real module; returns ``(module, MaterializeReport)``.

    Args:
        sub: the thresholded result of :func:`hookchains.core.fit`.
        model: the original model (left untouched; hooks attached to it are ignored).
        images: inputs the exactness check runs on besides a seeded random batch (e.g. the task's).
        fold_scores: fold kept scores into the weights (default, equals the thresholded network);
            ``False`` keeps kept filters at scale 1 (the binary sub-network of Eq. 1).
        prune: physically remove channels with torch-pruning (``False``: zero them only).
        tolerance: relative tolerance of the exactness check.

    Example:
        >>> import timm, torch
        >>> from hookchains.core.testing import random_subnetwork
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> result = random_subnetwork(model, images[:1], keep=0.5)     # or hookchains.fit(...)
        >>> small, report = materialize(result, model, images)
        >>> report.params_after < report.params_before
        True
    """
    import torch_pruning as tp
    work = strip_hooks(_copy_model(model)).eval()
    device = next(work.parameters()).device
    inputs = _check_inputs(sub, images, device)
    reference = _reference_logits(work, sub, inputs, "hard" if fold_scores else "mask")
    scale = max(float(reference.abs().max()), 1e-12)
    mult = _multipliers(sub, fold_scores)
    example = map_tensors(lambda t: t[:1], inputs)
    macs_before, params_before = tp.utils.count_ops_and_params(work, example)
    channels_before = _channel_count(work)
    _fold(work, sub, mult)
    _cut(work, sub)
    notes: List[str] = []
    result, pruned = work, False
    if prune:
        candidate = _copy_model(work)
        try:
            _prune(candidate, sub, mult, example)
            if _diff(candidate, inputs, reference, sub) <= tolerance * scale:
                result, pruned = candidate, True
            else:
                notes.append("physical pruning changed the outputs; returned the zeroed (unpruned) module")
        except Exception as exc:  # torch-pruning cannot handle every graph: keep the exact zeroed module
            notes.append(f"torch-pruning failed ({type(exc).__name__}: {str(exc)[:160]}); channels are zeroed, not removed")
    diff = _diff(result, inputs, reference, sub)
    if diff > tolerance * scale:
        raise MaterializeError(f"materialised module differs from the thresholded network by {diff:.3g} "
                               f"(> {tolerance:g} x max|logit| = {tolerance * scale:.3g}); please report this model")
    macs_after, params_after = tp.utils.count_ops_and_params(_detach_caches(result), example)
    report = MaterializeReport(pruned, channels_before, _channel_count(result), int(params_before),
                               int(params_after), int(macs_before), int(macs_after), diff,
                               tolerance * scale, fold_scores, notes)
    return result.eval(), report
