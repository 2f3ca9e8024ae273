"""Score multipliers folded into the affine parameters of the norm layer they follow.

Most filter sites are scored after the norm that follows the conv (:class:`~hookchains.core.sites.FilterSite`,
``hook_module``). A norm's affine output is ``gamma * n(x) + beta`` per channel, so multiplying it by
the channel's score ``v`` is the same as running the norm with ``v * gamma`` and ``v * beta``::

    v * (gamma * n(x) + beta) == (v * gamma) * n(x) + (v * beta)

Run that way (:func:`torch.func.functional_call` swaps the two tensors for one call; the model's own
parameters are never written), a fit step no longer multiplies every featuremap by its scores and
backpropagates through the product: the norm's backward, which runs anyway, yields the score
gradients as its ``gamma``/``beta`` gradients. Measured on this 2-core CPU (``benchmarks/bench_extract.py``,
figures in the CHANGELOG): the same scores, KL within float rounding, at a fraction of the step's time.

Folded, when the norm's affine weight has one entry per scored channel and no other module shares it:

* a hook on the output of a module of exactly one of the :data:`FOLDABLE_NORMS` classes: ``BatchNorm1d/2d/3d``,
  ``SyncBatchNorm``, ``GroupNorm`` and timm's ``LayerNorm2d`` (channels on dim 1), ``LayerNorm`` over the
  channel dimension alone (channels last);
* a hook on the ``drop`` (an ``nn.Identity``) of one of timm's norm + activation modules
  (:data:`TIMM_NORM_ACT`: ``BatchNormAct2d`` and kin), which runs norm, ``drop``, activation: the site
  scores the norm's output before the activation.

Nothing else is folded, subclasses included: a module that applies its activation after the affine
part and is hooked on its output is scored after the activation, and ``v * act(y) != act(v * y)`` for
ReLU6, SiLU or GELU. Nor is anything in a TorchScript or ``nn.DataParallel`` model
(:func:`torch.func.functional_call` refuses them).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Iterable, Optional

import torch
from timm.layers import norm as timm_norm
from timm.layers import norm_act as timm_norm_act
from torch import nn

from hookchains.core.sites import FilterSite
from hookchains.core.state import tensor_of

__all__ = ["FOLDABLE_NORMS", "TIMM_NORM_ACT", "norm_folds", "folded_affine"]

FOLDABLE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
                  timm_norm.LayerNorm2d)
"""Norm classes whose output is ``gamma * n(x) + beta`` per channel (exact types; see the module doc)."""

TIMM_NORM_ACT = tuple(getattr(timm_norm_act, name) for name in (
    "BatchNormAct2d", "SyncBatchNormAct", "GroupNormAct", "GroupNorm1Act") if hasattr(timm_norm_act, name))
"""timm modules computing ``act(drop(gamma * n(x) + beta))``, exact types (see the module doc)."""


def _norm_scored(model: nn.Module, site: FilterSite) -> Optional[nn.Module]:
    """The norm whose affine output the site's hook multiplies, as it is, or None."""
    hooked = model.get_submodule(site.hook_module)
    if type(hooked) in FOLDABLE_NORMS and site.hook_module:
        last = type(hooked) is nn.LayerNorm  # channels last; the others (LayerNorm2d too) on dim 1
        over_channels = not last or tuple(hooked.normalized_shape) == (site.channels,)
        return hooked if over_channels and site.channel_dim == (-1 if last else 1) else None
    parent, _, leaf = site.hook_module.rpartition(".")
    if leaf == "drop" and type(hooked) is nn.Identity and site.channel_dim == 1:
        norm = model.get_submodule(parent)
        return norm if type(norm) in TIMM_NORM_ACT else None
    return None


def norm_folds(model: nn.Module, sites: Iterable[FilterSite]) -> Dict[str, str]:
    """Site name -> module path of the norm whose affine parameters can absorb the site's multipliers.

    A site qualifies when its hook multiplies, one score per channel (``width`` 1), the output of a
    norm's affine part (see the module doc for which) whose weight has ``channels`` entries and is
    used by no other module. None does in a TorchScript or ``nn.DataParallel`` model.

    Example:
        >>> import hookchains, timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=2).eval()
        >>> hooks = hookchains.attach(model, example=torch.randn(1, 3, 32, 32))
        >>> folds = norm_folds(model, hooks.sites.filters)
        >>> len(folds) == len(hooks.sites.filters), folds["layer1.0.conv1"]
        (True, 'layer1.0.bn1')
    """
    if isinstance(model, (torch.jit.ScriptModule, nn.DataParallel)):
        return {}
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    paths = {id(module): path for path, module in model.named_modules()}
    folds = {}
    for site in sites:
        norm = None if site.on_input or site.width != 1 else _norm_scored(model, site)
        weight = getattr(norm, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.numel() == site.channels and uses[id(weight)] == 1:
            folds[site.name] = paths[id(norm)]
    return folds


def folded_affine(model: nn.Module, folds: Dict[str, str], values: Callable[[str], torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The norms' affine tensors times the sites' multipliers, keyed as in ``model.named_parameters()``,
    ready for :func:`torch.func.functional_call`.

    Args:
        folds: site name -> norm module path (:func:`norm_folds`).
        values: site name -> its multipliers, one per channel (e.g. ``hooks.filter_values``).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
        >>> affine = folded_affine(net, {"0": "1"}, lambda name: torch.tensor([1.0, 0.0, 1.0, 0.5]))
        >>> affine["1.weight"].tolist(), sorted(affine)
        ([1.0, 0.0, 1.0, 0.5], ['1.bias', '1.weight'])
    """
    affine: Dict[str, torch.Tensor] = {}
    for name, path in folds.items():
        norm = model.get_submodule(path)
        weight = tensor_of(norm, "weight")
        v = values(name).to(weight.dtype)
        affine[f"{path}.weight"] = weight * v
        if getattr(norm, "bias", None) is not None:
            affine[f"{path}.bias"] = tensor_of(norm, "bias") * v
    return affine
