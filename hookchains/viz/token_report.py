"""The HTML report of a token run: a ViT with per-image token scores (paper section 4.5, Fig. 7).

For the first few images of each class the page shows Fig. 7's three rows, one panel per block:

* the patches each block processes, as red squares on the image (pruned ones dimmed), drawn by
  :func:`hookchains.tokens.attribution.kept_patches_figure`;
* the attribution of the class token to the input patches (Eq. 10 on the pruned network,
  :func:`hookchains.tokens.attribution.class_token_heatmaps`);
* the attribution of one patch token -- the one kept longest, labelled ``B{b}_T{t}`` with ``t`` its
  index in the token sequence (0 is the class token) -- in every block that still has it
  (:func:`hookchains.tokens.attribution.patch_token_heatmaps`).

Above them: the summary line, the fidelity table, the mean number of tokens each block processes and
the task images with the original model's predictions. Heatmaps are drawn with
:func:`hookchains.viz.heatmap.featuremap_heatmap` and normalised per map: they show where a token draws
from, not how much. The page keeps the guarantees of :mod:`hookchains.viz.report` (one file, a
Content-Security-Policy that forbids every request, no script, each picture embedded once and labelled).

Example:
    >>> import timm, torch
    >>> from PIL import Image
    >>> from hookchains.inputs.data import ImageSet
    >>> from hookchains.tokens.fit import fit_tokens
    >>> deit = timm.create_model("test_vit", img_size=64, num_classes=2).eval()
    >>> views = ImageSet(torch.randn(4, 3, 64, 64), torch.tensor([0, 0, 1, 1]), ["cat", "espresso"],
    ...                  ["c.png"] * 2 + ["e.png"] * 2, [Image.new("RGB", (64, 64))] * 4)
    >>> tsub = fit_tokens(deit, views.images, steps=2, progress=False)
    >>> write_token_report("runs/deit-cat", tsub, deit, views, images_per_class=2)
    PosixPath('runs/deit-cat/report.html')
"""
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import to_tensor

from hookchains.core.io import PathLike, atomic_write_bytes
from hookchains.inputs.data import ImageSet
from hookchains.tokens.attribution import (
    class_token_heatmaps,
    kept_patches_figure,
    patch_grid,
    patch_token_heatmaps,
    token_attribution,
)
from hookchains.tokens.result import TokenSubnetwork
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

__all__ = ["write_token_report"]

_PANEL = 80  # px of one block's panel: 12 blocks fit the page's width in one row


@dataclass
class _Fig7:
    """The pictures of one image (PNG bytes): Fig. 7's three rows."""

    kept: bytes                        # one sheet, a panel per block
    patches_per_block: List[int]       # patch tokens each block processes
    class_maps: List[bytes]            # class-token attribution, per block
    token: int                         # sequence index of the bottom row's patch token
    patch_maps: List[Optional[bytes]]  # its attribution per block; None where it is pruned


def _shown(image_set: ImageSet, per_class: int) -> List[int]:
    """The first ``per_class`` images of each class, in task order."""
    seen: Dict[int, int] = {}
    shown = []
    for i, label in enumerate(image_set.labels.tolist()):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            shown.append(i)
    return shown


def _overlay(attribution: Tensor, picture: Tensor) -> bytes:
    """One attribution map (``gh x gw``) over the picture, as a report thumbnail."""
    return thumb(featuremap_heatmap(attribution, picture), _PANEL)


def _figures(tsub: TokenSubnetwork, model: nn.Module, image_set: ImageSet, shown: Sequence[int]) -> Dict[int, _Fig7]:
    """Fig. 7's pictures for the ``shown`` images (attribution computed for those images only)."""
    subset = dataclasses.replace(tsub, scores=tsub.scores[list(shown)])
    images = image_set.images[list(shown)]
    attribution = token_attribution(model, images, subset)
    class_maps = class_token_heatmaps(model, images, subset, attribution=attribution).maps
    patch = patch_token_heatmaps(model, images, subset, attribution=attribution)
    masks, prefix = subset.masks, subset.prefix_tokens
    grid = patch_grid(model, masks.shape[2] - prefix)
    figures = {}
    for j, i in enumerate(shown):
        picture = to_tensor(image_set.raw[i])
        width = max(1, round(_PANEL * picture.shape[2] / picture.shape[1]))
        small = F.interpolate(picture[None], size=(_PANEL, width), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp(0, 1)
        sheet = kept_patches_figure(small, masks[j], prefix_tokens=prefix, grid=grid, columns=masks.shape[1])
        token = int(patch.tokens[j])
        figures[i] = _Fig7(thumb(to_tensor(sheet), sheet.height), masks[j, :, prefix:].sum(1).tolist(),
                           [_overlay(m, picture) for m in class_maps[j]], token,
                           [_overlay(m, picture) if kept else None for m, kept in zip(patch.maps[j], masks[j, :, token])])
    return figures


def _weights(model_ref: Optional[Mapping]) -> str:
    """Which model and weights the run used, saying so when no weights were loaded."""
    if not model_ref:
        return "unknown"
    spec, parts = str(model_ref.get("spec")), []
    if model_ref.get("pretrained"):
        parts.append("pretrained hub weights")
    if model_ref.get("checkpoint"):
        parts.append(f"checkpoint {Path(model_ref['checkpoint']).name}")
    if not parts and (":" not in spec or spec.startswith("timm:")):
        parts.append("random initialisation: no pretrained weights or checkpoint were loaded")
    return ", ".join([spec, *parts])


def _summary(tsub: TokenSubnetwork) -> str:
    """Summary line, fidelity table and the mean tokens per block."""
    c = tsub.counts()
    rows = [("Model", _weights(tsub.model_ref)),
            ("Token slots kept per image (mean)", f"{c['slots_kept_mean']:.1f}/{c['slots_total']} "
                                                  f"({100 * c['slots_kept_mean'] / c['slots_total']:.1f} %)"),
            ("Patch tokens in the last block (mean)", f"{sum(c['patches_in_last_block']) / c['images']:.1f}")]
    blocks = "".join(f'<th scope="col">{html.escape(s.label)}</th>' for s in tsub.sites)
    means = "".join(f"<td>{v:.1f}</td>" for v in c["tokens_per_block_mean"])
    per_block = (f"<table><caption>Tokens each block processes, mean over the {c['images']} images (the class "
                 f'token included; {tsub.sites[0].tokens} = all)</caption><tr><th scope="col">Block</th>{blocks}'
                 f'</tr><tr><th scope="row">Tokens</th>{means}</tr></table>')
    return summary_html(tsub, rows + fidelity_rows(tsub.fidelity), "token sub-network") + per_block


def _row(sprites: Sprites, labels: Sequence[str], pngs: Sequence[Optional[bytes]], alts: Sequence[str]) -> str:
    """One Fig. 7 row of labelled per-block heatmaps ('pruned' where there is none)."""
    steps = [f'<li class="step"><span class="label">{html.escape(label)}</span>'
             + (sprites.show(png, alt) if png else '<span class="muted">pruned</span>') + "</li>"
             for label, png, alt in zip(labels, pngs, alts)]
    return f'<ol class="steps">{"".join(steps)}</ol>'


def _article(sprites: Sprites, predictions: Predictions, i: int, fig: _Fig7, tsub: TokenSubnetwork) -> str:
    """Fig. 7 for image ``i``: kept patches, class-token and patch-token attribution per block."""
    caption, blocks = predictions.caption(i), [s.label for s in tsub.sites]
    kept = ", ".join(f"{b} {n}" for b, n in zip(blocks, fig.patches_per_block))
    slots = int(tsub.masks[i].sum())
    alt = f"Kept patches (red squares) per block on image {i + 1}; patch tokens kept: {kept}"
    class_row = _row(sprites, blocks, fig.class_maps,
                     [f"Class-token attribution heatmap, block {b}, image {i + 1}" for b in blocks])
    labels = [f"{b}_T{fig.token}" for b in blocks]
    patch_row = _row(sprites, labels, fig.patch_maps,
                     [f"Attribution heatmap of patch token {label}, image {i + 1}" for label in labels])
    return (f'<article class="fig7"><h3 id="image-{i + 1}">{html.escape(caption)}</h3>'
            f"<p>Keeps {slots}/{tsub.masks[i].numel()} token slots; patch tokens per block: "
            f"{html.escape(kept)}.</p><h4>Kept patches per block</h4>"
            f'<div class="strip">{sprites.show(fig.kept, alt)}</div>'
            f"<h4>Class-token attribution per block</h4>{class_row}"
            f"<h4>Attribution of patch token T{fig.token} (kept longest) per block</h4>{patch_row}</article>")


def _explanation(per_class: int) -> str:
    return (f"<p>As in the paper's Fig. 7, for the first {per_class} image(s) of each class. Top: the patches "
            "each block processes (red squares; a dimmed patch is pruned there and in every later block). "
            "Middle: where the class token draws its information from, per block (Eq. 10 on the pruned "
            "network). Bottom: the same for the patch token kept longest, labelled B{block}_T{token} with the "
            "token's index in the sequence (0 is the class token). Each heatmap is normalised to its own "
            "maximum.</p>")


def write_token_report(run_dir: PathLike, tsub: TokenSubnetwork, model: nn.Module, image_set: ImageSet, *,
                       images_per_class: int = 2, out: Optional[PathLike] = None,
                       class_indices: Optional[Mapping[str, int]] = None) -> Path:
    """Write the self-contained HTML report of a token run (see the module docstring).

    Args:
        run_dir: the run's folder (the page goes to ``run_dir/report.html`` unless ``out``).
        tsub: the token scores, fitted on ``image_set`` in this order; model: the ViT, without hooks.
        images_per_class: how many images of each class get Fig. 7's rows.
        class_indices: task class name -> model output index, to tell misclassified images (default:
            ``tsub.task["class_indices"]``, else ImageNet names or synsets for 1000-class models).

    Example:
        >>> import timm, torch
        >>> from PIL import Image
        >>> from hookchains.inputs.data import ImageSet
        >>> from hookchains.tokens.fit import fit_tokens
        >>> deit = timm.create_model("test_vit", img_size=64, num_classes=2).eval()
        >>> views = ImageSet(torch.randn(4, 3, 64, 64), torch.tensor([0, 0, 1, 1]), ["cat", "espresso"],
        ...                  ["c.png"] * 2 + ["e.png"] * 2, [Image.new("RGB", (64, 64))] * 4)
        >>> tsub = fit_tokens(deit, views.images, steps=2, progress=False)
        >>> write_token_report("runs/deit-cat", tsub, deit, views)
        PosixPath('runs/deit-cat/report.html')
    """
    if tsub.scores.shape[0] != len(image_set) or images_per_class < 1:
        raise ValueError(f"the token scores are for {tsub.scores.shape[0]} images, the task has {len(image_set)}; "
                         f"images_per_class must be >= 1 (got {images_per_class})")
    preds = predictions(tsub, model, image_set, class_indices)
    shown = _shown(image_set, images_per_class)
    figures = _figures(tsub, model, image_set, shown)
    sprites = Sprites()
    pngs = {i: thumb(to_tensor(image_set.raw[i]), IMAGE_PX) for i in range(len(image_set))}
    articles = "".join(_article(sprites, preds, i, figures[i], tsub) for i in shown)
    page = document(sprites, [("summary", "Token sub-network", _summary(tsub)),
                              ("images", "Task images", image_grid(sprites, preds, pngs)),
                              ("fig7", "Kept tokens and attribution per image (Fig. 7)",
                               _explanation(images_per_class) + articles)])
    return atomic_write_bytes(Path(out) if out is not None else Path(run_dir) / "report.html", page.encode())
