"""Draw a sub-network the way the paper does (Fig. 4-5, section 4.3): kept filters by layer, coloured
by score, connected by their strongest weights.

The drawing is a Graphviz graph laid out left to right:

* one column (a ``rank=same`` cluster) per kept layer, in network order (``sub.sites.filters``); one
  node per kept filter labelled in the paper's scheme ``f"{site.label}_{index}"`` (``L3B1C2_18``);
* node colour: the filter's score divided by the largest kept score, on the blue-to-red ``jet`` map
  of :mod:`hookchains.viz.heatmap` ("the redder the node, the larger the scaling score"), with a colour
  bar under the title. When the kept scores tie (spread under 5 % of the largest: a fit that drives
  kept scores to 1 makes the score colour say nothing), the colour is the filter's *importance*
  instead: its largest share of what it feeds (summed drawn edge strength, or mean |logit share|),
  relative to the strongest filter of its layer; the colour bar says which; shortcut convs (labels containing ``SC``) get a dashed border;
* edges where the network really connects two kept filters (:mod:`hookchains.core.dataflow`: a nonzero
  weight, through activations, pooling and residual identities -- also between layers that are not
  adjacent in the drawing, when a residual path skips a kept layer), with the one edge value of
  :meth:`hookchains.core.dataflow.Dataflow.strength`: ``|mean over the task images of E[v, u] * r[u]|``
  (``u``'s first-order share of ``v``'s output), without images ``|E[v, u]|``. For readability each
  node keeps its ``max_edges_per_node`` strongest incoming edges per source layer, and of those only
  the ones of at least 10 % of the strongest edge between the two layers; pen width is proportional
  to strength within each pair of layers. Invisible edges keep the columns in order. A model whose
  connections cannot be determined gets no edges and says why under the title;
* removed gated layers/blocks (section 3.1, Eq. 6-7) appear as a thin grey "skipped" marker between
  the columns they sat between; runs of removed blocks share one marker;
* the output classes the chains end in (:mod:`hookchains.analysis.chains`, with images) as a last
  column, a dashed edge from each chain's last filter;
* title: the paper-style counts, e.g. "13/53 layers, 77/26560 filters" (ResNet-50 has 53 conv layers);
  each column's label says how many filters the layer keeps;
* above ``max_nodes`` (200) kept filters, every filter a chain uses is drawn, then each layer's best,
  then the highest-scoring (ties: the most important) while a layer has fewer than
  ``2 * max_nodes / layers``; each layer with undrawn filters ends in
  "+N more", and the title says how many are drawn.

:func:`layout` computes what is drawn (:class:`Layout`); the HTML explorer
(:mod:`hookchains.viz.explorer`) draws the same layout in the browser.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hookchains.core.testing import random_subnetwork
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    >>> images = torch.randn(4, 3, 32, 32)
    >>> sub = random_subnetwork(model, images[:1], keep=0.5)      # or hookchains.fit(...)
    >>> render_graph(sub, model, "subnet.pdf", images=images)
    PosixPath('subnet.pdf')
"""
from __future__ import annotations

import functools
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import graphviz
import torch
from timm.data import ImageNetInfo
from torch import Tensor, nn

from hookchains.analysis.chains import Chain, extract_chains
from hookchains.core.dataflow import Dataflow, DataflowError, trace_dataflow
from hookchains.core.io import PathLike, atomic_write_bytes
from hookchains.core.sites import FilterSite
from hookchains.core.subnetwork import Subnetwork
from hookchains.viz.heatmap import apply_colormap

__all__ = ["GRAPH_FORMATS", "MAX_NODES", "Column", "Layout", "build_graph", "graph_bytes", "imagenet_names", "layout",
           "output_names", "render_graph"]

GRAPH_FORMATS = ("pdf", "svg", "png", "dot")
MAX_NODES = 200  # the paper's drawings hold 77-158 filters; beyond ~200 a graph stops being readable
_EDGE_FLOOR = 0.10  # edges below this fraction of the strongest edge of their layer pair are dropped
_DOT_MISSING = ("Graphviz's `dot` program is not on PATH; install it (apt-get install graphviz, brew install "
                "graphviz, or conda install -c conda-forge graphviz) or use format='dot'")


@functools.lru_cache(maxsize=1)
def imagenet_names() -> Tuple[List[str], List[str]]:
    """ImageNet-1k class descriptions and synsets (timm's tables, no network)."""
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)], list(info.label_names())


def output_names(count: int, class_indices: Mapping[str, int]) -> List[str]:
    """A name per model output: ImageNet's for 1000 outputs, else ``class i``; task names win.

    Example: ``output_names(3, {"cat": 1})`` is ``['class 0', 'cat', 'class 2']``."""
    names = list(imagenet_names()[0]) if count == 1000 else [f"class {i}" for i in range(count)]
    for name, index in class_indices.items():
        names[index] = name
    return names


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(255 * float(c)):02x}" for c in rgb)


def _node_colours(values: Tensor) -> List[Tuple[str, str]]:
    """(fill, font) colours for normalised scores: the jet map, white text on dark fills."""
    rgb = apply_colormap(values.float()[None, :].clamp(0, 1), "jet")[:, 0, :].T
    luminance = rgb @ torch.tensor([0.299, 0.587, 0.114])
    return [(_hex(c), "white" if lum < 0.5 else "black") for c, lum in zip(rgb.tolist(), luminance.tolist())]


def _title_label(sub: Subnetwork, lay: Layout) -> str:
    """HTML-like label: the paper-style counts over a colour bar of the colour scale (and a note)."""
    c = sub.counts()
    title = f"{c['layers_kept']}/{c['layers_total']} layers, {c['filters_kept']}/{c['filters_total']} filters"
    if c["gates_total"]:
        title += f", {c['gates_kept']}/{c['gates_total']} gated blocks kept"
    if lay.drawn < c["filters_kept"]:
        title += f" (drawn: {lay.drawn}; every chain filter, then the highest-scoring; +N more per layer)"
    cells = "".join(f'<TD BGCOLOR="{fill}" WIDTH="16" HEIGHT="10"></TD>'
                    for fill, _ in _node_colours(torch.linspace(0, 1, 10)))
    low, high = ("score 0", f"{lay.top:.3g}") if lay.colour_by == "score" else \
        ("importance 0 (scores tie)", "1")
    note = lay.note
    return (f'<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1"><TR><TD COLSPAN="12"><B>{html.escape(title)}'
            f'</B></TD></TR><TR><TD ALIGN="RIGHT"><FONT POINT-SIZE="9">{low}</FONT></TD>{cells}'
            f'<TD ALIGN="LEFT"><FONT POINT-SIZE="9">{high}</FONT></TD></TR>'
            + (f'<TR><TD COLSPAN="12"><FONT POINT-SIZE="9">{html.escape(note)}</FONT></TD></TR>' if note else '')
            + '</TABLE>>')


def _strong_edges(strength: Tensor, per_node: int) -> List[Tuple[int, int, float]]:
    """(u, v, strength / strongest) of the edges the module docstring's rule keeps."""
    top = float(strength.max())
    if top <= 0 or per_node <= 0:
        return []
    order = torch.sort(strength, dim=0, descending=True, stable=True).indices[:per_node]
    edges = []
    for v in range(strength.shape[1]):
        for u in sorted(order[:, v].tolist()):
            value = float(strength[u, v])
            if value > 0 and value >= _EDGE_FLOOR * top:
                edges.append((u, v, value / top))
    return edges


@dataclass
class Column:
    """One column of the drawing: a kept layer (``site``, all its ``kept`` filters, the ``shown`` ones)
    or a marker for a run of removed gated blocks (``skipped``: their labels)."""

    site: Optional[FilterSite] = None
    kept: List[int] = field(default_factory=list)
    shown: List[int] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    @property
    def hidden(self) -> int:
        """Kept filters of the layer that are not drawn (the column's "+N more")."""
        return len(self.kept) - len(self.shown)


Filter = Tuple[str, int]  # (filter site name, channel)


@dataclass
class Layout:
    """What the drawing shows, shared by the Graphviz graph and the HTML explorer (module docstring).

    Attributes:
        columns: kept layers and removed-gate markers, in network order.
        colour_by: ``"score"``, or ``"importance"`` when the kept scores tie (spread under 5 %).
        colour: kept filter -> its colour value in [0, 1] (score / largest kept score, or importance).
        top: the largest kept score.
        importance: kept filter -> its largest share of what it feeds, relative to the strongest filter
            of its layer, in [0, 1] (needs a model and images; empty otherwise).
        edges: ``(producer filter, consumer filter, strength / strongest of the pair, strength)``.
        outputs: ``(model output index, name)`` of the output classes the chains end in.
        output_edges: ``(last filter of a chain, output index)``, each once.
        chains: per image, its chains (:func:`hookchains.analysis.chains.extract_chains`); empty without images.
        note: why no edges are drawn, when they cannot be determined.
    """

    columns: List[Column]
    colour_by: str
    colour: Dict[Filter, float]
    top: float
    importance: Dict[Filter, float] = field(default_factory=dict)
    edges: List[Tuple[Filter, Filter, float, float]] = field(default_factory=list)
    outputs: List[Tuple[int, str]] = field(default_factory=list)
    output_edges: List[Tuple[Filter, int]] = field(default_factory=list)
    chains: List[List[Chain]] = field(default_factory=list)
    note: str = ""

    @property
    def drawn(self) -> int:
        return sum(len(c.shown) for c in self.columns)


def _shown_filters(sub: Subnetwork, max_nodes: Optional[int], rank: Callable[[Filter], Tuple[float, float]],
                   required: Set[Filter]) -> Dict[str, List[int]]:
    """Kept filters to draw: all, or the ``required`` ones, each layer's best, then the best by ``rank``."""
    kept = sub.kept_filters()
    if max_nodes is None or sum(len(v) for v in kept.values()) <= max_nodes:
        return kept
    chosen = {n: {max(idx, key=lambda j: rank((n, j)))} for n, idx in kept.items()}
    for n, j in required:
        chosen[n].add(j)
    budget = max_nodes - sum(len(v) for v in chosen.values())
    cap = max(2 * max_nodes // len(kept), 1)  # no layer takes the whole budget
    for n, j in sorted(((n, j) for n, idx in kept.items() for j in idx), key=lambda f: (rank(f), f), reverse=True):
        if budget <= 0:
            break
        if j not in chosen[n] and len(chosen[n]) < cap:
            chosen[n].add(j)
            budget -= 1
    return {n: sorted(v) for n, v in chosen.items()}


def _columns(sub: Subnetwork, shown: Dict[str, List[int]]) -> List[Column]:
    """Kept layers and removed-gate markers in network order (consecutive markers merged)."""
    order = {s.name: i for i, s in enumerate(sub.sites.filters)}
    kept = sub.kept_filters()
    items: List[Tuple[int, Column]] = [(order[s.name], Column(site=s, kept=list(kept[s.name]), shown=shown[s.name]))
                                       for s in sub.sites.filters if s.name in kept]
    removed = set(sub.removed_gates)
    for gate in sub.sites.gates:
        if gate.name in removed:
            position = min((order[f] for f in gate.filter_sites), default=len(order))
            items.append((position, Column(skipped=[gate.label])))
    columns: List[Column] = []
    for _, column in sorted(items, key=lambda item: item[0]):
        if column.site is None and columns and columns[-1].site is None:
            columns[-1].skipped += column.skipped
        else:
            columns.append(column)
    return columns


def _importance(flow: Dataflow) -> Dict[Filter, float]:
    """Per kept filter: max over its consumers of its summed drawn strength (or mean |logit share|),
    divided by the largest such value in its layer."""
    result: Dict[Filter, float] = {}
    sums = [(p, flow.strength(p, c).sum(1)) for p, c in flow.pairs()]
    if flow.logit_shares is not None:
        sums += [(p, shares.double().abs().mean(0)) for p, shares in flow.logit_shares.items()]
    for producer, total in sums:
        total = total / total.max() if float(total.max()) > 0 else total
        for j, value in zip(flow.kept[flow.position(producer)], total.tolist()):
            result[(producer, j)] = max(result.get((producer, j), 0.0), float(value))
    return result


def _edges(flow: Dataflow, shown: Dict[str, List[int]], per_node: int) -> List[Tuple[Filter, Filter, float, float]]:
    """The edges the module docstring's rule keeps between shown filters."""
    result = []
    for producer, consumer in flow.pairs():
        kept_p, kept_c = flow.kept[flow.position(producer)], flow.kept[flow.position(consumer)]
        rows, cols = [kept_p.index(j) for j in shown[producer]], [kept_c.index(j) for j in shown[consumer]]
        strength = flow.strength(producer, consumer)[rows][:, cols]
        top = float(strength.max()) if strength.numel() else 0.0
        result += [((producer, shown[producer][u]), (consumer, shown[consumer][v]), rel, rel * top)
                   for u, v, rel in _strong_edges(strength, per_node)]
    return result


def _task_names(sub: Subnetwork, flow: Optional[Dataflow]) -> Dict[int, str]:
    """Model output -> name from the task's class indices (and ImageNet's names for 1000 outputs)."""
    indices = {k: int(v) for k, v in sub.task.get("class_indices", {}).items()}
    ends = [flow.connected[(p, flow.classifier)] for p in flow.feeds.get(flow.classifier, [])
            if (p, flow.classifier) in flow.connected] if flow is not None else []
    count = int(ends[0].shape[1]) if ends else 1 + max(indices.values(), default=-1)
    return {i: name for i, name in enumerate(output_names(count, indices))}


def layout(sub: Subnetwork, model: Optional[nn.Module] = None, *, images: Optional[Tensor] = None,
           chains: Optional[List[List[Chain]]] = None, names: Optional[Mapping[int, str]] = None,
           max_edges_per_node: int = 3, max_nodes: Optional[int] = MAX_NODES) -> Layout:
    """What to draw of ``sub`` (module docstring): columns, colours, edges, output classes, chains.

    ``chains`` (default: computed when ``model`` and ``images`` are given) are always drawn and give
    the output nodes; ``names`` name model outputs (default: :func:`output_names` with
    ``sub.task["class_indices"]``, ImageNet's names for 1000 outputs).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> sub = random_subnetwork(model, torch.randn(1, 3, 32, 32), keep=0.5)
        >>> lay = layout(sub, max_nodes=3)     # at least each layer's best filter; the rest is "+N more"
        >>> [c.site.label for c in lay.columns], lay.drawn, sum(c.hidden for c in lay.columns) + lay.drawn
        (['0', '2'], 3, 8)
    """
    if max_edges_per_node < 0:
        raise ValueError(f"max_edges_per_node must be >= 0, got {max_edges_per_node}")
    kept = sub.kept_filters()
    flow, note = None, ""
    if model is not None and kept:
        try:
            flow = trace_dataflow(sub, model, images)
            if chains is None and images is not None:
                chains = extract_chains(sub, model, images, k=2)
        except DataflowError as error:
            note = f"no edges drawn: {error}"
    chains = chains or []
    importance = _importance(flow) if flow is not None and flow.shares is not None else {}
    scores = {(n, j): float(sub.scores[n][j]) for n, idx in kept.items() for j in idx}
    top = max(scores.values(), default=1.0) or 1.0
    tied = bool(scores) and (top - min(scores.values())) < 0.05 * top
    colour_by = "importance" if tied and importance else "score"
    colour = {f: importance.get(f, 0.0) if colour_by == "importance" else s / top for f, s in scores.items()}
    required = {(f.site, f.index) for per_image in chains for c in per_image for f in c.filters}
    shown = _shown_filters(sub, max_nodes, lambda f: (scores[f], importance.get(f, 0.0)), required)
    names = names if names is not None else _task_names(sub, flow)
    ends = sorted({((c.filters[-1].site, c.filters[-1].index), c.target) for p in chains for c in p if c.filters})
    outputs = [(t, names.get(t, f"class {t}")) for t in sorted({t for _, t in ends})]
    edges = _edges(flow, shown, max_edges_per_node) if flow is not None else []
    return Layout(_columns(sub, shown), colour_by, colour, top, importance, edges, outputs, ends, chains, note)


def _add_column(graph: graphviz.Digraph, i: int, column: Column, sub: Subnetwork, lay: Layout) -> List[str]:
    """Draw one column; return its node ids."""
    if column.site is None:
        names = column.skipped
        text = ", ".join(names) if len(names) <= 2 else f"{names[0]} … {names[-1]} ({len(names)})"
        node = f"skip{i}"
        graph.node(node, f"skipped\n{text}", shape="box", style="filled", fillcolor="#f0f0f0", color="#b0b0b0",
                   fontcolor="#707070", fontsize="8", width="0.1", height="0.1", margin="0.03,0.02",
                   tooltip="removed (gate closed): " + ", ".join(names))
        return [node]
    site, scores = column.site, sub.scores[column.site.name]
    shortcut = "SC" in site.label
    ids = [f"n{i}_{j}" for j in column.shown]
    colours = _node_colours(torch.tensor([lay.colour[(site.name, j)] for j in column.shown]))
    with graph.subgraph(name=f"cluster_{i}") as cluster:
        cluster.attr(label=f"{site.label} ({len(column.kept)} kept)", rank="same", fontsize="9",
                     fontcolor="#505050", style="rounded,dashed" if shortcut else "rounded", color="#c8c8c8")
        for node, j, (fill, font) in zip(ids, column.shown, colours):
            importance = f", importance {lay.importance[(site.name, j)]:.2f}" if (site.name, j) in lay.importance else ""
            cluster.node(node, f"{site.label}_{j}", fillcolor=fill, fontcolor=font,
                         style="rounded,filled,dashed" if shortcut else "rounded,filled",
                         penwidth="1.6" if shortcut else "0.8",
                         tooltip=f"{site.name}[{j}] score {float(scores[j]):.3f}{importance}")
        if column.hidden:
            cluster.node(f"more{i}", f"+{column.hidden} more", shape="plaintext", fontsize="9", fontcolor="#505050")
    return ids


def _add_outputs(graph: graphviz.Digraph, lay: Layout, ids: Dict[Filter, str]) -> Optional[str]:
    """The output classes as a last column, with an edge from each chain's last filter; its first node."""
    if not lay.outputs:
        return None
    with graph.subgraph(name="cluster_outputs") as cluster:
        cluster.attr(label="output classes", rank="same", fontsize="9", fontcolor="#505050", color="#c8c8c8")
        for index, name in lay.outputs:
            cluster.node(f"out{index}", name, shape="ellipse", style="filled", fillcolor="#ffffff")
    for last, target in lay.output_edges:
        if last in ids:
            graph.edge(ids[last], f"out{target}", style="dashed", tooltip="a chain ends in this logit")
    return f"out{lay.outputs[0][0]}"


def build_graph(sub: Subnetwork, model: Optional[nn.Module] = None, *, images: Optional[Tensor] = None,
                max_edges_per_node: int = 3, max_nodes: Optional[int] = MAX_NODES,
                chains: Optional[List[List[Chain]]] = None,
                output_names: Optional[Mapping[int, str]] = None) -> graphviz.Digraph:
    """The drawing of ``sub`` as a :class:`graphviz.Digraph` (see the module docstring for the rules).

    ``model`` is needed for edges (no model: nodes only); ``images`` (the task's batch) give them
    their values (without: the weights) and the chains (or pass ``chains``), whose filters are always
    drawn and whose logits are the output nodes (named by ``output_names``, see :func:`layout`). Above
    ``max_nodes`` kept filters each layer shows "+N more"; ``None`` draws all. Nothing here runs ``dot``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 32, 32)
        >>> sub = random_subnetwork(model, images[:1], keep=0.5)      # or hookchains.fit(...)
        >>> print(build_graph(sub).source.splitlines()[0])
        digraph subnetwork {
    """
    lay = layout(sub, model, images=images, chains=chains, names=output_names,
                 max_edges_per_node=max_edges_per_node, max_nodes=max_nodes)
    graph = graphviz.Digraph("subnetwork")
    graph.attr(rankdir="LR", newrank="true", nodesep="0.06", ranksep="0.5", labelloc="t", fontname="Helvetica",
               label=_title_label(sub, lay))
    graph.attr("node", shape="box", fontname="Helvetica", fontsize="10", height="0.22", margin="0.06,0.02")
    graph.attr("edge", color="#40404099", arrowsize="0.4")
    ids = [_add_column(graph, i, c, sub, lay) for i, c in enumerate(lay.columns)]
    node_ids = {(c.site.name, j): f"n{i}_{j}" for i, c in enumerate(lay.columns) if c.site is not None
                for j in c.shown}
    firsts = [column_ids[0] for column_ids in ids if column_ids] + [_add_outputs(graph, lay, node_ids)]
    firsts = [f for f in firsts if f is not None]
    for before, after in zip(firsts, firsts[1:]):
        graph.edge(before, after, style="invis")
    for (p, u), (c, v), rel, strength in lay.edges:
        graph.edge(node_ids[(p, u)], node_ids[(c, v)], penwidth=f"{0.4 + 3.6 * rel:.2f}", tooltip=f"strength {strength:.3g}")
    return graph


def graph_bytes(graph: graphviz.Digraph, format: str = "pdf") -> bytes:
    """Render ``graph`` with Graphviz's ``dot`` (``"dot"``: the source, no ``dot`` needed).

    Raises:
        RuntimeError: ``dot`` is not installed (the message says how to install it).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 32, 32)
        >>> sub = random_subnetwork(model, images[:1], keep=0.5)      # or hookchains.fit(...)
        >>> svg = graph_bytes(build_graph(sub, model), "svg").decode()
        >>> "<svg" in svg
        True
    """
    if format not in GRAPH_FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {GRAPH_FORMATS}")
    if format == "dot":
        return graph.source.encode()
    if format == "png":
        graph = graph.copy()
        graph.attr(dpi="144")
    try:
        return graph.pipe(format=format)
    except graphviz.ExecutableNotFound:
        raise RuntimeError(_DOT_MISSING) from None


def render_graph(sub: Subnetwork, model: Optional[nn.Module], path: PathLike,
                 format: str = "pdf", *, images: Optional[Tensor] = None,
                 max_edges_per_node: int = 3, max_nodes: Optional[int] = MAX_NODES) -> Path:
    """Draw ``sub`` (paper Fig. 4-5) to ``path`` as PDF, SVG, PNG or DOT source, atomically.

    Args:
        sub: the sub-network; model: the model it was fitted on (None: no edges).
        path: output file; format: one of :data:`GRAPH_FORMATS`.
        images: the task's images, for edge values, the chains (always drawn) and the output classes
            (None: edges by weights only, no output nodes).
        max_edges_per_node: strongest incoming edges kept per node.
        max_nodes: about this many filters are drawn (every chain filter, then the highest-scoring; each
            layer says "+N more"; ``None``: all).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 32, 32)
        >>> sub = random_subnetwork(model, images[:1], keep=0.5)      # or hookchains.fit(...)
        >>> render_graph(sub, model, "runs/cat/subnet.svg", "svg", images=images)
        PosixPath('runs/cat/subnet.svg')
    """
    graph = build_graph(sub, model, images=images, max_edges_per_node=max_edges_per_node, max_nodes=max_nodes)
    return atomic_write_bytes(path, graph_bytes(graph, format))
