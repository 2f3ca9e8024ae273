"""A sub-network and its chains as one self-contained HTML page, and as one figure for papers.

:func:`write_report` writes what the paper's case studies show (section 4.3-4.4, Fig. 4-6) for a task
as one interactive page (:mod:`hookchains.viz.explorer`), whose spine is the sub-network graph of
:func:`hookchains.viz.graph.layout` (every chain filter drawn, "+N more" per layer, output classes):

* the summary and fidelity figures (``sub.summary()``, ``sub.counts()``, ``sub.fidelity``) and the task
  images with their true class and the original model's prediction (a click shows the image's chains);
* a click on a filter: its layer, score, importance, its degradation when removed (Fig. 2, measured
  here for the filters the chains use: :func:`hookchains.evaluation.faithfulness.faithfulness`), its
  feature visualisation (the pattern the filter
  maximises, :mod:`hookchains.analysis.featvis`; a flat one is marked as failed, never shown) and its
  heatmap on every task image sorted by peak activation (:mod:`hookchains.viz.heatmap`, appendix A.4,
  from the original model; normalised per map, so each is captioned with its peak), with the chains
  through it highlighted (:func:`hookchains.analysis.chains.extract_chains`, ``chains_per_image`` per
  image). Pictures are computed for the filters the chains use;
* a class: its chains highlighted and its sub-network with each filter's heatmap on a correctly
  classified image of the class (Fig. 4-5); two classes: shared and class-specific filters, and the
  chains of their misclassified images (Fig. 6).

A token run (a ViT, :class:`~hookchains.tokens.TokenSubnetwork`) gets the same explorer with its own
spine and panels (:mod:`hookchains.viz.token_report`: token-by-layer cells, Fig. 7 per image).

The page is one file: every picture stored once, an inline script allowed by its hash, and a
Content-Security-Policy that forbids every network request. Feature visualisations are cached under
``run_dir/featvis`` (filters repeat across images and runs), so a second report is fast.

:func:`write_chains_figure` puts the chains of a few images into one PNG or PDF (PIL only: the
pictures are raster anyway, and nothing beyond hookchains' own dependencies is needed).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hookchains.core.testing import random_subnetwork
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
    ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    >>> images = torch.randn(4, 3, 32, 32)
    >>> sub = random_subnetwork(model, images[:1], keep=0.5)      # or hookchains.fit(...)
    >>> from PIL import Image
    >>> from hookchains.inputs.data import ImageSet
    >>> views = ImageSet(images, torch.tensor([0, 0, 1, 1]), ["cat", "espresso"], ["c.png"] * 2 + ["e.png"] * 2,
    ...                  [Image.new("RGB", (32, 32))] * 4)      # normalised batch, labels, names, files, raw
    >>> write_report("runs/cat-espresso", sub, model, views, featvis_steps=2)   # default 32 steps
    PosixPath('runs/cat-espresso/report.html')
"""
from __future__ import annotations

import functools
import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchvision.transforms.functional import to_tensor

from hookchains.analysis.chains import Chain, extract_chains
from hookchains.analysis.featvis import FeatureVisCache, featvis_failure
from hookchains.core.attach import attach
from hookchains.core.dataflow import DataflowError
from hookchains.core.io import PathLike, atomic_write_bytes
from hookchains.core.progress import Progress
from hookchains.core.sites import FilterSite
from hookchains.core.state import capture_featuremaps
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.faithfulness import faithfulness
from hookchains.inputs.data import ImageSet
from hookchains.tokens.result import TokenSubnetwork
from hookchains.viz.explorer import FILTER_VIEWS, Pictures, explorer_page, image_buttons
from hookchains.viz.graph import MAX_NODES, Layout, layout
from hookchains.viz.heatmap import featuremap_heatmap
from hookchains.viz.html import IMAGE_PX, Predictions, fidelity_rows, predictions, summary_html, thumb

__all__ = ["write_report", "write_chains_figure"]

_THUMB = 80         # px of a heatmap in the page (about 5 kB each as a 128-colour PNG)
_FIGURE_THUMB = 128  # px of a picture in the paper figure
_CHUNK = 8          # images per featuremap-capturing forward (bounds memory)
Key = Tuple[str, int]  # (filter site, channel)


@dataclass
class _Study(Predictions):
    """Predictions and chains of the task images."""

    chains: List[List[Chain]] = field(default_factory=list)
    no_chains: str = "No path from the image to the logit among the kept filters."


@dataclass
class _Pictures:
    """PNG bytes: feature visualisations by filter, heatmaps (and peaks) by (image, filter); and the
    degradation (Fig. 2) of the filters whose removal was measured."""

    featvis: Dict[Key, bytes]
    heatmaps: Dict[Tuple[int, str, int], Tuple[Optional[bytes], float]]
    images: Dict[int, bytes] = field(default_factory=dict)
    degradation: Dict[Key, float] = field(default_factory=dict)


def _study(sub: Subnetwork, model: nn.Module, image_set: ImageSet, k: int,
           class_indices: Optional[Mapping[str, int]], progress: Progress) -> _Study:
    """Original-model predictions and the ``k`` chains of every image."""
    with progress.stage("chains", f"{k} per image, {len(image_set)} images"):
        p = predictions(sub, model, image_set, class_indices)
        try:
            chains = extract_chains(sub, model, image_set.images, k=k)
        except DataflowError as error:
            return _Study(p.image_set, p.predicted, p.probability, p.output_names, p.correct,
                          chains=[[] for _ in p.predicted], no_chains=f"No chains: {error}")
    return _Study(p.image_set, p.predicted, p.probability, p.output_names, p.correct, chains=chains)


def _heatmaps(sub: Subnetwork, model: nn.Module, image_set: ImageSet, wanted: Set[Tuple[int, str, int]],
              size: int) -> Dict[Tuple[int, str, int], Tuple[Optional[bytes], float]]:
    """Heatmaps (A.4) from the original model for (image, site, channel); None where not spatial."""
    result: Dict[Tuple[int, str, int], Tuple[Optional[bytes], float]] = {}
    for start in range(0, len(image_set), _CHUNK):
        batch = sorted(w for w in wanted if start <= w[0] < start + _CHUNK)
        if not batch:
            continue
        paths = sorted({sub.sites.filter(site).hook_module for _, site, _ in batch})
        maps = capture_featuremaps(model, image_set.images[start:start + _CHUNK], paths)
        for i, name, channel in batch:
            site = sub.sites.filter(name)
            out = maps[site.hook_module][i - start]
            dim = site.channel_dim - 1 if site.channel_dim > 0 else site.channel_dim  # no batch dim here
            fmap = out.select(dim, channel).float().cpu()
            if fmap.ndim != 2:  # token or linear outputs have no image-shaped map
                result[(i, name, channel)] = (None, float(fmap.relu().max()))
                continue
            overlay = featuremap_heatmap(fmap, to_tensor(image_set.raw[i]))
            result[(i, name, channel)] = (thumb(overlay, size), float(fmap.relu().max()))
    return result


def _unmeasured(sub: Subnetwork) -> Optional[str]:
    """Why :func:`_degradation` measures nothing for ``sub`` (None: it measures the chain filters)."""
    if sub.ablation != "zero":
        return f"only zero-ablation runs are measured, this one is {sub.ablation}"
    if sub.sites.output.select is not None:
        return (f"Fig. 2 is measured on the model's plain output; its class scores are output[{sub.sites.output.select!r}]"
                if not callable(sub.sites.output.select) else "Fig. 2 is measured on the model's plain output")
    return None


def _degradation(sub: Subnetwork, model: nn.Module, images: Tensor, filters: Set[Key],
                 progress: Progress) -> Dict[Key, float]:
    """Fig. 2's degradation of each of ``filters``: the mean drop of the thresholded network's
    probability of the original's predicted class when the filter is removed (zero ablation of a model
    whose output is its class scores only: :func:`_unmeasured`)."""
    if _unmeasured(sub) or not filters:
        return {}
    with progress.stage("degradation", f"removing each of {len(filters)} chain filters"), \
            attach(model, sites=sub.sites, tau=sub.tau, temperature=sub.temperature) as hooks:
        result = faithfulness(hooks, sub, images, filters=filters)
    keys = [(n, j) for n, idx in sub.kept_filters().items() for j in idx if (n, j) in filters]
    return dict(zip(keys, result.degradation))


def _model_key(model: nn.Module) -> str:
    """Class name + digest of the weights: a feature-visualisation cache never mixes models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(model).__name__}-{digest.hexdigest()[:12]}"


def _pictures(run_dir: Path, sub: Subnetwork, model: nn.Module, image_set: ImageSet,
              wanted: Set[Tuple[int, str, int]], size: int, steps: int, vis_size: int,
              progress: Progress) -> _Pictures:
    """Feature visualisations (cached under ``run_dir/featvis``) and heatmaps of the wanted filters."""
    cache = FeatureVisCache(run_dir / "featvis", _model_key(model), model=model)
    filters = sorted({(site, ch) for _, site, ch in wanted})
    with progress.stage("feature visualisation", f"{len(filters)} filters, {steps} steps each"):
        pngs = cache.get_many([(sub.sites.filter(site).hook_module, ch) for site, ch in filters], steps=steps,
                              image_size=vis_size, bar=lambda rows: progress.bar(rows, "feature visualisation", unit="step"))
        featvis = dict(zip(filters, pngs))
    with progress.stage("heatmaps", f"{len(wanted)} (image, filter) pairs"):
        return _Pictures(featvis, _heatmaps(sub, model, image_set, wanted, size))


def _chain_requests(chains: Sequence[Chain], image: int) -> Set[Tuple[int, str, int]]:
    return {(image, f.site, f.index) for c in chains for f in c.filters}


# ---------------------------------------------------------------------------------------------- HTML
def _node_id(site: str, channel: int) -> str:
    return f"{site}:{channel}"


def _filter_node(sub: Subnetwork, lay: Layout, column: int, site: FilterSite, j: int, pics: _Pictures,
                 table: Pictures, n_images: int, uses: int) -> Dict[str, Any]:
    """One filter as an explorer node: facts, feature visualisation, a heatmap per image (chain filters)."""
    score, key = float(sub.scores[site.name][j]), (site.name, j)
    facts = [("Layer", f"{site.label} ({site.name})"), ("Score", f"{score:.4g}")]
    if key in lay.importance:
        facts.append(("Importance in its layer", f"{lay.importance[key]:.3f}"))
    degradation = (f"{pics.degradation[key]:+.4f} (mean drop of the predicted class's probability)"
                   if key in pics.degradation else f"not measured ({_unmeasured(sub) or 'only the chain filters are'})")
    facts += [("Degradation when removed", degradation), ("Chains through it", str(uses))]
    png = pics.featvis.get(key)
    maps = [[i, None if pics.heatmaps[(i, *key)][0] is None else table.add(pics.heatmaps[(i, *key)][0]),
             pics.heatmaps[(i, *key)][1]] for i in range(n_images)] if png is not None else []
    label = f"{site.label}_{j}"
    return {"id": _node_id(*key), "label": label, "kind": "unit", "column": column, "value": lay.colour[key],
            "aria": f"filter {label}, layer {site.label}, score {score:.3g}, on {uses} chains", "facts": facts,
            "featvis": None if png is None else table.add(png), "featvisFailed": None if png is None else
            featvis_failure(png), "maps": maps}


def _explorer_data(sub: Subnetwork, study: _Study, lay: Layout, pics: _Pictures, table: Pictures) -> Dict[str, Any]:
    """The explorer's data model (:mod:`hookchains.viz.explorer`) of a filter run."""
    chains = [(i, n, c) for i, per_image in enumerate(study.chains) for n, c in enumerate(per_image)]
    uses = Counter(k for _, _, c in chains for k in set(c.key))
    columns, nodes = [], []
    for c, column in enumerate(lay.columns):
        if column.site is None:
            names = column.skipped
            columns.append({"label": "skipped", "kind": "skipped", "kept": 0, "more": 0, "nodes": [],
                            "detail": ", ".join(names) if len(names) <= 2 else f"{names[0]}…{names[-1]}"})
            continue
        site = column.site
        order = sorted(column.shown, key=lambda j: (-uses[(site.name, j)], -float(sub.scores[site.name][j]), j))
        nodes += [_filter_node(sub, lay, c, site, j, pics, table, len(study.predicted), uses[(site.name, j)])
                  for j in order]
        columns.append({"label": site.label, "kind": "layer", "kept": len(column.kept), "more": column.hidden,
                        "nodes": [_node_id(site.name, j) for j in order]})
    outputs = [{"id": f"out:{t}", "label": name, "kind": "output", "column": len(columns), "value": None,
                "aria": f"output class {name}", "facts": [("Model output", str(t))], "featvis": None,
                "featvisFailed": None, "maps": []} for t, name in lay.outputs]
    columns.append({"label": "output", "kind": "output", "kept": len(outputs), "more": 0,
                    "nodes": [o["id"] for o in outputs]})
    edges = [[_node_id(*a), _node_id(*b), round(rel, 3)] for a, b, rel, _ in lay.edges]
    edges += [[_node_id(*last), f"out:{t}", 0.1] for last, t in lay.output_edges]
    counts = sub.counts()
    title = f"{counts['layers_kept']}/{counts['layers_total']} layers, {counts['filters_kept']}/" \
            f"{counts['filters_total']} filters kept" + (f"; {lay.drawn} drawn" if lay.drawn < counts["filters_kept"] else "")
    names = study.image_set.class_names
    return {"title": title, "note": lay.note, "views": FILTER_VIEWS,
            "colour": {"by": lay.colour_by if lay.colour_by == "score" else "importance (the scores tie)",
                       "low": "0", "high": f"{lay.top:.3g}" if lay.colour_by == "score" else "1"},
            "columns": columns, "nodes": nodes + outputs, "edges": edges,
            "images": [{"label": study.true_name(i) + (" (misclassified)" if study.correct[i] is False else ""),
                        "caption": study.caption(i), "pic": table.add(pics.images[i]),
                        "wrong": study.correct[i] is False} for i in range(len(study.predicted))],
            "groups": [{"name": name, "images": [i for i, y in enumerate(study.image_set.labels.tolist()) if y == g]}
                       for g, name in enumerate(names)],
            "chains": [{"image": i, "nodes": [_node_id(f.site, f.index) for f in c.filters] + [f"out:{c.target}"],
                        "strength": c.strength, "title": f"Image {i + 1}, chain {n + 1}: strength {c.strength:.3g}, "
                        f"ends in {study.output_names[c.target]}"} for i, n, c in chains]}


def _summary(sub: Subnetwork) -> str:
    c = sub.counts()
    rows = [("Layers kept", f"{c['layers_kept']}/{c['layers_total']}"),
            ("Filters kept", f"{c['filters_live']}/{c['filters_total']} "
                             f"({100 * c['filters_live'] / max(c['filters_total'], 1):.2f} %)")]
    if c["dead_filters"]:
        rows.append(("Dead filters (constants, not counted)", str(c["dead_filters"])))
    if c["gates_total"]:
        rows.append(("Gated blocks kept", f"{c['gates_kept']}/{c['gates_total']}"))
    return summary_html(sub, rows + fidelity_rows(sub.fidelity), "sub-network")


def write_report(run_dir: PathLike, sub: Subnetwork, model: nn.Module, image_set: ImageSet, *,
                 chains_per_image: int = 2, featvis_steps: int = 32, featvis_size: int = 64,
                 out: Optional[PathLike] = None, class_indices: Optional[Mapping[str, int]] = None,
                 progress: Optional[Progress] = None, max_nodes: Optional[int] = MAX_NODES) -> Path:
    """Write the self-contained HTML explorer of ``sub`` on ``image_set`` (see the module docstring).

    A token run's result (a ViT) has its own spine and panels, :func:`hookchains.viz.token_report.write_token_report`;
    :func:`hookchains.workflow.extract.write_run_report` picks the right one.

    Args:
        run_dir: the run's folder (feature visualisations are cached in ``run_dir/featvis``).
        sub: the sub-network; model: the model it was fitted on, without hookchains hooks.
        image_set: the task images (``hookchains.inputs.data``), normalised batch and raw pictures.
        chains_per_image: chains per image (paper: 2).
        featvis_steps, featvis_size: budget of each feature visualisation (kept small: on CPU a
            filter costs about ``featvis_steps`` truncated forward/backward passes).
        out: the HTML file (default ``run_dir/report.html``).
        class_indices: task class name -> model output index, to tell misclassified images; default
            ``sub.task["class_indices"]``, else ImageNet names or synsets for 1000-class models.
        max_nodes: filters drawn in the graph (every chain filter, then the highest-scoring; each layer
            says how many more it keeps); ``None``: all.
        progress: status lines and stage timings (chains, feature visualisation with a bar per
            filter, heatmaps, report page; :class:`~hookchains.core.progress.Progress`, default silent).

    Example:
        >>> import torch
        >>> from torch import Tensor, nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 32, 32)
        >>> sub = random_subnetwork(model, images[:1], keep=0.5)      # or hookchains.fit(...)
        >>> from PIL import Image
        >>> from hookchains.inputs.data import ImageSet
        >>> views = ImageSet(images, torch.tensor([0, 0, 1, 1]), ["cat", "espresso"], ["c.png"] * 2 + ["e.png"] * 2,
        ...                  [Image.new("RGB", (32, 32))] * 4)      # normalised batch, labels, names, files, raw
        >>> write_report("runs/cat-espresso", sub, model, views, chains_per_image=2, featvis_steps=2)
        PosixPath('runs/cat-espresso/report.html')
    """
    progress = progress or Progress(enabled=False)
    run_dir = Path(run_dir)
    study = _study(sub, model, image_set, chains_per_image, class_indices, progress)
    filters = {(f.site, f.index) for per_image in study.chains for c in per_image for f in c.filters}
    wanted = {(i, site, j) for i in range(len(image_set)) for site, j in filters}
    pics = _pictures(run_dir, sub, model, image_set, wanted, _THUMB, featvis_steps, featvis_size, progress)
    pics.degradation = _degradation(sub, model, image_set.images, filters, progress)
    with progress.stage("report page"):
        pics.images = {i: thumb(to_tensor(image_set.raw[i]), IMAGE_PX) for i in range(len(image_set))}
        lay = layout(sub, model, images=image_set.images, chains=study.chains,
                     names=dict(enumerate(study.output_names)), max_nodes=max_nodes)
        table = Pictures()
        data = _explorer_data(sub, study, lay, pics, table)
        page = explorer_page(data, table, [("summary", "Sub-network", _summary(sub)),
                                           ("images", "Task images", image_buttons(data, "" if data["chains"] else study.no_chains))])
        return atomic_write_bytes(Path(out) if out is not None else run_dir / "report.html", page.encode())


# -------------------------------------------------------------------------------------- paper figure
@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text(draw: ImageDraw.ImageDraw, xy: Tuple[int, int], text: str, size: int) -> None:
    draw.text(xy, text, fill=(20, 20, 20), font=_font(size))


def _figure(study: _Study, pics: _Pictures, images: Sequence[int]) -> Image.Image:
    """Rows of (image | label, feature visualisation over heatmap per chain filter)."""
    s, pad, band = _FIGURE_THUMB, 8, 22
    rows = [(i, n, c) for i in images for n, c in enumerate(study.chains[i])]
    steps = max((len(c.filters) for _, _, c in rows), default=0)
    cell_w, cell_h = s + pad, band + 2 * s + band + pad
    canvas = Image.new("RGB", (pad + (steps + 1) * cell_w, pad + max(len(rows), 1) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (i, n, chain) in enumerate(rows):
        y = pad + r * cell_h
        canvas.paste(Image.open(io.BytesIO(pics.images[i])).convert("RGB").resize((s, s)), (pad, y + band))
        _text(draw, (pad, y), f"image {i + 1}, chain {n + 1}", 13)
        _text(draw, (pad, y + band + s + 4), f"true {study.true_name(i)}"[:18], 12)
        _text(draw, (pad, y + band + s + 20), f"pred {study.output_names[study.predicted[i]]}"[:18], 12)
        for j, f in enumerate(chain.filters):
            x = pad + (j + 1) * cell_w
            _text(draw, (x, y), f.label, 13)
            canvas.paste(Image.open(io.BytesIO(pics.featvis[(f.site, f.index)])).convert("RGB").resize((s, s)),
                         (x, y + band))
            png, peak = pics.heatmaps[(i, f.site, f.index)]
            if png:
                canvas.paste(Image.open(io.BytesIO(png)).convert("RGB").resize((s, s)), (x, y + band + s))
            _text(draw, (x, y + band + 2 * s + 3), f"peak {peak:.3g}", 12)
    return canvas


def write_chains_figure(path: PathLike, run_dir: PathLike, sub: Subnetwork, model: nn.Module,
                        image_set: ImageSet, *, images: Optional[Sequence[int]] = None,
                        chains_per_image: int = 2, featvis_steps: int = 32, featvis_size: int = 64,
                        class_indices: Optional[Mapping[str, int]] = None,
                        progress: Optional[Progress] = None) -> Path:
    """Write the chains of a few images as one PNG or PDF (by ``path``'s suffix), like Fig. 4-5.

    Each row is one chain: the image with its true and predicted class, then per chain filter its
    label, feature visualisation and heatmap (with peak activation). ``images`` are indices into
    ``image_set`` (default: the first image of each class); feature visualisations share the
    report's cache under ``run_dir/featvis``.

    Example:
        >>> import torch
        >>> from torch import Tensor, nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 32, 32)
        >>> sub = random_subnetwork(model, images[:1], keep=0.5)      # or hookchains.fit(...)
        >>> from PIL import Image
        >>> from hookchains.inputs.data import ImageSet
        >>> views = ImageSet(images, torch.tensor([0, 0, 1, 1]), ["cat", "espresso"], ["c.png"] * 2 + ["e.png"] * 2,
        ...                  [Image.new("RGB", (32, 32))] * 4)      # normalised batch, labels, names, files, raw
        >>> write_chains_figure("fig4.pdf", "runs/cat-espresso", sub, model, views, images=[0, 2], featvis_steps=2)
        PosixPath('fig4.pdf')
    """
    if isinstance(sub, TokenSubnetwork):
        raise ValueError("a token run (ViT) has no filter chains to draw; its report shows the kept patches and "
                         "attribution heatmaps of Fig. 7 (hookchains.kept_patches_figure draws one image's row)")
    path = Path(path)
    kind = {".png": "PNG", ".pdf": "PDF"}.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"write_chains_figure writes .png or .pdf files, not {path.name!r}")
    if images is None:
        labels = image_set.labels.tolist()
        images = [labels.index(c) for c in sorted(set(labels))]
    progress = progress or Progress(enabled=False)
    study = _study(sub, model, image_set, chains_per_image, class_indices, progress)
    wanted = set().union(*(_chain_requests(study.chains[i], i) for i in images))
    pics = _pictures(Path(run_dir), sub, model, image_set, wanted, _FIGURE_THUMB, featvis_steps, featvis_size,
                     progress)
    pics.images = {i: thumb(to_tensor(image_set.raw[i]), _FIGURE_THUMB) for i in images}
    buffer = io.BytesIO()
    _figure(study, pics, images).save(buffer, format=kind, **({"resolution": 200.0} if kind == "PDF" else {}))
    return atomic_write_bytes(path, buffer.getvalue())
