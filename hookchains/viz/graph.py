"""Draw a sub-network the way the paper does (Fig. 4-5, section 4.3): kept filters by layer, coloured
by score, connected by their strongest weights.

The drawing is a Graphviz graph laid out left to right:

* one column (a ``rank=same`` cluster) per kept layer, in network order (``sub.sites.filters``); one
  node per kept filter labelled in the paper's scheme ``f"{site.label}_{index}"`` (``L3B1C2_18``);
* node colour: the filter's score divided by the largest kept score, on the blue-to-red ``jet`` map
  of :mod:`hookchains.viz.heatmap` ("the redder the node, the larger the scaling score"), with a colour
  bar under the title; shortcut convs (labels containing ``SC``) get a dashed border;
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
* title: the paper-style counts, e.g. "13/53 layers, 77/26560 filters" (ResNet-50 has 53 conv layers);
* above ``max_nodes`` (200) kept filters, only the highest-scoring are drawn, at least one per layer,
  and the title says how many.

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

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import graphviz
import torch
from torch import Tensor, nn

from hookchains.core.dataflow import Dataflow, DataflowError, trace_dataflow
from hookchains.core.io import PathLike, atomic_write_bytes
from hookchains.core.sites import FilterSite
from hookchains.core.subnetwork import Subnetwork
from hookchains.viz.heatmap import apply_colormap

__all__ = ["GRAPH_FORMATS", "build_graph", "graph_bytes", "render_graph"]

GRAPH_FORMATS = ("pdf", "svg", "png", "dot")
MAX_NODES = 200  # the paper's drawings hold 77-158 filters; beyond ~200 a graph stops being readable
_EDGE_FLOOR = 0.10  # edges below this fraction of the strongest edge of their layer pair are dropped
_DOT_MISSING = ("Graphviz's `dot` program is not on PATH; install it (apt-get install graphviz, brew install "
                "graphviz, or conda install -c conda-forge graphviz) or use format='dot'")


@dataclass
class _Column:
    """One rank of the drawing: a kept layer (``site``) or a marker for removed gates."""

    site: Optional[FilterSite] = None
    kept: List[int] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


def _shown_filters(sub: Subnetwork, max_nodes: Optional[int]) -> dict:
    """Kept filters to draw: all of them, or the ``max_nodes`` highest-scoring (at least one per layer)."""
    kept = sub.kept_filters()
    if max_nodes is None or sum(len(v) for v in kept.values()) <= max_nodes:
        return kept
    ranked = sorted(((float(sub.scores[n][j]), n, j) for n, idx in kept.items() for j in idx),
                    key=lambda t: (-t[0], t[1], t[2]))
    chosen = {n: {max(idx, key=lambda j: float(sub.scores[n][j]))} for n, idx in kept.items()}
    budget = max_nodes - len(chosen)
    for _, n, j in ranked:
        if budget <= 0:
            break
        if j not in chosen[n]:
            chosen[n].add(j)
            budget -= 1
    return {n: sorted(v) for n, v in chosen.items()}


def _columns(sub: Subnetwork, max_nodes: Optional[int] = None) -> List[_Column]:
    """Kept layers and removed-gate markers in network order (consecutive markers merged)."""
    order = {s.name: i for i, s in enumerate(sub.sites.filters)}
    kept = _shown_filters(sub, max_nodes)
    items: List[Tuple[int, _Column]] = [(order[s.name], _Column(site=s, kept=kept[s.name]))
                                        for s in sub.sites.filters if s.name in kept]
    removed = set(sub.removed_gates)
    for gate in sub.sites.gates:
        if gate.name in removed:
            position = min((order[f] for f in gate.filter_sites), default=len(order))
            items.append((position, _Column(skipped=[gate.label])))
    columns: List[_Column] = []
    for _, column in sorted(items, key=lambda item: item[0]):
        if column.site is None and columns and columns[-1].site is None:
            columns[-1].skipped += column.skipped
        else:
            columns.append(column)
    return columns


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(255 * float(c)):02x}" for c in rgb)


def _node_colours(values: Tensor) -> List[Tuple[str, str]]:
    """(fill, font) colours for normalised scores: the jet map, white text on dark fills."""
    rgb = apply_colormap(values.float()[None, :].clamp(0, 1), "jet")[:, 0, :].T
    luminance = rgb @ torch.tensor([0.299, 0.587, 0.114])
    return [(_hex(c), "white" if lum < 0.5 else "black") for c, lum in zip(rgb.tolist(), luminance.tolist())]


def _title_label(sub: Subnetwork, top_score: float, drawn: int, note: str = "") -> str:
    """HTML-like label: the paper-style counts over a colour bar of the score scale (and a note)."""
    c = sub.counts()
    title = f"{c['layers_kept']}/{c['layers_total']} layers, {c['filters_kept']}/{c['filters_total']} filters"
    if c["gates_total"]:
        title += f", {c['gates_kept']}/{c['gates_total']} gated blocks kept"
    if drawn < c["filters_kept"]:
        title += f" (drawn: the {drawn} highest-scoring filters)"
    cells = "".join(f'<TD BGCOLOR="{fill}" WIDTH="16" HEIGHT="10"></TD>'
                    for fill, _ in _node_colours(torch.linspace(0, 1, 10)))
    return (f'<<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="1"><TR><TD COLSPAN="12"><B>{html.escape(title)}'
            f'</B></TD></TR><TR><TD ALIGN="RIGHT"><FONT POINT-SIZE="9">score 0</FONT></TD>{cells}'
            f'<TD ALIGN="LEFT"><FONT POINT-SIZE="9">{top_score:.3g}</FONT></TD></TR>'
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


def _edge_strengths(flow: Dataflow, shown: dict) -> List[Tuple[str, str, Tensor]]:
    """Per connected pair of kept layers, ``(producer, consumer, strengths between shown filters)``."""
    result = []
    for producer, consumer in flow.pairs():
        kept_p, kept_c = flow.kept[flow.position(producer)], flow.kept[flow.position(consumer)]
        rows = [kept_p.index(j) for j in shown[producer]]
        cols = [kept_c.index(j) for j in shown[consumer]]
        result.append((producer, consumer, flow.strength(producer, consumer)[rows][:, cols]))
    return result


def _add_column(graph: graphviz.Digraph, i: int, column: _Column, sub: Subnetwork, top: float) -> List[str]:
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
    ids = [f"n{i}_{j}" for j in column.kept]
    colours = _node_colours(scores[column.kept].float() / top)
    with graph.subgraph(name=f"cluster_{i}") as cluster:
        cluster.attr(label=site.label, rank="same", fontsize="9", fontcolor="#505050",
                     style="rounded,dashed" if shortcut else "rounded", color="#c8c8c8")
        for node, j, (fill, font) in zip(ids, column.kept, colours):
            cluster.node(node, f"{site.label}_{j}", fillcolor=fill, fontcolor=font,
                         style="rounded,filled,dashed" if shortcut else "rounded,filled",
                         penwidth="1.6" if shortcut else "0.8",
                         tooltip=f"{site.name}[{j}] score {float(scores[j]):.3f}")
    return ids


def build_graph(sub: Subnetwork, model: Optional[nn.Module] = None, *, images: Optional[Tensor] = None,
                max_edges_per_node: int = 3, max_nodes: Optional[int] = MAX_NODES) -> graphviz.Digraph:
    """The drawing of ``sub`` as a :class:`graphviz.Digraph` (see the module docstring for the rules).

    ``model`` is needed for edges (no model: nodes only); ``images`` (the task's batch) give them
    their values (without: the weights). Above ``max_nodes`` kept filters only the highest-scoring ``max_nodes`` are drawn
    (every kept layer keeps its best one) and the title says so; ``None`` draws all. Nothing here
    runs ``dot``.

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
    if max_edges_per_node < 0:
        raise ValueError(f"max_edges_per_node must be >= 0, got {max_edges_per_node}")
    columns = _columns(sub, max_nodes)
    layers = [c for c in columns if c.site is not None]
    top = max((float(sub.scores[c.site.name][c.kept].max()) for c in layers), default=1.0) or 1.0
    flow, note = None, ""
    if model is not None and layers:
        try:
            flow = trace_dataflow(sub, model, images)
        except DataflowError as error:
            note = f"no edges drawn: {error}"
    graph = graphviz.Digraph("subnetwork")
    graph.attr(rankdir="LR", newrank="true", nodesep="0.06", ranksep="0.5", labelloc="t", fontname="Helvetica",
               label=_title_label(sub, top, sum(len(c.kept) for c in layers), note))
    graph.attr("node", shape="box", fontname="Helvetica", fontsize="10", height="0.22", margin="0.06,0.02")
    graph.attr("edge", color="#40404099", arrowsize="0.4")
    ids = [_add_column(graph, i, c, sub, top) for i, c in enumerate(columns)]
    for before, after in zip(ids, ids[1:]):
        graph.edge(before[0], after[0], style="invis")
    if flow is None:
        return graph
    layer_ids = {c.site.name: i for c, i in zip(columns, ids) if c.site is not None}
    for producer, consumer, strength in _edge_strengths(flow, {c.site.name: c.kept for c in layers}):
        for u, v, rel in _strong_edges(strength, max_edges_per_node):
            graph.edge(layer_ids[producer][u], layer_ids[consumer][v], penwidth=f"{0.4 + 3.6 * rel:.2f}",
                       tooltip=f"strength {rel * float(strength.max()):.3g}")
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
        images: the task's images, for edge values (None: by weights only).
        max_edges_per_node: strongest incoming edges kept per node.
        max_nodes: draw at most this many filters (the highest-scoring; ``None``: all).

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
