"""Chains: the per-image paths through a sub-network that the paper draws (Fig. 4-6, section 4.3-4.4).

The paper shows, for every image, two "NeuroChains" -- filters of the retained layers "stitched by
filters step by step" -- but never says how a chain is chosen. hookchains defines it as follows.

**Graph.** The nodes are the kept filters of a :class:`~hookchains.Subnetwork` that are not dead; the
edges are the network's real connections between them, as :mod:`hookchains.core.dataflow` finds them:
a conv/linear weight that is not zero, through activations, pooling and residual identities (same
channel; depthwise convs connect a channel to itself only). A path may skip a kept layer through a
residual identity. An image ``x`` is evaluated by the *thresholded* network (section 3.2).

**Values, one unit.** An edge ``u -> v`` is worth ``c(u, v) = E[v, u] * r[u]``: ``u``'s first-order
share of ``v``'s hooked output (``E`` the effective weight, ``r`` the gradient x activation share of
``u`` in what ``v``'s conv really reads, after the activation; :mod:`hookchains.core.dataflow`). A chain
ends in the predicted logit ``z_c`` of the thresholded network with ``u``'s gradient x activation
share of ``z_c``. A node whose share is exactly 0 in every consumer on the image (e.g. zero after its
ReLU/ReLU6 everywhere) contributes nothing and is in no chain of that image.

**Chains.** A chain starts at a filter that reads the image, follows edges and ends in the logit; its
**strength** is the *sum* of its edge values and its end value. The sum, not the minimum:
contributions are additive first-order shares, so their sum is the path's total share, whereas a
minimum lets one weak link decide. The sum also makes "the k strongest paths" an exact dynamic
programme over the layers (:func:`kbest_paths`).

**Diverse chains.** The strongest paths usually differ in one filter. With ``diversity = d > 0``,
:func:`extract_chains` returns chains that pairwise differ in at least a share ``d`` of their filters
(:meth:`Chain.difference`): greedily, strongest first, from the ``pool`` strongest paths; when the
pool runs out, the strongest path through none of the filters already chosen (difference 1) is added.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hookchains.core.testing import random_subnetwork
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    >>> images = torch.randn(2, 3, 8, 8)
    >>> sub = random_subnetwork(model, images[:1], keep=0.6, seed=6)     # or hookchains.fit(...)
    >>> chains = extract_chains(sub, model, images, k=2, diversity=0.5)
    >>> [[f.label for f in c.filters] for c in chains[0]]    # image 0: depthwise steps stay on their channel
    [['0_0', '2_0'], ['0_1', '2_1']]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, nn

from hookchains.core.dataflow import INPUT, Dataflow, trace_dataflow
from hookchains.core.subnetwork import Subnetwork

__all__ = ["Chain", "ChainFilter", "extract_chains", "kbest_paths"]

Path = Tuple[Tuple[int, int], ...]  # ((layer, node), ...)


class ChainFilter(NamedTuple):
    """One filter of a chain: its site, channel index and paper-style label (``"L3B1C2_18"``)."""

    site: str
    index: int  # type: ignore[assignment]  # the channel index (public since 0.1); shadows tuple.index
    label: str


@dataclass
class Chain:
    """One path from a filter reading the image to the predicted logit (module docstring).

    Attributes:
        filters: the path's filters in network order (a kept layer may be skipped).
        strength: sum of ``contributions``.
        contributions: the ``len(filters) - 1`` edge values, then the logit share of the last filter.
        image: index of the image in the batch; target: the class whose logit the chain ends in.
    """

    filters: List[ChainFilter]
    strength: float
    contributions: List[float]
    image: int
    target: int

    @property
    def key(self) -> Tuple[Tuple[str, int], ...]:
        """The chain's filters as ``((site, index), ...)``: equal for the same path on any image."""
        return tuple((f.site, f.index) for f in self.filters)

    def difference(self, other: Chain) -> float:
        """Share of filters not in common: ``1 - |shared| / max(len(self), len(other))``, in [0, 1]."""
        shared = len(set(self.key) & set(other.key))
        return 1.0 - shared / max(len(self.filters), len(other.filters))


def _candidates(beams: List[Tensor], edges: Mapping[Tuple[int, int], Tensor], start: Optional[Tensor], b: int):
    """All one-step extensions into layer ``b``: (M, n_b) values and the segments decoding a row."""
    rows, segments, offset = [], [], 0
    if start is not None:
        rows.append(start.double()[None, :])
        segments.append((offset, None))
        offset += 1
    for a in range(b):
        if (a, b) in edges:
            grown = beams[a][:, :, None] + edges[(a, b)].double()[:, None, :]  # (n_a, k, n_b)
            rows.append(grown.reshape(-1, grown.shape[-1]))
            segments.append((offset, a))
            offset += rows[-1].shape[0]
    return rows, segments


def _top(values: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Per column the ``k`` largest of ``(M, n)`` values and their rows, ties to the lower row (stable)."""
    if values.shape[0] < k:
        pad = torch.full((k - values.shape[0], values.shape[1]), float("-inf"), dtype=values.dtype)
        values = torch.cat([values, pad])
    threshold = values.topk(k, dim=0).values[-1]
    above = values > threshold
    tied = values == threshold
    chosen = above | (tied & (tied.cumsum(0) <= k - above.sum(0)))
    rows = chosen.T.nonzero()[:, 1].view(-1, k).T  # (k, n), ascending rows per column
    picked = values.gather(0, rows)
    picked, order = torch.sort(picked, dim=0, descending=True, stable=True)
    return picked, rows.gather(0, order)


def _decode(segments, index: int, k: int) -> Optional[Tuple[int, int, int]]:
    """Candidate row -> (layer, node, rank) of the prefix it extends, or None for a start."""
    offset, layer = max((s for s in segments if s[0] <= index), key=lambda s: s[0])
    return None if layer is None else (layer, (index - offset) // k, (index - offset) % k)


def kbest_paths(sizes: Sequence[int], edges: Mapping[Tuple[int, int], Tensor], starts: Mapping[int, Tensor],
                ends: Mapping[int, Tensor], k: int) -> List[Tuple[float, Path]]:
    """The ``k`` strongest paths of a layered graph, by exact k-best dynamic programming.

    Layers ``0 .. m-1`` are in topological order (edges go from a lower to a higher layer, possibly
    skipping layers). ``edges[(a, b)]`` is the ``(sizes[a], sizes[b])`` matrix of edge values,
    ``-inf`` where there is no edge; ``starts[a]`` / ``ends[a]`` (``(sizes[a],)``) the value of
    starting / ending a path at a node (``-inf``: not allowed; a layer missing from the mapping: not
    allowed at all). A path's strength is its start, edge and end values summed. Exact: the ``k``
    best partial paths into a node suffice, since every continuation adds the same value to each.
    Ties are broken by enumeration order (a start first, then lower source layer, lower node index,
    better rank), stably. Cost ``O(k * number of node pairs)``.

    Returns:
        up to ``k`` ``(strength, ((layer, node), ...))`` with finite strength, strongest first.

    Example:
        >>> inf = float("inf")
        >>> kbest_paths([2, 2], {(0, 1): torch.tensor([[1.0, -inf], [0.0, 3.0]])},
        ...             {0: torch.zeros(2)}, {1: torch.tensor([0.0, 1.0])}, k=2)
        [(4.0, ((0, 1), (1, 1))), (1.0, ((0, 0), (1, 0)))]
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    beams: List[Tensor] = []  # per layer (n, k) best partial strengths
    backs: List[Tuple[Tensor, list]] = []
    for b, size in enumerate(sizes):
        rows, segments = _candidates(beams, edges, starts.get(b), b)
        if not rows:
            beams.append(torch.full((size, k), float("-inf"), dtype=torch.float64))
            backs.append((torch.zeros(k, size, dtype=torch.long), segments))
            continue
        values, order = _top(torch.cat(rows), k)
        beams.append(values.T.contiguous())
        backs.append((order, segments))
    finals = [(beams[a] + ends[a].double()[:, None]).reshape(-1) for a in range(len(sizes)) if a in ends]
    layers = [a for a in range(len(sizes)) if a in ends]
    if not finals:
        return []
    values, order = torch.sort(torch.cat(finals), descending=True, stable=True)
    sizes_k = [beams[a].numel() for a in layers]
    result = []
    for value, index in zip(values[:k].tolist(), order[:k].tolist()):
        if value == float("-inf"):
            break
        segment = next(i for i in range(len(layers)) if index < sum(sizes_k[:i + 1]))
        local = index - sum(sizes_k[:segment])
        result.append((value, _backtrack(backs, layers[segment], local // k, local % k, k)))
    return result


def _backtrack(backs, layer: int, node: int, rank: int, k: int) -> Path:
    """The path whose ``rank``-th best prefix ends at ``(layer, node)``."""
    path = [(layer, node)]
    while True:
        order, segments = backs[layer]
        previous = _decode(segments, int(order[rank, node]), k)
        if previous is None:
            return tuple(reversed(path))
        layer, node, rank = previous
        path.append((layer, node))


def _image_graph(edges: Dict, ends: Dict, silent: Dict[int, Tensor], n: int,
                 banned: Set[Tuple[int, int]]):
    """Edge and end values of image ``n`` with silent and ``banned`` nodes removed."""
    def cut(values: Tensor, layer: int, dim: int) -> Tensor:
        mask = silent[layer][n].clone()
        for l, node in banned:
            if l == layer:
                mask[node] = True
        return values.masked_fill(mask.view(-1, *([1] * dim)), float("-inf"))

    image_edges = {(a, b): cut(v[n], a, 1) for (a, b), v in edges.items()}
    for (a, b) in image_edges:
        for l, node in banned:
            if l == b:
                image_edges[(a, b)][:, node] = float("-inf")
    image_ends = {a: cut(v[n], a, 0) for a, v in ends.items()}
    return image_edges, image_ends


def _starts(flow: Dataflow) -> Dict[int, Tensor]:
    """Start values: 0 at live filters of sites that read the image."""
    starts = {}
    for i, site in enumerate(flow.sites):
        if INPUT in flow.feeds.get(site.name, []):
            starts[i] = torch.zeros(len(flow.kept[i]), dtype=torch.float64).masked_fill(
                ~flow.live(site.name), float("-inf"))
    return starts


def _select(candidates: List[Chain], k: int, diversity: float) -> List[Chain]:
    """Greedy: strongest first, each differing from every chosen one in at least ``diversity``."""
    chosen: List[Chain] = []
    for chain in candidates:
        if all(chain.difference(c) >= diversity for c in chosen):
            chosen.append(chain)
        if len(chosen) == k:
            break
    return chosen


def extract_chains(sub: Subnetwork, model: nn.Module, images: Tensor, k: int = 2, diversity: float = 0.0,
                   pool: Optional[int] = None) -> List[List[Chain]]:
    """The ``k`` strongest chains of every image (paper Fig. 4-5 show ``k = 2``), module docstring.

    Args:
        sub: the sub-network; model: the model it was fitted on, without hookchains hooks.
        images: N x C x H x W, preprocessed like the fitting images; k: chains per image.
        diversity: least share of filters in which any two returned chains differ (0: the k strongest).
        pool: strongest paths searched for diverse ones (default ``10 * k`` when ``diversity > 0``).

    Returns:
        per image, up to ``k`` :class:`Chain` s, strongest first (empty when no path reaches the logit).

    Raises:
        DataflowError: the model's connections cannot be determined (:mod:`hookchains.core.dataflow`).
        ValueError: ``diversity`` outside [0, 1] or ``k < 1``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
        >>> images = torch.randn(2, 3, 8, 8)
        >>> sub = random_subnetwork(model, images[:1], keep=0.6, seed=6)     # or hookchains.fit(...)
        >>> best = extract_chains(sub, model, images)[1][0]       # image 1, strongest chain
        >>> [f.label for f in best.filters], best.target
        (['0_0', '2_0'], 0)
        >>> round(best.strength, 3), [round(c, 3) for c in best.contributions]
        (0.013, [0.004, 0.009])
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity is a share of filters in [0, 1], got {diversity}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    flow = trace_dataflow(sub, model, images)
    if not flow.sites:
        return [[] for _ in range(images.shape[0])]
    edges = {(flow.position(p), flow.position(c)): flow.edge_values(p, c) for p, c in flow.pairs()}
    ends = {i: flow.end_values(s.name) for i, s in enumerate(flow.sites)}
    silent = {i: flow.silent(s.name) for i, s in enumerate(flow.sites)}
    graph = _Graph(flow, edges, ends, silent, _starts(flow), [len(idx) for idx in flow.kept])
    return [graph.chains(n, k, diversity, pool or 10 * k) for n in range(images.shape[0])]


@dataclass
class _Graph:
    """The chain graph of a batch: edge and end values per image, silent nodes, starts."""

    flow: Dataflow
    edges: Dict[Tuple[int, int], Tensor]
    ends: Dict[int, Tensor]
    silent: Dict[int, Tensor]
    starts: Dict[int, Tensor]
    sizes: List[int]

    def chain(self, n: int, strength: float, path: Path, image: Tuple[Dict, Dict]) -> Chain:
        """A path of image ``n`` as a :class:`Chain`, its values read back from ``image`` (edges, ends)."""
        image_edges, image_ends = image
        parts = [float(image_edges[(a, b)][u, v]) for (a, u), (b, v) in zip(path, path[1:])]
        parts.append(float(image_ends[path[-1][0]][path[-1][1]]))
        sites, kept = self.flow.sites, self.flow.kept
        filters = [ChainFilter(sites[l].name, kept[l][i], f"{sites[l].label}_{kept[l][i]}") for l, i in path]
        return Chain(filters, strength, parts, n, int(self.flow.traced()[2][n]))

    def best(self, n: int, k: int, banned: Set[Tuple[int, int]]) -> List[Tuple[float, Path]]:
        """The ``k`` strongest paths of image ``n`` through none of the ``banned`` (layer, node)s."""
        image_edges, image_ends = _image_graph(self.edges, self.ends, self.silent, n, banned)
        return kbest_paths(self.sizes, image_edges, self.starts, image_ends, k)

    def chains(self, n: int, k: int, diversity: float, pool: int) -> List[Chain]:
        """The chains of image ``n`` (module docstring: strongest, or diverse from a pool, then disjoint)."""
        image = _image_graph(self.edges, self.ends, self.silent, n, set())
        paths = kbest_paths(self.sizes, image[0], self.starts, image[1], k if diversity == 0 else pool)
        chosen = _select([self.chain(n, s, p, image) for s, p in paths], k, diversity)
        while diversity > 0 and len(chosen) < k:
            position = self.flow.position
            banned = {(position(f.site), self.flow.kept[position(f.site)].index(f.index))
                      for c in chosen for f in c.filters}
            found = self.best(n, 1, banned)
            if not found:
                break
            chosen.append(self.chain(n, *found[0], image))
        return chosen
