"""Dataflow: which kept filters of a sub-network really feed which (the edges of chains and drawings).

The thresholded network (the model with the sub-network's hooks in ``"hard"`` mode, section 3.2) is
probed once: every filter site's hooked output is cut into an autograd leaf, and the autograd graph
from each kept consumer's input (the tensor its conv/linear reads) back to those leaves is walked.

**Edges.** A kept filter ``u`` of site ``P`` *feeds* a kept filter ``v`` of site ``S`` when

* ``S``'s conv/linear reads ``P``'s hooked output through channel-preserving operations only
  (activations, residual additions and identity shortcuts, pooling, BatchNorm-style per-channel
  affines, multiplication by a constant that is not zero) -- the same channel ``u`` arrives as input
  channel ``u`` (a linear layer reading the ``(N, C, h, w)`` map flattened: as features
  ``u * h * w .. (u + 1) * h * w - 1``); and
* ``S``'s weight connects input channel ``u`` to output channel ``v``: some ``W[v, u, ...] != 0``
  (grouped convs: only inside ``v``'s group, so depthwise convs connect ``u == v`` only) and the norm
  scale of ``v`` is not zero.

Everything else is *no* edge (``-inf`` in :func:`hookchains.analysis.chains.kbest_paths`), not an
edge of value 0. A path may skip a kept layer through an identity: when a residual addition carries ``P``'s
channel past a kept block, ``P`` feeds the first kept consumer after it directly. A removed
gated block is a pass-through (its branch is multiplied by a gate of 0: no edge through it).

**One unit.** The value of an edge is ``u``'s first-order share of ``v``'s hooked output (its spatial
mean), ``c[u, v] = E[v, u] * r[u]`` with

* ``E[v, u] = S[v] * g[v] * sum_kernel W[v, u]``: the kernel-summed weight times the norm scale
  ``g`` (BatchNorm ``gamma / sqrt(running_var + eps)``; another norm: its weight; none: 1) and the
  filter's score (:func:`channel_weights`);
* ``r[u]`` = gradient x activation of ``S``'s input channel ``u`` w.r.t. ``P``'s hooked output
  channel ``u``, summed over positions, divided by the input's positions: ``u``'s share of the
  spatial mean of what ``S`` really reads, *after* the activation. A node that is 0 after its
  ReLU/ReLU6 at every position has ``r = 0``; in a residual sum each addend gets its own share.

The linear reading ``mean(conv(x)) = sum_kernel W * mean(x)`` is exact for 1x1 convs and linear
layers; for larger kernels it ignores padding borders and stride. A linear layer reading a flattened
map gets exact values: per feature ``j`` the producer's share ``(J h)_j`` times ``E[v, j]``, summed
over the channel's features. The end of a chain is the same
rule at the classifier, taken exactly: gradient x activation of the predicted logit w.r.t. ``P``'s
hooked output, through direct connections only (an edge when the classifier's weight row of the
class is nonzero at ``u``).

**Dead filters.** A kept filter none of whose inputs is live (the image, or a live kept filter
through an edge) computes a constant that does not depend on the image: it is *dead* (its constant
can be folded into a bias). Dead filters belong in no chain and are counted apart
(:func:`find_dead_filters`, ``Subnetwork.counts()["dead_filters"]``).

**Refusals.** When the connections cannot be determined, :class:`DataflowError` says why in one
line: an operation that may mix channels outside a filter site (a conv that is not a site, a
LayerNorm, a reduction over channels, a concatenation, attention), a module that runs twice, or an
input whose width is neither the producer's channel count nor its flattened map.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from hookchains.core.attach import attach
from hookchains.core.sites import FilterSite
from hookchains.core.state import eval_mode, tensor_of
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.forward import OutputSpec, class_scores

__all__ = ["INPUT", "Dataflow", "DataflowError", "channel_weights", "find_dead_filters", "thresholded",
           "trace_dataflow"]

INPUT = "<input>"  # the producer name of the image
# autograd nodes that keep every channel where it is (elementwise, pooling, per-channel affine, views)
_CHANNEL_PRESERVING = {
    "ReluBackward0", "ReluBackward1", "HardtanhBackward0", "HardtanhBackward1", "LeakyReluBackward0",
    "LeakyReluBackward1", "EluBackward0", "EluBackward1", "GeluBackward0", "SiluBackward0",
    "HardswishBackward0", "HardsigmoidBackward0", "SigmoidBackward0", "TanhBackward0", "AddBackward0",
    "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0", "MulBackward1", "DivBackward0",
    "DivBackward1", "CloneBackward0", "ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0",
    "ReshapeAliasBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
    "SqueezeBackward3", "UnsqueezeBackward0", "ExpandBackward0", "MaxPool2DWithIndicesBackward0",
    "MaxPool1DWithIndicesBackward0", "AvgPool2DBackward0", "AvgPool1DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveAvgPool1DBackward0", "AdaptiveMaxPool2DBackward0", "MeanBackward1", "SumBackward1",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0", "NativeDropoutBackward0"}


class DataflowError(ValueError):
    """The model's connections between filter sites cannot be determined (the message says why)."""


@contextmanager
def thresholded(sub: Subnetwork, model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``model`` as the thresholded sub-network (hooks in ``"hard"`` mode, eval mode).

    Weights and scores do not require gradients inside (flags restored on exit), so a forward with
    gradients enabled records only what its caller asks for. Pass a model without hookchains hooks;
    the hooks added here are removed on exit.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
        >>> images = torch.randn(2, 3, 8, 8)
        >>> sub = random_subnetwork(model, images[:1], keep=0.6, seed=6)     # or hookchains.fit(...)
        >>> with thresholded(sub, model) as net:
        ...     net(images).shape
        torch.Size([2, 2])
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    hooks = attach(model, sites=sub.sites, tau=sub.tau, temperature=sub.temperature)
    try:
        hooks.load_state(sub.scores, sub.gate_logits)
        for parameter in [p for p, _ in flags] + list(hooks.parameters()):
            parameter.requires_grad_(False)
        with hooks.using("hard"), eval_mode(model):
            yield model
    finally:
        hooks.detach()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _norm_scale(module: nn.Module, site: FilterSite, channels: int) -> Tensor:
    """Per-channel multiplier of the norm a score sits on (1 when the score sits on the conv)."""
    weight = getattr(module, "weight", None)
    if site.fold_module == site.name or weight is None or weight.numel() != channels:
        scale = torch.ones(channels)
    else:
        scale = weight.detach().float()
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and module.running_var is not None:
        scale = scale.to(module.running_var.device) / torch.sqrt(module.running_var.float() + module.eps)
    return scale.cpu()


def _dense(kernel: Tensor, groups: int) -> Tensor:
    """(out, in) matrix of a kernel-summed (out, in / groups) weight: block-diagonal for groups > 1."""
    return torch.block_diag(*kernel.split(kernel.shape[0] // groups)) if groups > 1 else kernel


def channel_weights(sub: Subnetwork, model: nn.Module, site: FilterSite) -> Tensor:
    """Effective weights ``E[v, u] = S[v] * g[v] * sum_kernel W[v, u]`` of a site, shape (out, in).

    ``S`` is the thresholded score (0 for a removed filter), ``g`` the norm scale (module docstring).
    Grouped and depthwise convs give the block-diagonal (out, in) matrix.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
        >>> images = torch.randn(2, 3, 8, 8)
        >>> sub = random_subnetwork(model, images[:1], keep=0.6, seed=6)     # or hookchains.fit(...)
        >>> channel_weights(sub, model, sub.sites.filter("2")).shape      # depthwise: diagonal
        torch.Size([4, 4])
    """
    weight = tensor_of(model.get_submodule(site.name)).detach().float().cpu()
    summed = weight.flatten(2).sum(-1) if weight.ndim > 2 else weight
    groups = site.groups if site.kind == "conv" else 1
    scale = _norm_scale(model.get_submodule(site.fold_module), site, summed.shape[0])
    score = sub.scores[site.name].float().cpu()
    return (score * (score >= sub.tau) * scale)[:, None] * _dense(summed, groups)


def _connections(model: nn.Module, site: FilterSite) -> Tensor:
    """Bool (out, in): input channel ``u`` reaches output ``v`` (a nonzero weight, a nonzero norm scale)."""
    weight = tensor_of(model.get_submodule(site.name)).detach().cpu()
    nonzero = (weight != 0).flatten(2).any(-1) if weight.ndim > 2 else weight != 0
    scale = _norm_scale(model.get_submodule(site.fold_module), site, weight.shape[0])
    return _dense(nonzero, site.groups if site.kind == "conv" else 1) & (scale != 0)[:, None]


@dataclass
class Dataflow:
    """Who feeds whom among the kept filters, and (with images) the edge values (module docstring).

    Attributes:
        sites: kept filter sites in execution order; kept: their kept filter indices.
        feeds: consumer (a kept site's name, or the classifier's) -> the kept sites (and :data:`INPUT`)
            whose hooked output it reads directly, in execution order.
        connected: ``(producer, consumer)`` -> bool ``(n_P, n_S)`` over kept filters (for the classifier:
            ``(n_P, classes)``); True where an edge exists.
        weights: ``(producer, consumer)`` -> ``E`` restricted to kept filters, ``(n_P, n_S)``.
        dead: site -> kept filters with no live input (input-independent constants).
        shares: ``(producer, consumer)`` -> ``r``, ``(N, n_P)``; None without images.
        logit_shares: producer -> ``(N, n_P)`` gradient x activation of the predicted logit; None without images.
        predictions: ``(N,)`` top-1 classes of the thresholded network; None without images.
        classifier: the classifier's module path.
        blocks: ``(producer, consumer)`` -> ``(n_S, n_P, k)`` effective weights of a linear consumer that
            reads the producer's map flattened, ``k`` features per channel (the pair's :attr:`weights`
            sum them); its edge values are exact, not read off a kernel sum.
        exact: ``(producer, consumer)`` -> ``(N, n_P, n_S)`` edge values of those pairs; empty without images.
    """

    sites: List[FilterSite]
    kept: List[List[int]]
    feeds: Dict[str, List[str]]
    connected: Dict[Tuple[str, str], Tensor]
    weights: Dict[Tuple[str, str], Tensor]
    dead: Dict[str, List[int]]
    classifier: str
    blocks: Dict[Tuple[str, str], Tensor] = field(default_factory=dict)
    exact: Dict[Tuple[str, str], Tensor] = field(default_factory=dict)
    shares: Optional[Dict[Tuple[str, str], Tensor]] = None
    logit_shares: Optional[Dict[str, Tensor]] = None
    predictions: Optional[Tensor] = None
    _index: Dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {s.name: i for i, s in enumerate(self.sites)}

    def position(self, name: str) -> int:
        """Index of kept site ``name`` in :attr:`sites`."""
        return self._index[name]

    def pairs(self) -> List[Tuple[str, str]]:
        """``(producer, consumer)`` pairs of kept sites with at least one edge, in execution order."""
        return [(p, s.name) for s in self.sites for p in self.feeds.get(s.name, [])
                if p != INPUT and bool(self.connected[(p, s.name)].any())]

    def live(self, name: str) -> Tensor:
        """Bool ``(n_P,)``: which kept filters of site ``name`` are not dead."""
        kept, dead = self.kept[self.position(name)], set(self.dead.get(name, []))
        return torch.tensor([j not in dead for j in kept], dtype=torch.bool)

    def traced(self) -> Tuple[Dict[Tuple[str, str], Tensor], Dict[str, Tensor], Tensor]:
        """``(shares, logit_shares, predictions)``, the per-image figures; ``ValueError`` without images."""
        if self.shares is None or self.logit_shares is None or self.predictions is None:
            raise ValueError("edge and end values need images: call trace_dataflow(sub, model, images)")
        return self.shares, self.logit_shares, self.predictions

    def edge_values(self, producer: str, consumer: str) -> Tensor:
        """``(N, n_P, n_S)`` edge values ``c = E * r`` (module docstring), ``-inf`` where no edge exists
        or the producer's filter is dead. Needs images."""
        shares = self.traced()[0]
        key = (producer, consumer)
        values = self.exact[key] if key in self.exact else \
            shares[key].double()[:, :, None] * self.weights[key].double()[None]
        mask = self.connected[key] & self.live(producer)[:, None]
        return values.masked_fill(~mask[None], float("-inf"))

    def end_values(self, producer: str) -> Tensor:
        """``(N, n_P)`` chain ends: the logit shares, ``-inf`` where the classifier's weight of the image's
        predicted class is 0 at the filter, the filter is dead, or the site does not feed the classifier."""
        _, logit_shares, predictions = self.traced()
        if producer not in self.feeds[self.classifier]:
            return torch.full((predictions.shape[0], len(self.kept[self.position(producer)])), float("-inf"),
                              dtype=torch.float64)
        mask = self.connected[(producer, self.classifier)].T[predictions] & self.live(producer)[None]
        return logit_shares[producer].double().masked_fill(~mask, float("-inf"))

    def strength(self, producer: str, consumer: str) -> Tensor:
        """``(n_P, n_S)`` drawn strength of each edge: ``|mean over images of c|`` (``|E|`` without
        images), 0 where no edge exists. The one edge definition of :meth:`edge_values`."""
        key = (producer, consumer)
        if self.shares is None:
            mask = self.connected[key] & self.live(producer)[:, None]
            return self.weights[key].abs().double() * mask
        values = self.edge_values(producer, consumer)
        finite = torch.isfinite(values)
        return (values.nan_to_num(0.0, 0.0, 0.0).sum(0) / finite.sum(0).clamp(min=1)).abs() * finite.any(0)

    def silent(self, producer: str) -> Tensor:
        """Bool ``(N, n_P)``: filters whose share is exactly 0 in every consumer they feed, per image
        (e.g. zero after their ReLU/ReLU6 at every position). Needs images."""
        all_shares, logit_shares, predictions = self.traced()
        shares = [r for (p, _), r in all_shares.items() if p == producer]
        if producer in self.feeds[self.classifier]:
            shares.append(logit_shares[producer])
        if not shares:
            return torch.ones(predictions.shape[0], len(self.kept[self.position(producer)]), dtype=torch.bool)
        return torch.stack([r == 0 for r in shares]).all(0)


def _zero_product(node) -> bool:
    """A multiplication by a constant that is 0 everywhere (a closed gate's branch): nothing passes."""
    kind = type(node).__name__
    saved: Optional[str] = None
    if kind == "MulBackward1":
        saved = "_saved_other"
    elif kind == "MulBackward0":
        (left, _), (right, _) = node.next_functions
        saved = "_saved_other" if right is None else "_saved_self" if left is None else None
    else:
        return False
    try:
        constant = getattr(node, saved) if saved else None
    except RuntimeError:  # not saved: nothing to check
        return False
    if isinstance(constant, Tensor):
        return not bool(constant.any())
    return constant == 0


def _check_node(node, consumer: str) -> None:
    """Refuse an autograd node that may move or mix channels."""
    kind = type(node).__name__
    if kind not in _CHANNEL_PRESERVING:
        raise DataflowError(f"chains: the input of {consumer} passes through {kind}, an operation that may mix "
                            "channels outside a filter site, so its connections cannot be determined; chains "
                            "and drawings support convs/linears joined by activations, additions and pooling")
    if kind in ("MeanBackward1", "SumBackward1"):  # only a spatial reduction of an (N, C, ...) map
        ndim = len(node._saved_self_sym_sizes)
        dims = [d - 2 ** 64 if d >= 2 ** 63 else d for d in node._saved_dim]  # negative dims come back unsigned
        if ndim < 4 or any(d % ndim < 2 for d in dims):
            raise DataflowError(f"chains: the input of {consumer} passes through a reduction ({kind}) that may "
                                "average over channels, so its connections cannot be determined")


_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def _sources(start, leaves: Dict[int, str], consumer: str) -> Tuple[List[str], Set[Tuple[int, ...]]]:
    """Names of the leaves (sites, :data:`INPUT`) that reach autograd node ``start`` without mixing
    channels, and the input sizes of the views on the way (a flatten of an ``(N, C, h, w)`` map)."""
    found: Set[str] = set()
    views: Set[Tuple[int, ...]] = set()
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            found.add(leaves[id(node.variable)])
            continue
        _check_node(node, consumer)
        if type(node).__name__ in _VIEWS:
            views.add(tuple(int(d) for d in node._saved_self_sym_sizes))
        if not _zero_product(node):
            todo.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found), views


@dataclass
class _Probe:
    """One cut forward: hooked outputs as leaves, consumer inputs as recorded."""

    leaves: Dict[str, Tensor] = field(default_factory=dict)   # site -> leaf (its hooked output)
    order: List[str] = field(default_factory=list)              # sites in execution order
    starts: Dict[str, object] = field(default_factory=dict)    # consumer -> autograd node of its input
    totals: Dict[str, Tensor] = field(default_factory=dict)    # consumer -> sum of its input (in the graph)
    widths: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # consumer -> (channels, positions)
    flat: Dict[str, Tensor] = field(default_factory=dict)      # linear consumer -> its (N, F) input
    logits: Tensor = field(default_factory=lambda: torch.empty(0, 0))  # N x classes, set by the forward


def _cut_forward(model: nn.Module, sites: List[FilterSite], consumers: Dict[str, int], image: Tensor,
                 output: OutputSpec) -> _Probe:
    """Forward ``image`` with every site's hooked output cut into a leaf; record each consumer's input."""
    probe, get = _Probe(), model.get_submodule

    def cut(site: FilterSite):
        def hook(module, args, out):
            if site.name in probe.leaves:
                raise DataflowError(f"chains: {site.hook_module} runs more than once per forward, so its "
                                    "connections cannot be determined")
            probe.leaves[site.name] = out.detach().requires_grad_(True)
            probe.order.append(site.name)
            return probe.leaves[site.name].clone()  # in-place activations may follow
        return hook

    def read(name: str, channel_dim: int):
        def hook(module, args):
            x = args[0]
            if name in probe.starts:
                raise DataflowError(f"chains: {name} runs more than once per forward, so its connections "
                                    "cannot be determined")
            probe.starts[name] = x.grad_fn if x.grad_fn is not None else x
            probe.totals[name] = x.float().sum()
            probe.widths[name] = (x.shape[channel_dim], x[0].numel() // x.shape[channel_dim])
            if x.ndim == 2:
                probe.flat[name] = x
        return hook

    handles = [get(s.hook_module).register_forward_hook(cut(s)) for s in sites]
    handles += [get(name).register_forward_pre_hook(read(name, dim)) for name, dim in consumers.items()]
    try:
        probe.leaves[INPUT] = image.detach().clone().requires_grad_(True)
        try:
            raw = model(probe.leaves[INPUT])
        except TypeError as exc:  # forward(image, metadata, ...): one image is not enough
            raise DataflowError(f"chains: {type(model).__name__} cannot run on the image alone "
                                f"({str(exc).splitlines()[0][:120]}); chains need a one-input model") from None
        probe.logits = class_scores(raw, output)
        if probe.logits.ndim != 2:
            raise DataflowError("chains: the model makes a dense prediction (one per position); chains end at "
                                "one class score per image")
    finally:
        for handle in handles:
            handle.remove()
    return probe


def _feeds(probe: _Probe, consumers: Dict[str, int], channels: Dict[str, int]):
    """Consumer -> producers it reads directly, and ``(producer, consumer) -> k`` for a linear consumer that
    reads a producer's ``(N, C, h, w)`` map flattened (input feature ``j`` is channel ``j // k``)."""
    leaves = {id(t): name for name, t in probe.leaves.items()}
    order = {name: i for i, name in enumerate([INPUT] + probe.order)}
    feeds, blocks = {}, {}
    for name in consumers:
        if name not in probe.starts:
            continue
        start, views = probe.starts[name], set[Tuple[int, ...]]()
        if isinstance(start, Tensor):  # reads a tensor without history: the image itself, or a constant
            found = [INPUT] if start is probe.leaves[INPUT] else []
        else:
            found, views = _sources(start, leaves, name)
        width = probe.widths[name][0]
        for producer in found:
            if producer == INPUT or width == channels[producer]:
                continue
            flatten = [v for v in views if len(v) > 2 and v[1] == channels[producer] and math.prod(v[1:]) == width]
            if name not in probe.flat or len(views) != 1 or not flatten:
                raise DataflowError(f"chains: {name} reads {width} input channels from {producer}, which has "
                                    f"{channels[producer]} (a concatenation or a reshape), so its connections "
                                    "cannot be mapped to channels")
            blocks[(producer, name)] = width // channels[producer]
        feeds[name] = sorted(found, key=order.__getitem__)
    return feeds, blocks


def _dead(flow_sites: List[FilterSite], kept: List[List[int]], feeds, connected, input_reach) -> Dict[str, List[int]]:
    """Kept filters with no live input, in execution order (live: the image, or a live kept filter)."""
    live: Dict[str, Tensor] = {}
    dead = {}
    for site, idx in zip(flow_sites, kept):
        alive = torch.zeros(len(idx), dtype=torch.bool)
        for producer in feeds.get(site.name, []):
            if producer == INPUT:
                alive |= input_reach[site.name]
            elif producer in live:
                alive |= (connected[(producer, site.name)] & live[producer][:, None]).any(0)
        live[site.name] = alive
        if not bool(alive.all()):
            dead[site.name] = [j for j, a in zip(idx, alive.tolist()) if not a]
    return dead


def _per_channel(probe: _Probe, site: FilterSite, grad: Optional[Tensor], kept: List[int]) -> Tensor:
    """Gradient x activation of a site's hooked output, summed over positions: ``(N, len(kept))``."""
    leaf = probe.leaves[site.name].detach()
    product = torch.zeros_like(leaf) if grad is None else grad * leaf
    dim = site.channel_dim % product.ndim
    summed = product.movedim(dim, 1).flatten(2).sum(-1) if product.ndim > 2 else product
    return summed[:, kept].double().cpu()


def _exact(probe: _Probe, flow: Dataflow, producer: str, consumer: str, kept: List[int]) -> None:
    """Exact edge values into a linear consumer reading a flattened map: per input feature ``j``, the
    producer's share ``J h`` (a Jacobian-vector product by double backward) times ``E[v, j]``, summed
    over the channel's features."""
    flat, leaf = probe.flat[consumer], probe.leaves[producer]
    probe_vector = torch.zeros_like(flat, requires_grad=True)
    (vjp,) = torch.autograd.grad(flat, leaf, grad_outputs=probe_vector, create_graph=True)
    (jvp,) = torch.autograd.grad(vjp, probe_vector, grad_outputs=leaf.detach(), retain_graph=True)
    block = flow.blocks[(producer, consumer)]
    features = jvp.reshape(jvp.shape[0], -1, block.shape[-1])[:, kept].double().cpu()
    flow.exact[(producer, consumer)] = torch.einsum("npk,spk->nps", features, block.double())


def _shares(probe: _Probe, flow: Dataflow, by_name: Dict[str, FilterSite]) -> None:
    """Fill ``flow.shares``, ``flow.logit_shares`` and ``flow.predictions`` (module docstring)."""
    kept = {s.name: idx for s, idx in zip(flow.sites, flow.kept)}
    flow.shares, flow.logit_shares = {}, {}
    for consumer, producers in flow.feeds.items():
        producers = [p for p in producers if p != INPUT]
        if consumer == flow.classifier or not producers:
            continue
        grads = torch.autograd.grad(probe.totals[consumer], [probe.leaves[p] for p in producers],
                                    retain_graph=True, allow_unused=True)
        for producer, grad in zip(producers, grads):
            share = _per_channel(probe, by_name[producer], grad, kept[producer])
            flow.shares[(producer, consumer)] = share / probe.widths[consumer][1]
            if (producer, consumer) in flow.blocks:
                _exact(probe, flow, producer, consumer, kept[producer])
    flow.predictions = probe.logits.argmax(-1).cpu()
    producers = [p for p in flow.feeds.get(flow.classifier, []) if p != INPUT]
    picked = probe.logits.gather(1, flow.predictions.to(probe.logits.device)[:, None]).sum()
    logit_grads = torch.autograd.grad(picked, [probe.leaves[p] for p in producers], allow_unused=True) if producers else ()
    for producer, grad in zip(producers, logit_grads):
        flow.logit_shares[producer] = _per_channel(probe, by_name[producer], grad, kept[producer])


def _nonzero(weight: Tensor) -> Tensor:
    """Bool (out, in) of a classifier weight (a linear, or a 1x1 conv)."""
    weight = weight.detach().cpu()
    return (weight != 0).flatten(2).any(-1) if weight.ndim > 2 else weight != 0


def _by_channel(matrix: Tensor, k: int) -> Tensor:
    """``(rows, C * k)`` -> ``(rows, C, k)``: input features grouped by the channel they flatten."""
    return matrix.reshape(matrix.shape[0], -1, k)


def _structure(sub: Subnetwork, model: nn.Module, probe: _Probe, consumers: Dict[str, int]) -> Dataflow:
    """The edges and dead filters of a probe (no values)."""
    by_name = {s.name: s for s in sub.sites.filters}
    kept_map = sub.kept_filters()
    sites = [by_name[n] for n in probe.order if n in kept_map]
    feeds, flattened = _feeds(probe, consumers, {s.name: s.channels for s in sub.sites.filters})
    feeds = {c: [p for p in ps if p == INPUT or p in kept_map] for c, ps in feeds.items()}
    connected, weights, reach, blocks = {}, {}, {}, {}
    for consumer, producers in feeds.items():
        if consumer == sub.sites.classifier:
            links, values = _nonzero(model.get_submodule(consumer).weight), None
        else:
            rows = kept_map[consumer]
            links, values = _connections(model, by_name[consumer])[rows], channel_weights(sub, model, by_name[consumer])[rows]
        for p in producers:
            if p == INPUT:
                reach[consumer] = links.any(1)
                continue
            k = flattened.get((p, consumer), 1)
            connected[(p, consumer)] = _by_channel(links, k).any(-1)[:, kept_map[p]].T
            if values is not None:
                weights[(p, consumer)] = _by_channel(values, k).sum(-1)[:, kept_map[p]].T
                if k > 1:
                    blocks[(p, consumer)] = _by_channel(values, k)[:, kept_map[p]]
    dead = _dead(sites, [kept_map[s.name] for s in sites], feeds, connected, reach)
    return Dataflow(sites, [kept_map[s.name] for s in sites], feeds, connected, weights, dead,
                    sub.sites.classifier, blocks)


def trace_dataflow(sub: Subnetwork, model: nn.Module, images: Optional[Tensor] = None) -> Dataflow:
    """The edges between kept filters of ``sub`` and, with ``images``, their values (module docstring).

    Runs one forward of the thresholded network with gradients (``images``, or zeros of the site
    map's input shape) and one backward per kept consumer. The model is restored on exit.

    Args:
        sub: the sub-network; model: the model it was fitted on, without hookchains hooks.
        images: ``(N, C, H, W)`` task images (optional: without them, structure and dead filters only).

    Raises:
        DataflowError: the connections cannot be determined (one line saying why).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
        >>> images = torch.randn(2, 3, 8, 8)
        >>> sub = random_subnetwork(model, images[:1], keep=0.6, seed=6)     # or hookchains.fit(...)
        >>> flow = trace_dataflow(sub, model, images)
        >>> flow.feeds                        # consumer -> kept sites it reads directly ("6": the classifier)
        {'0': ['<input>'], '2': ['0'], '6': ['2']}
        >>> flow.connected[("0", "2")]          # kept 0_0, 0_1 -> kept 2_0 .. 2_3: depthwise, the diagonal
        tensor([[ True, False, False, False],
                [False,  True, False, False]])
    """
    if sub.sites.classifier is None:
        raise DataflowError("chains: the site map names no classifier, so chains have no end; attach with a "
                            "model whose last layer is a linear or 1x1 conv classifier")
    kept_map = sub.kept_filters()
    consumers = {s.name: s.channel_dim for s in sub.sites.filters if s.name in kept_map}
    consumers[sub.sites.classifier] = -1 if isinstance(model.get_submodule(sub.sites.classifier), nn.Linear) else 1
    device = next(model.parameters()).device
    example = images if images is not None else torch.zeros(1, *sub.sites.input_shape[1:])
    with thresholded(sub, model), torch.enable_grad():
        probe = _cut_forward(model, sub.sites.filters, consumers, example.to(device), sub.sites.output)
        flow = _structure(sub, model, probe, consumers)
        if images is not None:
            _shares(probe, flow, {s.name: s for s in sub.sites.filters})
    return flow


def find_dead_filters(sub: Subnetwork, model: nn.Module) -> Dict[str, List[int]]:
    """Kept filters whose every input was removed (and with no skip path): site -> filter indices.

    Such a filter computes an input-independent constant (its norm's shift); it belongs in no chain and
    can be folded into the next layer's bias. Structural: one probe forward on zeros, no images.

    Raises:
        DataflowError: the connections cannot be determined.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
        >>> images = torch.randn(2, 3, 8, 8)
        >>> sub = random_subnetwork(model, images[:1], keep=0.6, seed=6)     # or hookchains.fit(...)
        >>> sub.kept_filters()
        {'0': [0, 1], '2': [0, 1, 2, 3]}
        >>> find_dead_filters(sub, model)       # 2_2 and 2_3 read only the removed 0_2 and 0_3
        {'2': [2, 3]}
    """
    return trace_dataflow(sub, model).dead
