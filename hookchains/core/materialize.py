"""Turn a :class:`~hookchains.Subnetwork` into a real, smaller ``nn.Module`` with the same outputs.

Steps, on a deep copy of the model (docs/design.md's measured decisions), with re-parametrised weights
(``torch.nn.utils.parametrize``, spectral/weight norm) baked in and, for a bfloat16/float16 model, in float32:

1. **fold** each filter site's thresholded score ``S * [S >= tau]`` into the affine parameters of its
   norm layer (or into the conv/linear weight and bias when no norm follows), so a removed filter's
   output is exactly 0 and a kept one is the original filter scaled by its score (Eq. 3); under mean
   ablation a removed filter's norm outputs its mean instead (:mod:`hookchains.core.ablation`);
2. **cut** every removed gated layer/block: its modules become ``nn.Identity`` (exact, since a gate
   site's output shape equals its input shape, Eq. 7 with ``G = 0``);
3. **prune** physically (:mod:`hookchains.core.pruning`, torch-pruning's ``DependencyGraph`` built on the
   folded, cut, hook-free copy): a channel of a coupled group (residual streams, depthwise convs,
   concatenations) is removed where every producer in the group is fixed there (0 or a constant) and
   every consumer reads 0 or a constant it absorbs into its bias; the report says per site why the
   other zeroed channels stay;
4. **check** the contract: on the given images and a seeded random batch, the module's logits equal the
   thresholded hooked network's within ``1e-4 * max|logit|``. If physical pruning broke it (or
   torch-pruning cannot handle the model), the zero-only module of steps 1-2 is checked and returned
   instead, with the reason recorded; if that fails too, :class:`MaterializeError` is raised. A
   low-precision model is cast back and checked again in its dtype.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from hookchains.core.ablation import fold_constant_channels
from hookchains.core.attach import ScoreHooks, strip_hooks
from hookchains.core.pruning import ChannelRemoval, remove_zero_channels
from hookchains.core.result import TOLERANCE, MaterializeError, check_exact, exactness_limit
from hookchains.core.state import PassThrough, tensor_of
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.forward import call, class_scores, map_tensors

__all__ = ["materialize", "MaterializeError", "MaterializeReport", "TOLERANCE"]  # the check: core.result


@dataclass
class MaterializeReport:
    """Physical facts of a materialised module (next to the paper's counts in ``Subnetwork.counts``).

    ``pruned`` is true when channels were actually removed (``channels_removed > 0``; a removed block
    counts through its channels). ``sites`` maps each filter site to ``{"channels", "zeroed", "removed",
    "stayed": {reason: count}}`` (and ``"cut": True`` when its block was replaced by an identity);
    reasons are the keys of :data:`hookchains.pruning.REASONS`.

    A bfloat16/float16 model is folded, pruned and checked in float32 (``max_abs_diff``, ``tolerance``),
    then cast back to its ``dtype`` and checked again against the hooked model run in that dtype
    (``notes`` gives that difference and its tolerance, 8 x the dtype's epsilon x max|logit|)."""

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
    channels_removed: int = 0
    sites: Dict[str, Dict] = field(default_factory=dict)
    dtype: str = "float32"

    def stayed(self) -> Dict[str, int]:
        """Zeroed channels that were not removed, summed over sites per reason (keys of ``pruning.REASONS``)."""
        total: Dict[str, int] = {}
        for entry in self.sites.values():
            for reason, count in entry["stayed"].items():
                total[reason] = total.get(reason, 0) + count
        return total


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


def _bake_parametrizations(model: nn.Module) -> nn.Module:
    """Replace re-parametrised weights (``torch.nn.utils.parametrize``, e.g. ``parametrizations.spectral_norm``
    / ``weight_norm``, and the older hook-based ``spectral_norm`` / ``weight_norm``) of a *copy* by the
    weights they compute in eval mode, in place, so scores folded into ``.weight`` are not recomputed away.

    ``parametrize.remove_parametrizations`` would delete the property from the parametrised class, which
    a deep copy shares with the user's model; the copy is switched back to its original class instead."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if parametrize.is_parametrized(module):
                parametrizations = module.get_submodule("parametrizations")
                values = {name: getattr(module, name) for name, _ in parametrizations.named_children()}
                grads = {name: any(q.requires_grad for q in p.parameters()) for name, p in parametrizations.named_children()}
                module.__class__ = type(module).__bases__[0]
                del module._modules["parametrizations"]
                for name, value in values.items():
                    module.register_parameter(name, nn.Parameter(value.detach().clone(), grads[name]))
            for key, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, (SpectralNorm, WeightNorm)):
                    hook.remove(module)
                    del module._forward_pre_hooks[key]
    return model


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _dtype_tolerance(dtype: torch.dtype, tolerance: float) -> float:
    """Relative tolerance for outputs computed in ``dtype``: 8 x its machine epsilon (bfloat16 0.0625,
    float16 0.0078), never below ``tolerance``. Folding a score into a weight rounds differently from
    scaling the activation (measured on timm resnet18 / mobilenetv2_100 at 50 % kept: at most 0.64 x eps)."""
    return max(tolerance, 8 * torch.finfo(dtype).eps) if dtype in (torch.float16, torch.bfloat16) else tolerance


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
        scaled = scaled if isinstance(scaled, torch.Tensor) and scaled.shape[0] == site.channels else tensor_of(module)
        m = mult[site.name].to(scaled.device, scaled.dtype)
        scaled.mul_(m.view((-1,) + (1,) * (scaled.ndim - 1)))
        if getattr(module, "bias", None) is not None:
            tensor_of(module, "bias").mul_(m)


def _fold_means(model: nn.Module, sub: Subnetwork, mult: Dict[str, torch.Tensor]) -> None:
    """Mean ablation: each removed filter's fold module outputs the filter's mean (exact, in place)."""
    constants = {}
    for site in sub.sites.filters:
        removed = torch.nonzero(mult[site.name] == 0).flatten().tolist()
        if not removed:
            continue
        if site.hook_module != site.fold_module:
            raise MaterializeError(f"mean ablation at {site.name}: its scores act on {site.hook_module}'s output "
                                   f"(after an activation) but fold into {site.fold_module}, so the mean cannot be "
                                   "folded exactly; fit with ablation='zero' for this model")
        constants[site.fold_module] = {c: float(sub.means[site.name][c]) for c in removed}
    fold_constant_channels(model, constants)


def _cut(model: nn.Module, sub: Subnetwork) -> None:
    removed = set(sub.removed_gates)
    for gate in sub.sites.gates:
        if gate.name in removed:
            for i, path in enumerate(gate.members):  # the first copies H: a later ``+=`` must not write into it
                parent, _, name = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, name, PassThrough() if i == 0 else nn.Identity())


def _channel_count(model: nn.Module) -> int:
    """Output channels of every conv (1-D, 2-D, 3-D) and output units of every linear layer."""
    return sum(m.out_channels if isinstance(m, _ConvNd) else m.out_features
               for m in model.modules() if isinstance(m, (_ConvNd, nn.Linear)))


def _fixed_plan(model: nn.Module, sub: Subnetwork, mult: Dict[str, torch.Tensor]):
    """(fold path -> per channel the value a removed filter was folded to (0, or its mean under mean
    ablation) or None where kept, paths of convs whose output only feeds their norm) for the filter
    sites still in ``model`` (sites inside a cut block are gone with it)."""
    fixed_at, normed = {}, []
    for site in sub.sites.filters:
        try:
            model.get_submodule(site.fold_module)
        except AttributeError:
            continue
        means = sub.means.get(site.name) if sub.ablation == "mean" else None
        fixed_at[site.fold_module] = [None if m else (0.0 if means is None else float(means[c]))
                                      for c, m in enumerate(mult[site.name].tolist())]
        if site.fold_module != site.name:
            normed.append(site.name)
    return fixed_at, normed


def _site_report(sub: Subnetwork, mult: Dict[str, torch.Tensor], removal: Optional[ChannelRemoval],
                 fallback: Optional[str]) -> Dict[str, Dict]:
    """Per filter site: channels, zeroed, removed, and {reason: count} for zeroed channels that stayed."""
    cut = {f for g in sub.sites.gates if g.name in set(sub.removed_gates) for f in g.filter_sites}
    out = {}
    for site in sub.sites.filters:
        zeroed = int((mult[site.name] == 0).sum())
        entry = {"channels": site.channels, "zeroed": zeroed, "removed": 0, "stayed": {}}
        if site.name in cut:
            entry.update(removed=site.channels, cut=True)
        elif removal is None:
            entry["stayed"] = {fallback: zeroed} if zeroed else {}
        else:
            entry["removed"] = removal.removed.get(site.fold_module, 0)
            entry["stayed"] = dict(removal.stayed.get(site.fold_module, {}))
        out[site.name] = entry
    return out


def _reference_logits(model: nn.Module, sub: Subnetwork, inputs: torch.Tensor, mode: str) -> torch.Tensor:
    chains = ScoreHooks(model, sub.sites, tau=sub.tau, temperature=sub.temperature, score_max=None)
    try:
        chains.load_state(sub.scores, sub.gate_logits)
        chains.means = dict(sub.means) if sub.ablation == "mean" else {}
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
        parts.insert(0, images[:8].to(device).float())  # checked in float32; cast for a low-precision model
    return torch.cat([p for p in parts if p.shape[1:] == parts[-1].shape[1:]])


def _logits(module: nn.Module, inputs: torch.Tensor, sub: Subnetwork) -> torch.Tensor:
    with torch.no_grad():
        return class_scores(call(module, inputs), sub.sites.output)


def _diff(module: nn.Module, inputs: torch.Tensor, reference: torch.Tensor, sub: Subnetwork) -> float:
    return float((_logits(module, inputs, sub) - reference).abs().max())


def _physical(work: nn.Module, sub: Subnetwork, mult: Dict[str, torch.Tensor], inputs: torch.Tensor,
              reference: torch.Tensor, limit: float):
    """(module, ChannelRemoval or None, notes): ``work`` with zero channels removed when that stays within
    ``limit`` of ``reference``; otherwise ``work`` itself (zeroed, not removed) and the reason."""
    candidate = _copy_model(work)
    fixed_at, normed = _fixed_plan(candidate, sub, mult)
    ignored = [candidate.get_submodule(sub.sites.classifier)] if sub.sites.classifier else []
    def still_exact() -> bool:
        try:
            return _diff(candidate, inputs, reference, sub) <= limit
        except Exception:  # noqa: BLE001 -- a layer resized inconsistently: not exact
            return False

    try:
        removal = remove_zero_channels(candidate, fixed_at, normed, inputs, ignored, still_exact)
    except Exception as exc:  # torch-pruning cannot trace every graph: keep the exact zeroed module
        return work, None, [f"torch-pruning failed ({type(exc).__name__}: {str(exc)[:160]}); "
                            "channels are zeroed, not removed"]
    notes = [f"torch-pruning failed on a group: {line}" for line in removal.errors[:3]]
    try:
        diff = _diff(candidate, inputs, reference, sub)
    except Exception as exc:  # a layer torch-pruning resized inconsistently
        return work, None, notes + [f"the pruned module failed to run ({type(exc).__name__}): physical pruning "
                                    "changed the outputs; returned the zeroed (unpruned) module"]
    if diff > limit:
        return work, None, notes + ["physical pruning changed the outputs; returned the zeroed (unpruned) module"]
    return candidate, removal, notes


def _check_dtype(module: nn.Module, inputs, reference: torch.Tensor, tolerance: float,
                 report: MaterializeReport, sub: Subnetwork) -> nn.Module:
    """``module`` (cast to the model's low-precision dtype) if it matches ``reference`` (the hooked model
    in that dtype) within ``tolerance`` x max|logit|; the figures go into ``report.notes``."""
    diff = check_exact(_logits(module, inputs, sub), reference, tolerance, what=f"in {report.dtype} the materialised "
                       "module", advice="materialise a float32 copy (model.float()) instead")
    report.notes.append(f"{report.dtype}: outputs differ from the hooked model in {report.dtype} by {diff:.3g} "
                        f"(rounding; tolerance {tolerance:g} x max|logit| = {exactness_limit(reference, tolerance):.3g}); "
                        "exact in float32")
    return module


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
    work = _bake_parametrizations(strip_hooks(_copy_model(model)))
    dtype, device = _float_dtype(work), next(work.parameters()).device
    inputs = _check_inputs(sub, images, device)
    mode = "hard" if fold_scores else "mask"
    low_inputs = map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, inputs)
    low = None if dtype == torch.float32 else _reference_logits(work, sub, low_inputs, mode)
    work.float()  # fold, prune and check the structure in float32; cast back at the end
    reference = _reference_logits(work, sub, inputs, mode)
    limit = exactness_limit(reference, tolerance)
    mult = _multipliers(sub, fold_scores)
    example = map_tensors(lambda t: t[:1], inputs)
    macs_before, params_before = tp.utils.count_ops_and_params(work, example)
    channels_before = _channel_count(work)
    _fold(work, sub, mult)
    if sub.ablation == "mean":
        _fold_means(work, sub, mult)
    _cut(work, sub)
    result, removal, notes = work, None, []
    fallback = "exactness fallback" if prune else None
    if prune:
        result, removal, notes = _physical(work, sub, mult, inputs, reference, limit)
        fallback = "exactness fallback" if notes and "changed the outputs" in notes[-1] else "torch-pruning error"
    diff = check_exact(_logits(result, inputs, sub), reference, tolerance, advice="please report this model")
    macs_after, params_after = tp.utils.count_ops_and_params(_detach_caches(result), example)
    channels_after = _channel_count(result)
    report = MaterializeReport(channels_after < channels_before, channels_before, channels_after,
                               int(params_before), int(params_after), int(macs_before), int(macs_after), diff,
                               limit, fold_scores, notes, channels_before - channels_after,
                               _site_report(sub, mult, removal, fallback), str(dtype).replace("torch.", ""))
    if low is not None:
        result = _check_dtype(result.to(dtype), low_inputs, low, _dtype_tolerance(dtype, tolerance), report, sub)
    return result.eval(), report
