"""Chains: the per-image paths through a sub-network that the paper draws (Fig. 4-6, section 4.3-4.4).

The paper shows, for every image, two "NeuroChains" -- one filter per retained layer, "stitched by
filters step by step" -- but never says how a chain is chosen. hookchains defines it as follows.

**Layers and nodes.** Let ``L_1 .. L_m`` be the kept layers of a :class:`~hookchains.Subnetwork`
(filter sites with a filter ``S >= tau`` outside removed gates, ``sub.kept_filters()``) in network
order (``sub.sites.filters``), and ``K_l`` their kept filters. An image ``x`` is evaluated by the
*thresholded* network: the model with the sub-network's hooks in ``"hard"`` mode (section 3.2).

* **Node activation** ``a_l[u]``: mean over positions of the site's hooked output -- the scored,
  post-norm output of filter ``u`` -- for ``x``.
* **Edge contribution** of ``u in K_l`` to ``v in K_{l+1}`` when layer ``l+1`` *reads* layer ``l``
  (see links): ``c(u, v) = E[v, u] * a_l[u]`` with the effective weight
  ``E[v, u] = S[v] * g[v] * sum_kernel W[v, u]``: the conv weight connecting input channel ``u`` to
  output channel ``v`` summed over the kernel, times the per-channel scale ``g`` of the norm the score
  sits on (BatchNorm: ``gamma / sqrt(running_var + eps)``; another norm: its weight; none: 1) and the
  filter's score. ``c`` is ``u``'s first-order share of ``v``'s hooked output for a spatially constant
  input, in the units of ``a_{l+1}``; without ``g`` a channel that BatchNorm shrinks a hundredfold
  would look as strong as one it amplifies.
* **Fallback** when layer ``l+1`` does not read layer ``l`` (a shortcut conv reading the block input,
  a removed layer in between, parallel branches): there is no weight, and
  ``c(u, v) = a_l[u] * a_{l+1}[v]``, the co-activation of the two filters on ``x``.
  :attr:`Chain.linked` says which steps used a weight.
* **Logit contribution** of ``u in K_m``: gradient x activation of the predicted logit ``z_c`` (the
  thresholded network's top-1 class) w.r.t. the site's hooked output, summed over positions. When
  the classifier directly follows global average pooling this is ``W_fc[c, u] * a_m[u]``: the same
  rule as the edges.
* A **chain** is a path ``(u_1, .., u_m)``, one filter per kept layer; its **strength** is the *sum*
  of its ``m - 1`` edge contributions and the logit contribution of ``u_m``. The sum, not the
  minimum: contributions are additive first-order shares, so their sum is the path's total share,
  whereas a minimum lets one weak link decide and makes all paths through one bottleneck tie. The
  sum also makes "the k strongest paths" an exact dynamic programme.

**Links.** Layer ``l+1`` reads layer ``l`` when, in one probe forward with gradients, the autograd
graph from the input of ``l+1``'s conv/linear reaches ``l``'s hooked output without passing through
any other filter site's hooked output, and the weight's input width equals ``l``'s channel count
(grouped and depthwise convs use their block-diagonal weight). Equal channel counts alone are not
enough: parallel branches and layers across a removed layer often match in width.

**Top-k.** A k-best dynamic programme over the layers keeps, for every node, the k best partial paths
ending there, ranked by strength and then by filter indices (lexicographically), so ties break by
index deterministically. It is exact: partial paths ending at the same node share every later term.
Cost ``O(k * sum_l |K_l| * |K_{l+1}|)`` per image.

Example:
    >>> chains = extract_chains(sub, model, images, k=2)
    >>> [f.label for f in chains[0][0].filters]          # image 0, strongest chain
    ['L3B1C1_23', 'L3B1C2_18', 'L4B1C3_511']
"""
from __future__ import annotations

import heapq
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from hookchains.core.attach import attach
from hookchains.core.sites import FilterSite
from hookchains.core.state import eval_mode
from hookchains.core.subnetwork import Subnetwork

__all__ = ["Chain", "ChainFilter", "LayerTrace", "channel_weights", "extract_chains", "kbest_paths",
           "thresholded", "trace_layers"]


class ChainFilter(NamedTuple):
    """One filter of a chain: its site, channel index and paper-style label (``"L3B1C2_18"``)."""

    site: str
    index: int
    label: str


@dataclass
class Chain:
    """One path through the kept layers for one image (see the module docstring for the definition).

    Attributes:
        filters: one :class:`ChainFilter` per kept layer, in network order.
        strength: sum of ``contributions``.
        contributions: the ``len(filters) - 1`` edge contributions, then the logit contribution.
        linked: per edge, True when a weight connects the two layers (False: activation product).
        image: index of the image in the batch; target: the class whose logit the chain ends in.
    """

    filters: List[ChainFilter]
    strength: float
    contributions: List[float]
    linked: List[bool]
    image: int
    target: int

    @property
    def key(self) -> Tuple[Tuple[str, int], ...]:
        """The chain's filters as ``((site, index), ...)``: equal for the same path on any image."""
        return tuple((f.site, f.index) for f in self.filters)


@dataclass
class LayerTrace:
    """What the thresholded network does in its kept layers (the input of chains and drawings).

    Attributes:
        sites: kept filter sites in network order; kept: their kept filter indices.
        linked: per consecutive pair of kept layers, whether the second reads the first.
        activations: per kept layer, node activations ``(N, len(kept[l]))``; None without images.
        logit_attribution: ``(N, len(kept[-1]))`` logit contributions; None without images.
        predictions: ``(N,)`` top-1 classes of the thresholded network; None without images.
    """

    sites: List[FilterSite]
    kept: List[List[int]]
    linked: List[bool]
    activations: Optional[List[Tensor]] = None
    logit_attribution: Optional[Tensor] = None
    predictions: Optional[Tensor] = None


@contextmanager
def thresholded(sub: Subnetwork, model: nn.Module) -> Iterator[nn.Module]:
    """Evaluate ``model`` as the thresholded sub-network (hooks in ``"hard"`` mode, eval mode).

    Weights and scores do not require gradients inside (flags restored on exit), so a forward with
    gradients enabled records only what its caller asks for. Pass a model without hookchains hooks;
    the hooks added here are removed on exit.

    Example:
        >>> with thresholded(sub, model) as net:
        ...     logits = net(images)
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


def channel_weights(sub: Subnetwork, model: nn.Module, site: FilterSite, *, absolute: bool = False) -> Tensor:
    """Effective weights ``E[v, u] = S[v] * g[v] * sum_kernel W[v, u]`` of a site, shape (out, in).

    ``g`` is the norm scale the module docstring defines. Grouped/depthwise convs give the
    block-diagonal (out, in) matrix. ``absolute=True`` sums ``|W|`` over the kernel and uses ``|g|``
    (a connection's magnitude, as :mod:`hookchains.viz.graph` draws it).

    Example:
        >>> channel_weights(sub, model, sub.sites.filter("layer1.0.conv2")).shape
        torch.Size([64, 64])
    """
    weight = model.get_submodule(site.name).weight.detach().float()
    kernel = weight.abs() if absolute else weight
    summed = kernel.flatten(2).sum(-1) if kernel.ndim > 2 else kernel
    groups = site.groups if site.kind == "conv" else 1
    dense = torch.block_diag(*summed.split(summed.shape[0] // groups)) if groups > 1 else summed
    scale = _norm_scale(model.get_submodule(site.fold_module), site, summed.shape[0])
    scale = scale.abs() if absolute else scale
    score = sub.scores[site.name].float()
    return (score * (score >= sub.tau) * scale.to(score.device)).cpu()[:, None] * dense.cpu()


def _norm_scale(module: nn.Module, site: FilterSite, channels: int) -> Tensor:
    """Per-channel multiplier of the norm a score sits on (1 when the score sits on the conv)."""
    weight = getattr(module, "weight", None)
    if site.fold_module == site.name or weight is None or weight.numel() != channels:
        scale = torch.ones(channels)
    else:
        scale = weight.detach().float()
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and module.running_var is not None:
        scale = scale.to(module.running_var.device) / torch.sqrt(module.running_var.float() + module.eps)
    return scale


def _spatial_dims(out: Tensor, site: FilterSite) -> List[int]:
    channel = site.channel_dim % out.ndim
    return [d for d in range(1, out.ndim) if d != channel]


@contextmanager
def _hooks(model: nn.Module, sites: Sequence[FilterSite], hook: Callable, pre: Optional[Callable] = None,
           pre_sites: Sequence[FilterSite] = ()) -> Iterator[None]:
    """Temporary forward hooks ``hook(site, out)`` on hook modules (and pre-hooks on conv inputs)."""
    get = model.get_submodule
    handles = [get(s.hook_module).register_forward_hook(lambda m, a, o, s=s: hook(s, o)) for s in sites]
    handles += [get(s.name).register_forward_pre_hook(lambda m, a, s=s: pre(s, a[0])) for s in pre_sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _reaches(start, target, stops: set) -> bool:
    """Whether autograd node ``target`` is reachable from ``start`` without crossing ``stops``."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        if node is target:
            return True
        seen.add(node)
        if node not in stops:
            todo.extend(next_node for next_node, _ in node.next_functions)
    return False


def _direct_links(sub: Subnetwork, model: nn.Module, sites: List[FilterSite], example: Tensor) -> List[bool]:
    """Per consecutive pair of ``sites``: does the second's conv read the first's hooked output?"""
    outputs: Dict[str, object] = {}  # autograd nodes, which keep the probe's graph alive
    inputs: Dict[str, object] = {}

    def on_output(site: FilterSite, out: Tensor) -> None:
        outputs[site.name] = out.grad_fn

    def on_input(site: FilterSite, x: Tensor) -> None:
        inputs[site.name] = x.grad_fn

    with _hooks(model, sub.sites.filters, on_output, on_input, sites[1:]), torch.enable_grad():
        model(example.detach().clone().requires_grad_(True))
    stops = {node for node in outputs.values() if node is not None}
    links = []
    for before, after in zip(sites, sites[1:]):
        target = outputs.get(before.name)
        links.append(_input_width(model, after) == before.channels and target is not None
                     and _reaches(inputs.get(after.name), target, stops))
    return links


def _input_width(model: nn.Module, site: FilterSite) -> int:
    """Input channels of a site's conv/linear (its weight's second dimension times the groups)."""
    weight = model.get_submodule(site.name).weight
    return weight.shape[1] * (site.groups if site.kind == "conv" else 1)


def _measure(model: nn.Module, sites: List[FilterSite], kept: List[List[int]], images: Tensor):
    """Node activations, logit contributions of the last kept layer and predictions, in one forward."""
    means: Dict[str, Tensor] = {}
    last: Dict[str, Tensor] = {}

    def record(site: FilterSite, out: Tensor) -> Optional[Tensor]:
        dims = _spatial_dims(out, site)
        means[site.name] = out.detach().float().mean(dims) if dims else out.detach().float()
        if site is sites[-1]:  # gradients flow only from here on: cheap, whatever the model's size
            last["leaf"] = out.detach().requires_grad_(True)
            return last["leaf"].clone()
        return None

    with _hooks(model, sites, record), torch.enable_grad():
        logits = model(images).float()
        predictions = logits.argmax(-1)
        picked = logits.gather(1, predictions[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, last["leaf"], allow_unused=True)
    leaf = last["leaf"].detach()
    grad = torch.zeros_like(leaf) if grad is None else grad
    dims = _spatial_dims(leaf, sites[-1])
    attribution = (grad * leaf).float().sum(dims) if dims else (grad * leaf).float()
    activations = [means[s.name][:, idx].cpu() for s, idx in zip(sites, kept)]
    return activations, attribution[:, kept[-1]].cpu(), predictions.cpu()


def trace_layers(sub: Subnetwork, model: nn.Module, images: Optional[Tensor] = None) -> LayerTrace:
    """Kept layers, which consecutive ones are linked, and (with ``images``) what they compute.

    Runs the thresholded network: one probe forward with gradients on one image (zeros of the site
    map's input shape when ``images`` is None) for the links, then one forward over ``images``.

    Example:
        >>> trace = trace_layers(sub, model, images)
        >>> [s.label for s in trace.sites], trace.linked
        (['L1B1C1', 'L1B1C2', 'L2B1SC'], [True, False])
    """
    kept_map = sub.kept_filters()
    sites = [s for s in sub.sites.filters if s.name in kept_map]
    kept = [kept_map[s.name] for s in sites]
    if not sites:
        return LayerTrace([], [], [])
    device = next(model.parameters()).device
    example = images[:1] if images is not None else torch.zeros(1, *sub.sites.input_shape[1:])
    with thresholded(sub, model):
        links = _direct_links(sub, model, sites, example.to(device))
        if images is None:
            return LayerTrace(sites, kept, links)
        activations, attribution, predictions = _measure(model, sites, kept, images.to(device))
    return LayerTrace(sites, kept, links, activations, attribution, predictions)


def _rank(item: Tuple[float, Tuple[int, ...]]) -> Tuple[float, Tuple[int, ...]]:
    return -item[0], item[1]


def kbest_paths(steps: Sequence[Tensor], final: Tensor, k: int) -> List[Tuple[float, Tuple[int, ...]]]:
    """The ``k`` strongest paths through layered nodes, by exact k-best dynamic programming.

    ``steps[l]`` is the ``(n_l, n_{l+1})`` matrix of contributions from node ``i`` of layer ``l`` to
    node ``j`` of layer ``l+1``; ``final`` the ``(n_m,)`` contributions of the last layer's nodes.
    A path's strength is its contributions summed left to right; ties go to the lexicographically
    smaller index tuple. Returns ``[(strength, (i_1, .., i_m)), ...]``, strongest first.

    Example:
        >>> kbest_paths([torch.tensor([[1.0, 0.0], [0.0, 3.0]])], torch.tensor([0.0, 1.0]), k=2)
        [(4.0, (1, 1)), (2.0, (0, 1))]
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    first = steps[0].shape[0] if steps else final.shape[0]
    beams: List[List[Tuple[float, Tuple[int, ...]]]] = [[(0.0, (i,))] for i in range(first)]
    for step in steps:
        table = step.double().tolist()
        beams = [heapq.nsmallest(k, ((s + table[i][j], p + (j,)) for i, beam in enumerate(beams)
                                     for s, p in beam), key=_rank) for j in range(step.shape[1])]
    ends = final.double().tolist()
    return heapq.nsmallest(k, ((s + ends[p[-1]], p) for beam in beams for s, p in beam), key=_rank)


def _image_steps(trace: LayerTrace, weights: List[Optional[Tensor]], n: int) -> List[Tensor]:
    """Per consecutive pair, the (n_l, n_{l+1}) edge contributions for image ``n``."""
    acts = [a[n].double() for a in trace.activations]
    steps = []
    for l, weight in enumerate(weights):
        if weight is None:
            steps.append(acts[l][:, None] * acts[l + 1][None, :])
        else:
            steps.append(weight.double() * acts[l][:, None])
    return steps


def extract_chains(sub: Subnetwork, model: nn.Module, images: Tensor, k: int = 2) -> List[List[Chain]]:
    """The ``k`` strongest chains of every image (paper Fig. 4-5 show ``k = 2``).

    Args:
        sub: the sub-network; model: the model it was fitted on, without hookchains hooks.
        images: N x C x H x W, preprocessed like the fitting images; k: chains per image.

    Returns:
        per image, up to ``k`` :class:`Chain` s, strongest first (empty when no layer is kept).

    Example:
        >>> best = extract_chains(sub, model, images)[3][0]
        >>> best.strength, [f.label for f in best.filters]
        (7.91, ['L0C1_12', 'L1B1C2_40', 'L4B2C3_301'])
    """
    trace = trace_layers(sub, model, images)
    if not trace.sites:
        return [[] for _ in range(images.shape[0])]
    weights = [channel_weights(sub, model, after)[trace.kept[l + 1]][:, trace.kept[l]].T if linked else None
               for l, (after, linked) in enumerate(zip(trace.sites[1:], trace.linked))]
    result = []
    for n in range(images.shape[0]):
        steps = _image_steps(trace, weights, n)
        final = trace.logit_attribution[n].double()
        chains = []
        for strength, path in kbest_paths(steps, final, k):
            parts = [float(steps[l][path[l], path[l + 1]]) for l in range(len(steps))] + [float(final[path[-1]])]
            filters = [ChainFilter(s.name, trace.kept[l][i], f"{s.label}_{trace.kept[l][i]}")
                       for l, (s, i) in enumerate(zip(trace.sites, path))]
            chains.append(Chain(filters, strength, parts, list(trace.linked), n, int(trace.predictions[n])))
        result.append(chains)
    return result
