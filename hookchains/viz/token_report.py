"""The explorer page of a token run: a ViT with per-image token scores (paper section 4.5, Fig. 7).

The page is the explorer (:mod:`hookchains.viz.explorer`: its header, Content-Security-Policy, picture
table, keyboard and views) with a token-by-layer spine (:func:`token_explorer_data`, shared with the
text token runs of :mod:`hookchains.viz.text_report`): a column per block, a cell per image coloured by
the fraction of its patch tokens the block processes. A click on a cell, or picking an image, shows the
paper's Fig. 7 for that image:

* the patches each block processes, as red squares on the image (pruned ones dimmed), drawn by
  :func:`hookchains.tokens.attribution.kept_patches_figure`;
* the attribution of the class token to the input patches (Eq. 10 on the pruned network,
  :func:`hookchains.tokens.attribution.class_token_heatmaps`);
* the attribution of one patch token -- the one kept longest, labelled ``B{b}_T{t}`` with ``t`` its
  index in the token sequence (0 is the class token) -- in every block that still has it
  (:func:`hookchains.tokens.attribution.patch_token_heatmaps`).

Below the graph: the summary line, the fidelity table, the mean number of tokens each block processes
and the task images with the original model's predictions. Heatmaps are drawn with
:func:`hookchains.viz.heatmap.featuremap_heatmap` and normalised per map: they show where a token draws
from, not how much.

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
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

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
from hookchains.viz.explorer import Pictures, explorer_page, image_buttons
from hookchains.viz.heatmap import featuremap_heatmap
from hookchains.viz.html import IMAGE_PX, fidelity_rows, predictions, summary_html, thumb

__all__ = ["write_token_report", "token_explorer_data"]

_PANEL = 80  # px of one block's panel: 12 blocks fit the page's width in one row


@dataclass
class _Fig7:
    """The pictures of one image (PNG bytes): Fig. 7's three rows."""

    kept: bytes                        # one sheet, a panel per block
    patches_per_block: List[int]       # patch tokens each block processes
    class_maps: List[bytes]            # class-token attribution, per block
    token: int                         # sequence index of the bottom row's patch token
    patch_maps: List[Optional[bytes]]  # its attribution per block; None where it is pruned


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


def token_explorer_data(tsub: TokenSubnetwork, items: Sequence[Dict[str, Any]], groups: Sequence[Dict[str, Any]],
                        positions: Sequence[Sequence[int]], cell: Callable[[int, int], Dict[str, Any]],
                        unit: str) -> Dict[str, Any]:
    """The explorer's data model (:mod:`hookchains.viz.explorer`) of a token run: the token-by-layer view.

    Each column is a block (layer), each node a cell (one image or sentence in one block) coloured by the
    fraction of its ``positions`` (the patch tokens, or a sentence's word pieces) the block keeps;
    picking an image or a class highlights its row(s).

    Args:
        items: the explorer's ``images`` (a picture or a sentence each, with its Fig. 7 rows or word grid).
        positions: per item, the token indices its cells count.
        cell: ``(item, block) ->`` extra node fields (more ``facts``, ``pictures``).
        unit: "image" or "sentence", in the words of the panels.
    """
    masks, labels = tsub.masks, [s.label for s in tsub.sites]
    columns: List[Dict[str, Any]] = []
    nodes: List[Dict[str, Any]] = []
    for b, label in enumerate(labels):
        ids = [f"t{n}:{b}" for n in range(len(items))]
        kept = [int(masks[n, b, list(positions[n])].sum()) for n in range(len(items))]
        columns.append({"label": label, "kind": "layer", "kept": len(ids), "more": 0, "nodes": ids,
                        "detail": f"{sum(kept) / max(len(kept), 1):.1f} kept (mean)"})
        for n, k in enumerate(kept):
            extra = cell(n, b)
            total = len(positions[n])
            nodes.append({"id": ids[n], "label": f"{n + 1}: {k}/{total}", "title": f"{unit.capitalize()} {n + 1}, {label}",
                          "kind": "cell", "column": b, "image": n,
                          "value": k / max(total, 1), "aria": f"{unit} {n + 1}, {label}: {k} of {total} tokens kept",
                          "facts": [(unit.capitalize(), items[n]["caption"]), ("Block", label),
                                    ("Tokens kept", f"{k}/{total}"), *extra.get("facts", [])],
                          "featvis": None, "featvisFailed": None, "maps": [], "pictures": extra.get("pictures", [])})
    c = tsub.counts()
    title = (f"{c['slots_kept_mean']:.1f}/{c['slots_total']:.0f} token slots kept per {unit} (mean); "
             f"{len(items)} {unit}s x {len(labels)} blocks")
    return {"title": title, "columns": columns, "nodes": nodes, "edges": [], "images": list(items),
            "colour": {"by": "fraction of tokens kept", "low": "0", "high": "1"},
            "views": {"chains": "", "highlight": f"the picked {unit}'s cells", "unit": unit.capitalize(),
                      "compare": False, "compact": False, "classes": True},
            "groups": list(groups), "chains": [{"image": n, "nodes": [f"t{n}:{b}" for b in range(len(labels))],
                                                "strength": 0.0, "title": items[n]["caption"]}
                                               for n in range(len(items))]}


def _fig7_rows(table: Pictures, i: int, fig: _Fig7, blocks: Sequence[str]) -> List[Dict[str, Any]]:
    """Fig. 7 for image ``i`` as the explorer's picture rows: kept patches, class- and patch-token attribution."""
    kept = ", ".join(f"{b} {n}" for b, n in zip(blocks, fig.patches_per_block))
    labels = [f"{b}_T{fig.token}" for b in blocks]
    return [{"title": "Kept patches per block (Fig. 7, top)", "pics": [
                ["red: processed; dimmed: pruned", table.add(fig.kept),
                 f"Kept patches (red squares) per block on image {i + 1}; patch tokens kept: {kept}"]]},
            {"title": "Class-token attribution per block (Eq. 10)", "pics": [
                [b, table.add(png), f"Class-token attribution heatmap, block {b}, image {i + 1}"]
                for b, png in zip(blocks, fig.class_maps)]},
            {"title": f"Attribution of patch token T{fig.token} (kept longest) per block", "pics": [
                [label, None if png is None else table.add(png), f"Attribution heatmap of patch token {label}, "
                 f"image {i + 1}"] for label, png in zip(labels, fig.patch_maps)]}]


def _explanation() -> str:
    return ("<p>The graph is the token-by-layer view: a column per block, a cell per image, coloured by the "
            "fraction of its patch tokens the block processes (a pruned patch stays pruned in every later "
            "block). Click a cell for the image's kept patches and where the class token and the patch token "
            "kept longest draw their information from in that block (the paper's Fig. 7, Eq. 10 on the pruned "
            "network; each heatmap normalised to its own maximum); pick an image for its whole row.</p>")


def write_token_report(run_dir: PathLike, tsub: TokenSubnetwork, model: nn.Module, image_set: ImageSet, *,
                       out: Optional[PathLike] = None, class_indices: Optional[Mapping[str, int]] = None) -> Path:
    """Write the self-contained explorer page of a token run (see the module docstring).

    Args:
        run_dir: the run's folder (the page goes to ``run_dir/report.html`` unless ``out``).
        tsub: the token scores, fitted on ``image_set`` in this order; model: the ViT, without hooks.
        class_indices: task class name -> model output index, to tell misclassified images (default:
            ``tsub.task["class_indices"]``, else ImageNet names or synsets for 1000-class models).

    Raises:
        ValueError: the scores are not for ``image_set``'s images.

    Example: ``write_token_report("runs/deit-cat", tsub, deit, views)`` (module docstring).
    """
    if tsub.scores.shape[0] != len(image_set):
        raise ValueError(f"the token scores are for {tsub.scores.shape[0]} images, the task has {len(image_set)}; "
                         "report on the images the run was fitted on")
    preds = predictions(tsub, model, image_set, class_indices)
    figures = _figures(tsub, model, image_set, range(len(image_set)))
    table, blocks = Pictures(), [s.label for s in tsub.sites]
    rows = {i: _fig7_rows(table, i, fig, blocks) for i, fig in figures.items()}
    items = [{"label": preds.true_name(i) + (" (misclassified)" if preds.correct[i] is False else ""),
              "caption": preds.caption(i), "pic": table.add(thumb(to_tensor(image_set.raw[i]), IMAGE_PX)),
              "wrong": preds.correct[i] is False, "rows": rows[i]} for i in range(len(image_set))]

    def cell(i: int, b: int) -> Dict[str, Any]:
        kept, class_row, patch_row = rows[i]
        return {"pictures": [(kept["title"], *kept["pics"][0][1:]),
                             (f"Class-token attribution, {blocks[b]} (Eq. 10)", *class_row["pics"][b][1:]),
                             (f"Attribution of patch token {patch_row['pics'][b][0]}", patch_row["pics"][b][1],
                              patch_row["pics"][b][2] if patch_row["pics"][b][1] else "pruned in this block")]}

    prefix = tsub.prefix_tokens
    groups = [{"name": name, "images": [i for i, y in enumerate(image_set.labels.tolist()) if y == g]}
              for g, name in enumerate(image_set.class_names)]
    data = token_explorer_data(tsub, items, groups, [range(prefix, tsub.masks.shape[2])] * len(items), cell, "image")
    page = explorer_page(data, table, [("summary", "Token sub-network", _summary(tsub)),
                                       ("images", "Task images", _explanation() + image_buttons(data))],
                         heading="NeuroChains explorer: token run")
    return atomic_write_bytes(Path(out) if out is not None else Path(run_dir) / "report.html", page.encode())
