"""Ablation: what a removed filter is replaced by (issue 12, item 3).

* ``"zero"`` -- the paper's choice (section 3.1, Eq. 3): a removed filter outputs 0.
* ``"mean"`` -- mean ablation: a removed filter outputs its mean activation on the task images, one
  value per channel averaged over images and positions (as in circuit-discovery work, e.g. Wang et
  al. 2023, "Interpretability in the wild"), so the sub-network is judged without the shift that
  zeroing a filter with a large mean causes.

With mean ablation the hooks compute ``v * x + (1 - k) * mean`` per channel, where ``v`` is the
filter's value and ``k`` its kept indicator in the current mode (soft: ``k = v = S``; hard:
``v = S * [S >= tau]``, ``k = [S >= tau]``; mask: ``v = k = [S >= tau]``). A materialised module
stays exact: :func:`fold_constant_channels` makes each removed channel's norm (or conv/linear) output
the constant, and channels that are constant wherever they are read are then removed by folding the
constant into the consumers' bias (:mod:`hookchains.core.pruning`). The same function folds "dead"
filters -- kept filters whose output is input-independent -- given their constants.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> fold_constant_channels(net, {"1": {2: 0.25}})             # the norm's channel 2 now outputs 0.25
    >>> bool((net(torch.randn(2, 3, 8, 8))[:, 2] == 0.25).all())
    True
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import nn

from hookchains.core.sites import SiteMap
from hookchains.core.state import capture_featuremaps, tensor_of

__all__ = ["ABLATIONS", "channel_means", "fold_constant_channels", "use_ablation"]

ABLATIONS = ("zero", "mean")
"""Supported ablations: the paper's zero ablation (default) and mean ablation."""


def use_ablation(hooks, ablation: str, tasks: Sequence[torch.Tensor]) -> None:
    """Set the ablation of score hooks before a fit: ``"mean"`` computes :func:`channel_means` on the
    task's images (hooks off) into ``hooks.means``; ``"zero"`` clears them.

    Raises:
        ValueError: an unknown ablation, mean ablation with several tasks in one batch (each task
            would need its own means: fit them one by one), or mean ablation with attention-head sites.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS} (got {ablation!r})")
    hooks.means = {}
    if ablation == "mean":
        if len(tasks) != 1:
            raise ValueError(f"mean ablation needs one task per fit (got {len(tasks)}): fit the tasks one by one")
        if any(site.on_input or site.width > 1 for site in hooks.sites.filters):
            raise ValueError("mean ablation is not available for attention-head sites (transformers models): "
                             "use ablation='zero'")
        with hooks.using("off"):
            hooks.means = channel_means(hooks.model, hooks.sites, tasks[0])


def channel_means(model: nn.Module, sites: SiteMap, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per filter site, the mean of each channel of its hooked output over ``images`` and positions.

    Args:
        model: the model with no active score hooks (or hooks in mode ``"off"``).
        sites: its :class:`SiteMap`.
        images: N x C x H x W (or the model's input layout).

    Returns:
        site name -> float32 tensor of ``site.channels`` means (on CPU).
    """
    paths = sorted({site.hook_module for site in sites.filters})
    maps = capture_featuremaps(model, images, paths)
    means = {}
    for site in sites.filters:
        out = maps[site.hook_module].float()
        dim = site.channel_dim % out.ndim
        means[site.name] = out.movedim(dim, 0).reshape(out.shape[dim], -1).mean(1).cpu()
    return means


@torch.no_grad()
def fold_constant_channels(model: nn.Module, constants: Mapping[str, Mapping[int, float]]) -> None:
    """Make channels of ``model`` output a constant, in place.

    Args:
        model: a module in eval mode (a materialised copy, never the user's model).
        constants: fold module path -> {output channel: value}. A norm layer (BatchNorm, LayerNorm,
            GroupNorm: its per-channel ``weight`` and ``bias``) outputs ``value`` at that channel once
            its weight there is 0; a conv/linear gets weight 0 and bias ``value`` (a bias is added if
            it had none).

    Raises:
        ValueError: for a module without a per-channel weight (nothing to fold into).
    """
    for path, values in constants.items():
        if not values:
            continue
        module = model.get_submodule(path)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"cannot fold constants into {path} ({type(module).__name__}): it has no weight")
        if getattr(module, "bias", None) is None:
            module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                       requires_grad=weight.requires_grad)
        index = torch.tensor(list(values), device=weight.device)
        weight[index] = 0
        tensor_of(module, "bias")[index] = torch.tensor(list(values.values()), dtype=weight.dtype, device=weight.device)
