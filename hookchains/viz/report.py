"""A sub-network and its chains as one self-contained HTML page, and as one figure for papers.

:func:`write_report` writes what the paper's case studies show (section 4.3-4.4, Fig. 4-6) for a task:

* the summary and fidelity figures (``sub.summary()``, ``sub.counts()``, ``sub.fidelity``);
* the sub-network drawing of :mod:`hookchains.viz.graph` (inline SVG);
* the task images with their true class and the original model's prediction;
* for every image its strongest chains (:func:`hookchains.analysis.chains.extract_chains`), each a row of
  (feature visualisation, heatmap) pairs, one per chain filter: the pattern the filter maximises
  (:mod:`hookchains.analysis.featvis`, "independent of the input image") and where it fires on the image
  (:mod:`hookchains.viz.heatmap`, appendix A.4, from the original model). Heatmaps are normalised per
  map, so each is captioned with its peak activation: a faint filter looks lit, but its peak is low;
* when an image is misclassified, the shared-filter view of Fig. 6: the chains that each class's
  correctly classified images use most often, drawn on the misclassified image next to the image of
  that class where the chain is strongest.

A token run (a ViT, :class:`~hookchains.tokens.TokenSubnetwork`) gets the page of
:mod:`hookchains.viz.token_report` instead: Fig. 7 per image, built from the helpers here.

The page is one file: inline CSS and SVG, images as base64 PNG, no script, and a Content-Security-
Policy that forbids every network request. Feature visualisations are cached under
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
import html
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision.transforms.functional import to_tensor

from hookchains.analysis.chains import Chain, extract_chains
from hookchains.analysis.featvis import FeatureVisCache
from hookchains.core.dataflow import DataflowError
from hookchains.core.io import PathLike, atomic_write_bytes
from hookchains.core.progress import Progress
from hookchains.core.state import capture_featuremaps
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.data import ImageSet
from hookchains.tokens.result import TokenSubnetwork
from hookchains.viz.graph import build_graph, graph_bytes
from hookchains.viz.heatmap import featuremap_heatmap
from hookchains.viz.html import (
    IMAGE_PX,
    Predictions,
    Sprites,
    document,
    fidelity_rows,
    image_grid,
    predictions,
    summary_html,
    thumb,
)

__all__ = ["write_report", "write_chains_figure"]

_THUMB = 96         # px of a heatmap / feature visualisation in the page
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
    """PNG bytes: feature visualisations by filter, heatmaps (and peaks) by (image, filter)."""

    featvis: Dict[Key, bytes]
    heatmaps: Dict[Tuple[int, str, int], Tuple[Optional[bytes], float]]
    images: Dict[int, bytes] = field(default_factory=dict)


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


def _shared_views(study: _Study, k: int) -> List[Tuple[int, str, List[Tuple[Chain, int]]]]:
    """Fig. 6: per misclassified image and class, the class's most used chains (and where strongest)."""
    views = []
    for m, ok in enumerate(study.correct):
        if ok is not False:
            continue
        for name in study.image_set.class_names:
            found = [c for i, chains in enumerate(study.chains) for c in chains
                     if study.correct[i] and study.true_name(i) == name]
            if not found:
                continue
            counts = Counter(c.key for c in found)
            best: Dict[Tuple, Chain] = {}
            for c in found:
                if c.key not in best or c.strength > best[c.key].strength:
                    best[c.key] = c
            keys = sorted(best, key=lambda key: (-counts[key], -best[key].strength, key))[:k]
            views.append((m, name, [(best[key], best[key].image) for key in keys]))
    return views


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
        featvis = {(site, ch): cache.get(sub.sites.filter(site).hook_module, ch, steps=steps, image_size=vis_size)
                   for site, ch in progress.bar(filters, "feature visualisation", unit="filter")}
    with progress.stage("heatmaps", f"{len(wanted)} (image, filter) pairs"):
        return _Pictures(featvis, _heatmaps(sub, model, image_set, wanted, size))


def _chain_requests(chains: Sequence[Chain], image: int) -> Set[Tuple[int, str, int]]:
    return {(image, f.site, f.index) for c in chains for f in c.filters}


# ---------------------------------------------------------------------------------------------- HTML
@dataclass
class _Page:
    """Builds the report's sections from the study and its pictures."""

    sub: Subnetwork
    study: _Study
    pics: _Pictures
    sprites: Sprites = field(default_factory=Sprites)

    def step(self, chain_filter, images: Sequence[Tuple[int, str]]) -> str:
        """One chain step: label, feature visualisation, then a heatmap per (image, caption)."""
        site, channel, label = chain_filter
        parts = [f'<li class="step"><span class="label">{html.escape(label)}</span>',
                 self.sprites.show(self.pics.featvis[(site, channel)], f"Feature visualisation of filter {label}",
                                   _THUMB)]
        for image, caption in images:
            png, peak = self.pics.heatmaps[(image, site, channel)]
            alt = f"Heatmap of filter {label} on image {image + 1}{caption} (peak activation {peak:.3g})"
            parts.append(self.sprites.show(png, alt) if png else '<span class="muted">no spatial map</span>')
            parts.append(f'<span class="muted">peak {peak:.3g}{html.escape(caption)}</span>')
        return "".join(parts) + "</li>"

    def chain(self, number: int, chain: Chain, images: Sequence[Tuple[int, str]]) -> str:
        """A chain as a titled row of steps."""
        title = (f"Chain {number}: strength {chain.strength:.4g}, ending in the logit of "
                 f"{self.study.output_names[chain.target]} (the sub-network's prediction)")
        steps = "".join(self.step(f, images) for f in chain.filters)
        return f'<div class="chain"><p>{html.escape(title)}</p><ol class="steps">{steps}</ol></div>'

    def summary(self) -> str:
        c = self.sub.counts()
        rows = [("Layers kept", f"{c['layers_kept']}/{c['layers_total']}"),
                ("Filters kept", f"{c['filters_kept']}/{c['filters_total']} "
                                 f"({100 * c['filters_kept'] / max(c['filters_total'], 1):.2f} %)")]
        if c["gates_total"]:
            rows.append(("Gated blocks kept", f"{c['gates_kept']}/{c['gates_total']}"))
        return summary_html(self.sub, rows + fidelity_rows(self.sub.fidelity), "sub-network")

    def images(self) -> str:
        return image_grid(self.sprites, self.study, self.pics.images)

    def per_image(self) -> str:
        parts = ["<p>Each step: the filter's feature visualisation (top) and its heatmap on the image "
                 "(bottom), with the heatmap's peak activation.</p>"]
        for i, chains in enumerate(self.study.chains):
            rows = "".join(self.chain(n + 1, c, [(i, "")]) for n, c in enumerate(chains))
            caption = self.study.caption(i)
            rows = rows or f"<p>{html.escape(self.study.no_chains)}</p>"
            parts.append(f'<article><h3 id="image-{i + 1}">{html.escape(caption)}</h3>'
                         f'{self.sprites.show(self.pics.images[i], caption)}{rows}</article>')
        return "".join(parts)

    def shared(self, views: List[Tuple[int, str, List[Tuple[Chain, int]]]]) -> str:
        parts = ["<p>As in the paper's Fig. 6: the chains that each class's correctly classified images use "
                 "most, drawn on the misclassified image (first heatmap) and on the correctly classified "
                 "image where the chain is strongest (second heatmap).</p>"]
        for m, name, chains in views:
            parts.append(f"<h3>{html.escape(self.study.caption(m))}: chains of {html.escape(name)}</h3>")
            for n, (chain, rep) in enumerate(chains):
                parts.append(self.chain(n + 1, chain, [(m, " (misclassified)"), (rep, "")]))
        return "".join(parts)

    def render(self, svg: str, views: List[Tuple[int, str, List[Tuple[Chain, int]]]]) -> str:
        """The whole document: summary, graph, task images, chains (and the shared-filter view)."""
        svg = svg[svg.index("<svg"):].replace("<svg", '<svg role="img" aria-label="Sub-network drawing: '
                                              'kept filters by layer, coloured by score, with their strongest '
                                              'connections"', 1)
        sections = [("summary", "Sub-network", self.summary()),
                    ("graph", "Architecture and filter scores", f'<figure><div class="graph">{svg}</div>'
                     "<figcaption>One column per kept layer; redder nodes have larger scores; dashed: "
                     "shortcut convs; grey: removed blocks; edges: the strongest connections.</figcaption>"
                     "</figure>"),
                    ("images", "Task images", self.images()),
                    ("chains", "Chains per image", self.per_image())]
        if views:
            sections.append(("shared", "Shared filters on misclassified images", self.shared(views)))
        return document(self.sprites, sections)


def write_report(run_dir: PathLike, sub: Subnetwork, model: nn.Module, image_set: ImageSet, *,
                 chains_per_image: int = 2, featvis_steps: int = 32, featvis_size: int = 64,
                 out: Optional[PathLike] = None, class_indices: Optional[Mapping[str, int]] = None,
                 progress: Optional[Progress] = None) -> Path:
    """Write the self-contained HTML report of ``sub`` on ``image_set`` (see the module docstring).

    A token run's result (a ViT) has its own page, :func:`hookchains.viz.token_report.write_token_report`;
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
        progress: status lines and stage timings (chains, feature visualisation with a bar per
            filter, heatmaps, report page; :class:`~hookchains.core.progress.Progress`, default silent).

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
        >>> write_report("runs/cat-espresso", sub, model, views, chains_per_image=2, featvis_steps=2)
        PosixPath('runs/cat-espresso/report.html')
    """
    progress = progress or Progress(enabled=False)
    run_dir = Path(run_dir)
    study = _study(sub, model, image_set, chains_per_image, class_indices, progress)
    views = _shared_views(study, chains_per_image)
    wanted = set().union(*(_chain_requests(c, i) for i, c in enumerate(study.chains)))
    for m, _, chains in views:
        for chain, rep in chains:
            wanted |= _chain_requests([chain], m) | _chain_requests([chain], rep)
    pics = _pictures(run_dir, sub, model, image_set, wanted, _THUMB, featvis_steps, featvis_size, progress)
    with progress.stage("report page"):
        pics.images = {i: thumb(to_tensor(image_set.raw[i]), IMAGE_PX) for i in range(len(image_set))}
        svg = graph_bytes(build_graph(sub, model, images=image_set.images), "svg").decode()
        page = _Page(sub, study, pics).render(svg, views)
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
