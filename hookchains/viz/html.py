"""The HTML toolkit the report pages share: pictures embedded once, the page shell with its
Content-Security-Policy, summary and fidelity tables, the task-image grid and the original model's
predictions. The explorer pages (:mod:`hookchains.viz.explorer`: filter, token and text runs) and
the sweep report (:mod:`hookchains.viz.sweep_report`) are built from these parts.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from hookchains.core.state import eval_mode
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.data import ImageSet
from hookchains.inputs.forward import class_scores
from hookchains.tokens.result import TokenSubnetwork
from hookchains.viz.graph import imagenet_names, output_names

__all__ = ["Sprites", "Predictions", "predictions", "thumb", "fidelity_rows", "summary_html",
           "document", "IMAGE_PX", "Result", "CSS"]

IMAGE_PX = 128  # px of a task image in the page
Result = Union[Subnetwork, TokenSubnetwork]


_FIDELITY = {
    "kl": "Mean KL(original ‖ sub-network)", "kl_max": "Largest KL", "prob_drop":
    "Mean drop of the original top-1 probability", "quotient_mean": "Mean quotient Q", "quotient_min":
    "Smallest Q", "negative_quotients": "Images with Q < 0", "images": "Images"}


@dataclass
class Predictions:
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


def _class_indices(sub: Result, image_set: ImageSet, count: int,
                   explicit: Optional[Mapping[str, int]]) -> Dict[str, int]:
    """Task class -> model output: given, stored in ``sub.task``, or ImageNet names / synsets."""
    if explicit is not None:
        return {k: int(v) for k, v in explicit.items()}
    if isinstance(sub.task.get("class_indices"), Mapping):
        return {k: int(v) for k, v in sub.task["class_indices"].items()}
    if count != 1000:
        return {}
    descriptions, synsets = imagenet_names()
    lookup = {name.lower(): i for names in (descriptions, synsets) for i, name in enumerate(names)}
    return {c: lookup[c.lower()] for c in image_set.class_names if c.lower() in lookup}


def predictions(sub: Result, model: nn.Module, image_set: ImageSet,
                 class_indices: Optional[Mapping[str, int]]) -> Predictions:
    """The original model's prediction for every image, and whether it is the true class (a filter
    run reads the class scores where its ``sub.sites.output`` says: a dict/tuple output's entry)."""
    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model):
        raw = model(image_set.images.to(device))
        scores = class_scores(raw, sub.sites.output) if isinstance(sub, Subnetwork) else raw.float()
    probs = scores.softmax(-1).cpu()
    indices = _class_indices(sub, image_set, probs.shape[1], class_indices)
    predicted = probs.argmax(-1).tolist()
    names = [image_set.class_names[int(y)] for y in image_set.labels]
    correct = [None if name not in indices else p == indices[name] for name, p in zip(names, predicted)]
    return Predictions(image_set, predicted, probs.max(-1).values.tolist(), output_names(probs.shape[1], indices),
                        correct)


def thumb(image: Tensor, size: int) -> bytes:
    """A (3, H, W) image in [0, 1] scaled to ``size`` px high, as a 128-colour PNG.

    The palette makes a heatmap thumbnail about 2.5x smaller than 24-bit PNG with no visible change,
    which keeps a 20-image report to a few megabytes. Pillow's fast octree quantiser: on the demo's 80 px
    heatmaps 0.4 ms a thumbnail instead of 7.3 ms for the default median cut, about as small (4968 vs
    5022 bytes), a mean error of 5.8/255 per channel instead of 4.5/255.
    """
    width = max(1, round(size * image.shape[2] / image.shape[1]))
    small = F.interpolate(image[None].float(), size=(size, width), mode="bilinear", antialias=True,
                          align_corners=False)[0]
    pixels = (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).quantize(128, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1a1a1a;
background:#fff;margin:0;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:1rem 1.25rem 3rem}
h1{font-size:1.6rem;margin:.5rem 0}h2{font-size:1.3rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1.05rem;margin:1.5rem 0 .5rem}
table{border-collapse:collapse;margin:.5rem 0}caption{text-align:left;color:#555;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}th{background:#f3f3f3;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:.75rem}
figure{margin:0}figcaption{font-size:.85rem}.grid figcaption{max-width:8rem}
.bad{color:#a00000;font-weight:600}
.pic{display:block;margin-bottom:2px}
.muted{color:#555}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class Sprites:
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


def fidelity_rows(fidelity: Mapping[str, float]) -> List[Tuple[str, str]]:
    """Table rows (label, value) of :func:`hookchains.core.metrics.fidelity` figures, agreement first.

    Example: ``fidelity_rows({"agree": 19, "images": 20, "kl": 0.05})[0]`` is
    ``('Top-1 agreement with the original model', '19/20')``."""
    fid, rows = dict(fidelity), []
    if "agree" in fid:
        rows.append(("Top-1 agreement with the original model", f"{fid.pop('agree')}/{fid.get('images', '?')}"))
    return rows + [(_FIDELITY.get(k, k), f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in fid.items()]


def summary_html(sub: Result, rows: Sequence[Tuple[str, str]], what: str) -> str:
    """The task's warnings (``sub.task["warnings"]``: random weights, constant or near-uniform
    predictions, see :mod:`hookchains.inputs.degenerate`), the summary line and a two-column table of
    ``rows``, captioned with the threshold.

    Example: ``summary_html(sub, fidelity_rows(sub.fidelity), "sub-network")``."""
    body = "".join(f'<tr><th scope="row">{html.escape(k)}</th><td>{html.escape(v)}</td></tr>' for k, v in rows)
    warnings = "".join(f'<p class="bad" role="alert">Warning: {html.escape(line)}</p>'
                       for line in sub.task.get("warnings", []))
    return (f"{warnings}<p>{html.escape(sub.summary())}</p><table><caption>The thresholded {html.escape(what)} on the "
            f"task images (τ = {sub.tau:g})</caption>{body}</table>")


def document(sprites: Sprites, sections: Sequence[Tuple[str, str, str]]) -> str:
    """The HTML page: CSP, inline CSS, every picture once, one ``<section>`` per (id, title, content).

    Example: ``document(sprites, [("summary", "Sub-network", "<p>...</p>")])``."""
    body = "".join(f'<section aria-labelledby="{key}"><h2 id="{key}">{title}</h2>{content}</section>'
                   for key, title, content in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-'
            f'Security-Policy" content="{_CSP}"><meta name="viewport" content="width=device-width, '
            f'initial-scale=1"><title>NeuroChains report</title><style>{CSS}</style></head><body>'
            f"{sprites.definitions()}<main><h1>NeuroChains report</h1>{body}</main></body></html>")
