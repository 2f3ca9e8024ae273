"""A sub-network and its chains as one self-contained HTML page, and as one figure for papers.

:func:`write_report` writes what the paper's case studies show (section 4.3-4.4, Fig. 4-6) for a task:

* the summary and fidelity figures (``sub.summary()``, ``sub.counts()``, ``sub.fidelity``);
* the sub-network drawing of :mod:`hookchains.render` (inline SVG);
* the task images with their true class and the original model's prediction;
* for every image its strongest chains (:func:`hookchains.chains.extract_chains`), each a row of
  (feature visualisation, heatmap) pairs, one per chain filter: the pattern the filter maximises
  (:mod:`hookchains.featvis`, "independent of the input image") and where it fires on the image
  (:mod:`hookchains.heatmap`, appendix A.4, from the original model). Heatmaps are normalised per
  map, so each is captioned with its peak activation: a faint filter looks lit, but its peak is low;
* when an image is misclassified, the shared-filter view of Fig. 6: the chains that each class's
  correctly classified images use most often, drawn on the misclassified image next to the image of
  that class where the chain is strongest.

A token run (a ViT, :class:`~hookchains.tokens.TokenSubnetwork`) gets the page of
:mod:`hookchains.token_report` instead: Fig. 7 per image, built from the helpers here.

The page is one file: inline CSS and SVG, images as base64 PNG, no script, and a Content-Security-
Policy that forbids every network request. Feature visualisations are cached under
``run_dir/featvis`` (filters repeat across images and runs), so a second report is fast.

:func:`write_chains_figure` puts the chains of a few images into one PNG or PDF (PIL only: the
pictures are raster anyway, and nothing beyond hookchains' own dependencies is needed).

Example:
    >>> write_report("runs/cat-espresso", sub, model, views)
    PosixPath('runs/cat-espresso/report.html')
"""
from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from timm.data import ImageNetInfo
from torch import Tensor, nn
from torchvision.transforms.functional import to_tensor

from hookchains.chains import Chain, extract_chains
from hookchains.dataflow import DataflowError
from hookchains.data import ImageSet
from hookchains.featvis import FeatureVisCache
from hookchains.heatmap import capture_featuremaps, eval_mode, featuremap_heatmap
from hookchains.io import PathLike, atomic_write_bytes
from hookchains.render import build_graph, graph_bytes
from hookchains.run import Result
from hookchains.subnetwork import Subnetwork
from hookchains.tokens import TokenSubnetwork

__all__ = ["write_report", "write_chains_figure"]

_THUMB = 96         # px of a heatmap / feature visualisation in the page
_IMAGE = 128        # px of a task image in the page
_FIGURE_THUMB = 128  # px of a picture in the paper figure
_CHUNK = 8          # images per featuremap-capturing forward (bounds memory)
_FIDELITY = {
    "kl": "Mean KL(original ‖ sub-network)", "kl_max": "Largest KL", "prob_drop":
    "Mean drop of the original top-1 probability", "quotient_mean": "Mean quotient Q", "quotient_min":
    "Smallest Q", "negative_quotients": "Images with Q < 0", "images": "Images"}
Key = Tuple[str, int]  # (filter site, channel)


@dataclass
class _Predictions:
    """The original model's prediction for every task image."""

    image_set: ImageSet
    predicted: List[int]
    probability: List[float]
    output_names: List[str]
    correct: List[Optional[bool]]  # None: the true class has no known model output

    def true_name(self, i: int) -> str:
        return self.image_set.class_names[int(self.image_set.labels[i])]

    def caption(self, i: int) -> str:
        verdict = {True: "", False: " (misclassified)", None: ""}[self.correct[i]]
        return (f"Image {i + 1}: true {self.true_name(i)}, predicted {self.output_names[self.predicted[i]]} "
                f"({self.probability[i]:.2f}){verdict}")


@dataclass
class _Study(_Predictions):
    """Predictions and chains of the task images."""

    chains: List[List[Chain]] = field(default_factory=list)
    no_chains: str = "No path from the image to the logit among the kept filters."


@dataclass
class _Pictures:
    """PNG bytes: feature visualisations by filter, heatmaps (and peaks) by (image, filter)."""

    featvis: Dict[Key, bytes]
    heatmaps: Dict[Tuple[int, str, int], Tuple[Optional[bytes], float]]
    images: Dict[int, bytes] = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def _imagenet() -> Tuple[List[str], List[str]]:
    """ImageNet-1k class descriptions and synsets (timm's tables, no network)."""
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)], list(info.label_names())


def _output_names(count: int, class_indices: Mapping[str, int]) -> List[str]:
    """A name per model output: ImageNet's for 1000 outputs, else ``class i``; task names win."""
    names = list(_imagenet()[0]) if count == 1000 else [f"class {i}" for i in range(count)]
    for name, index in class_indices.items():
        names[index] = name
    return names


def _class_indices(sub: Result, image_set: ImageSet, count: int,
                   explicit: Optional[Mapping[str, int]]) -> Dict[str, int]:
    """Task class -> model output: given, stored in ``sub.task``, or ImageNet names / synsets."""
    if explicit is not None:
        return {k: int(v) for k, v in explicit.items()}
    if isinstance(sub.task.get("class_indices"), Mapping):
        return {k: int(v) for k, v in sub.task["class_indices"].items()}
    if count != 1000:
        return {}
    descriptions, synsets = _imagenet()
    lookup = {name.lower(): i for names in (descriptions, synsets) for i, name in enumerate(names)}
    return {c: lookup[c.lower()] for c in image_set.class_names if c.lower() in lookup}


def _predictions(sub: Result, model: nn.Module, image_set: ImageSet,
                 class_indices: Optional[Mapping[str, int]]) -> _Predictions:
    """The original model's prediction for every image, and whether it is the true class."""
    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model):
        probs = model(image_set.images.to(device)).float().softmax(-1).cpu()
    indices = _class_indices(sub, image_set, probs.shape[1], class_indices)
    predicted = probs.argmax(-1).tolist()
    names = [image_set.class_names[int(y)] for y in image_set.labels]
    correct = [None if name not in indices else p == indices[name] for name, p in zip(names, predicted)]
    return _Predictions(image_set, predicted, probs.max(-1).values.tolist(), _output_names(probs.shape[1], indices),
                        correct)


def _study(sub: Subnetwork, model: nn.Module, image_set: ImageSet, k: int,
           class_indices: Optional[Mapping[str, int]]) -> _Study:
    """Original-model predictions and the ``k`` chains of every image."""
    p = _predictions(sub, model, image_set, class_indices)
    try:
        return _Study(p.image_set, p.predicted, p.probability, p.output_names, p.correct,
                      chains=extract_chains(sub, model, image_set.images, k=k))
    except DataflowError as error:
        return _Study(p.image_set, p.predicted, p.probability, p.output_names, p.correct,
                      chains=[[] for _ in p.predicted], no_chains=f"No chains: {error}")


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


def _thumb(image: Tensor, size: int) -> bytes:
    """A (3, H, W) image in [0, 1] scaled to ``size`` px high, as a 128-colour PNG.

    The palette makes a heatmap thumbnail about 2.5x smaller than 24-bit PNG with no visible change,
    which keeps a 20-image report to a few megabytes.
    """
    width = max(1, round(size * image.shape[2] / image.shape[1]))
    small = F.interpolate(image[None].float(), size=(size, width), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    pixels = (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).quantize(128).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


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
            result[(i, name, channel)] = (_thumb(overlay, size), float(fmap.relu().max()))
    return result


def _model_key(model: nn.Module) -> str:
    """Class name + digest of the weights: a feature-visualisation cache never mixes models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"{type(model).__name__}-{digest.hexdigest()[:12]}"


def _pictures(run_dir: Path, sub: Subnetwork, model: nn.Module, image_set: ImageSet,
              wanted: Set[Tuple[int, str, int]], size: int, steps: int, vis_size: int) -> _Pictures:
    """Feature visualisations (cached under ``run_dir/featvis``) and heatmaps of the wanted filters."""
    cache = FeatureVisCache(run_dir / "featvis", _model_key(model), model=model)
    featvis = {(site, ch): cache.get(sub.sites.filter(site).hook_module, ch, steps=steps, image_size=vis_size)
               for site, ch in sorted({(site, ch) for _, site, ch in wanted})}
    return _Pictures(featvis, _heatmaps(sub, model, image_set, wanted, size))


def _chain_requests(chains: Sequence[Chain], image: int) -> Set[Tuple[int, str, int]]:
    return {(image, f.site, f.index) for c in chains for f in c.filters}


# ---------------------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1a1a1a;
background:#fff;margin:0;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:1rem 1.25rem 3rem}
h1{font-size:1.6rem;margin:.5rem 0}h2{font-size:1.3rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1.05rem;margin:1.5rem 0 .5rem}
table{border-collapse:collapse;margin:.5rem 0}caption{text-align:left;color:#555;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}th{background:#f3f3f3;font-weight:600}
.graph{overflow:auto;max-height:85vh;border:1px solid #ddd;padding:.5rem;margin-bottom:.3rem}
.grid{display:flex;flex-wrap:wrap;gap:.75rem}
figure{margin:0}figcaption{font-size:.85rem}.grid figcaption{max-width:8rem}
.bad{color:#a00000;font-weight:600}
.chain{margin:.5rem 0 1rem}.chain p{margin:.2rem 0;font-size:.9rem}
.steps{display:flex;flex-wrap:wrap;gap:.35rem;list-style:none;padding:0;margin:0}
.step{display:flex;flex-direction:column;align-items:center;font-size:.75rem;width:100px}
.pic{display:block;margin-bottom:2px}.label{font-family:ui-monospace,Menlo,Consolas,monospace}
.muted{color:#555}
.strip{overflow-x:auto;max-width:100%}.fig7 h4{font-size:.95rem;margin:.8rem 0 .3rem}
.fig7 .steps{gap:0;padding-left:4px}.fig7 .step{width:84px}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class _Sprites:
    """Pictures embedded once (as SVG symbols) and shown wherever they recur.

    A feature visualisation appears in every chain through its filter -- 880 times for 23 filters in
    a 20-image MobileNetV2 report -- so each PNG is stored once and referenced with ``<use>``; every
    reference is an accessible ``role="img"`` with its own label.
    """

    def __init__(self) -> None:
        self._ids: Dict[bytes, Tuple[str, int, int]] = {}

    def show(self, png: bytes, alt: str, height: Optional[int] = None) -> str:
        """Markup showing ``png`` at ``height`` px (default: its own), labelled ``alt``."""
        if png not in self._ids:
            with Image.open(io.BytesIO(png)) as picture:
                self._ids[png] = (f"pic{len(self._ids)}", *picture.size)
        key, width, own = self._ids[png]
        height = height or own
        width = round(width * height / own)
        alt = html.escape(alt)
        return (f'<svg class="pic" role="img" aria-label="{alt}" width="{width}" height="{height}"><title>{alt}'
                f'</title><use href="#{key}" width="{width}" height="{height}"/></svg>')

    def definitions(self) -> str:
        """The hidden ``<svg>`` holding every picture once (place it anywhere in the body)."""
        symbols = "".join(f'<symbol id="{key}" viewBox="0 0 {w} {h}"><image width="{w}" height="{h}" '
                          f'href="data:image/png;base64,{base64.b64encode(png).decode()}"/></symbol>'
                          for png, (key, w, h) in self._ids.items())
        return f'<svg aria-hidden="true" width="0" height="0" style="position:absolute">{symbols}</svg>'


@dataclass
class _Page:
    """Builds the report's sections from the study and its pictures."""

    sub: Subnetwork
    study: _Study
    pics: _Pictures
    sprites: _Sprites = field(default_factory=_Sprites)

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
            parts.append(f'<article><h3 id="image-{i + 1}">{html.escape(caption)}</h3>'
                         f'{self.sprites.show(self.pics.images[i], caption)}{rows or f"<p>{html.escape(self.study.no_chains)}</p>"}'
                         "</article>")
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


def fidelity_rows(fidelity: Mapping[str, float]) -> List[Tuple[str, str]]:
    """Table rows (label, value) of :func:`hookchains.metrics.fidelity` figures, agreement first.

    Example: ``fidelity_rows({"agree": 19, "images": 20, "kl": 0.05})[0]`` is
    ``('Top-1 agreement with the original model', '19/20')``."""
    fid, rows = dict(fidelity), []
    if "agree" in fid:
        rows.append(("Top-1 agreement with the original model", f"{fid.pop('agree')}/{fid.get('images', '?')}"))
    return rows + [(_FIDELITY.get(k, k), f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fid.items()]


def summary_html(sub: Result, rows: Sequence[Tuple[str, str]], what: str) -> str:
    """The summary line and a two-column table of ``rows``, captioned with the threshold.

    Example: ``summary_html(sub, fidelity_rows(sub.fidelity), "sub-network")``."""
    body = "".join(f'<tr><th scope="row">{html.escape(k)}</th><td>{html.escape(v)}</td></tr>' for k, v in rows)
    return (f"<p>{html.escape(sub.summary())}</p><table><caption>The thresholded {html.escape(what)} on the "
            f"task images (τ = {sub.tau:g})</caption>{body}</table>")


def image_grid(sprites: "_Sprites", predictions: _Predictions, pngs: Mapping[int, bytes]) -> str:
    """The task images with their true class and the original model's prediction (wrong ones in red).

    Example: ``image_grid(sprites, predictions, {i: _thumb(to_tensor(raw[i]), 128) for i in ...})``."""
    figures = []
    for i in sorted(pngs):
        bad = ' class="bad"' if predictions.correct[i] is False else ""
        caption = predictions.caption(i)
        figures.append(f"<figure>{sprites.show(pngs[i], caption)}"
                       f"<figcaption{bad}>{html.escape(caption)}</figcaption></figure>")
    return f'<div class="grid">{"".join(figures)}</div>'


def document(sprites: "_Sprites", sections: Sequence[Tuple[str, str, str]]) -> str:
    """The HTML page: CSP, inline CSS, every picture once, one ``<section>`` per (id, title, content).

    Example: ``document(sprites, [("summary", "Sub-network", "<p>...</p>")])``."""
    body = "".join(f'<section aria-labelledby="{key}"><h2 id="{key}">{title}</h2>{content}</section>'
                   for key, title, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-'
            f'Security-Policy" content="{_CSP}"><meta name="viewport" content="width=device-width, '
            f'initial-scale=1"><title>NeuroChains report</title><style>{_CSS}</style></head><body>'
            f"{sprites.definitions()}<main><h1>NeuroChains report</h1>{body}</main></body></html>")


def write_report(run_dir: PathLike, sub: Result, model: nn.Module, image_set: ImageSet, *,
                 chains_per_image: int = 2, featvis_steps: int = 32, featvis_size: int = 64,
                 out: Optional[PathLike] = None, class_indices: Optional[Mapping[str, int]] = None) -> Path:
    """Write the self-contained HTML report of ``sub`` on ``image_set`` (see the module docstring).

    A token run's result (:class:`~hookchains.tokens.TokenSubnetwork`, a ViT) gets the report of
    :func:`hookchains.token_report.write_token_report` instead (Fig. 7 per image; the filter options
    are not used).

    Args:
        run_dir: the run's folder (feature visualisations are cached in ``run_dir/featvis``).
        sub: the sub-network; model: the model it was fitted on, without hookchains hooks.
        image_set: the task images (``hookchains.data``), normalised batch and raw pictures.
        chains_per_image: chains per image (paper: 2).
        featvis_steps, featvis_size: budget of each feature visualisation (kept small: on CPU a
            filter costs about ``featvis_steps`` truncated forward/backward passes).
        out: the HTML file (default ``run_dir/report.html``).
        class_indices: task class name -> model output index, to tell misclassified images; default
            ``sub.task["class_indices"]``, else ImageNet names or synsets for 1000-class models.

    Example:
        >>> write_report("runs/cat-espresso", sub, model, views, chains_per_image=2)
        PosixPath('runs/cat-espresso/report.html')
    """
    if isinstance(sub, TokenSubnetwork):
        from hookchains.token_report import write_token_report
        return write_token_report(run_dir, sub, model, image_set, out=out, class_indices=class_indices)
    run_dir = Path(run_dir)
    study = _study(sub, model, image_set, chains_per_image, class_indices)
    views = _shared_views(study, chains_per_image)
    wanted = set().union(*(_chain_requests(c, i) for i, c in enumerate(study.chains)))
    for m, _, chains in views:
        for chain, rep in chains:
            wanted |= _chain_requests([chain], m) | _chain_requests([chain], rep)
    pics = _pictures(run_dir, sub, model, image_set, wanted, _THUMB, featvis_steps, featvis_size)
    pics.images = {i: _thumb(to_tensor(image_set.raw[i]), _IMAGE) for i in range(len(image_set))}
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
                        class_indices: Optional[Mapping[str, int]] = None) -> Path:
    """Write the chains of a few images as one PNG or PDF (by ``path``'s suffix), like Fig. 4-5.

    Each row is one chain: the image with its true and predicted class, then per chain filter its
    label, feature visualisation and heatmap (with peak activation). ``images`` are indices into
    ``image_set`` (default: the first image of each class); feature visualisations share the
    report's cache under ``run_dir/featvis``.

    Example:
        >>> write_chains_figure("fig4.pdf", "runs/cat-espresso", sub, model, views, images=[0, 10])
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
    study = _study(sub, model, image_set, chains_per_image, class_indices)
    wanted = set().union(*(_chain_requests(study.chains[i], i) for i in images))
    pics = _pictures(Path(run_dir), sub, model, image_set, wanted, _FIGURE_THUMB, featvis_steps, featvis_size)
    pics.images = {i: _thumb(to_tensor(image_set.raw[i]), _FIGURE_THUMB) for i in images}
    buffer = io.BytesIO()
    _figure(study, pics, images).save(buffer, format=kind, **({"resolution": 200.0} if kind == "PDF" else {}))
    return atomic_write_bytes(path, buffer.getvalue())
