"""Featuremap heatmaps, PNG helpers and featuremap capture.

NeuroChains (appendix A.4) shows, next to every retained filter, *where* in
the input image that filter fires: the filter's featuremap is passed through
an activation function (so only a few pixels stay lit), upsampled bilinearly
to the input size and overlaid on the image.  This module implements that
recipe without matplotlib, plus the small I/O helpers the HTML report needs.

Example::

    maps = capture_featuremaps(model, images, ["features.4"])
    overlay = featuremap_heatmap(maps["features.4"][0, 17], images[0])
    save_png(overlay, "chain/features.4_17.png")
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from hookchains.io import PathLike, atomic_write_bytes

__all__ = [
    "COLORMAPS",
    "apply_colormap",
    "capture_featuremaps",
    "eval_mode",
    "featuremap_heatmap",
    "get_module",
    "save_png",
    "to_png_bytes",
]

# Colour maps as evenly spaced RGB anchors (0, 1/8, ..., 1), linearly
# interpolated.  "jet" is the classic piecewise-linear rainbow (dark blue ->
# cyan -> yellow -> dark red); "viridis" samples the perceptually uniform map.
COLORMAPS: dict[str, Tensor] = {
    "jet": torch.tensor([
        [0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 0.5, 1.0],
        [0.0, 1.0, 1.0], [0.5, 1.0, 0.5], [1.0, 1.0, 0.0],
        [1.0, 0.5, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0],
    ]),
    "viridis": torch.tensor([
        [0.267, 0.005, 0.329], [0.279, 0.175, 0.483], [0.230, 0.322, 0.546],
        [0.173, 0.449, 0.558], [0.128, 0.567, 0.551], [0.158, 0.684, 0.502],
        [0.369, 0.789, 0.383], [0.678, 0.864, 0.190], [0.993, 0.906, 0.144],
    ]),
}

def get_module(model: nn.Module, module_path: str) -> nn.Module:
    """Return the submodule at dotted ``module_path`` ("" is the model itself).

    Raises a ``ValueError`` naming the path instead of the bare
    ``AttributeError`` of :meth:`torch.nn.Module.get_submodule`.

    Example: ``get_module(mobilenet, "features.4.conv.0")``.
    """
    try:
        return model.get_submodule(module_path)
    except AttributeError as err:
        raise ValueError(f"no module at path {module_path!r}: {err}") from err


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put every submodule in eval mode; restore each flag after.

    Explanations must see the network as it predicts (BatchNorm running
    statistics, no dropout) and must not update BatchNorm statistics.

    Example: ``with eval_mode(model): logits = model(x)``.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def capture_featuremaps(
    model: nn.Module, images: Tensor, module_paths: list[str]
) -> dict[str, Tensor]:
    """Run one no-grad, eval-mode forward and return each module's output.

    Temporary forward hooks record the (detached) output of every module in
    ``module_paths``; they are removed again even when the forward fails, so
    the model is left exactly as it was.  If a module runs several times in
    one forward, its last output is returned.

    Example::

        maps = capture_featuremaps(model, x, ["features.2", "features.4"])
        maps["features.4"].shape   # (N, C, h, w)
    """
    modules = {path: get_module(model, path) for path in module_paths}
    outputs: dict[str, Tensor] = {}

    def make_hook(path: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"output of {path!r} is {type(output).__name__}, not a Tensor")
            outputs[path] = output.detach()
        return hook

    handles = [m.register_forward_hook(make_hook(p)) for p, m in modules.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in module_paths if p not in outputs]
    if missing:
        raise ValueError(f"modules never ran during the forward: {missing}")
    return {path: outputs[path] for path in module_paths}


def apply_colormap(values: Tensor, colormap: str = "jet") -> Tensor:
    """Map values in [0, 1] of shape (h, w) to RGB colours of shape (3, h, w).

    Linear interpolation between the anchors of :data:`COLORMAPS`; values
    outside [0, 1] are clamped.  ``apply_colormap(torch.zeros(1, 1))`` is the
    colour of "no activation" (dark blue for jet).
    """
    if colormap not in COLORMAPS:
        raise ValueError(f"unknown colormap {colormap!r}; choose from {sorted(COLORMAPS)}")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (h, w), got shape {tuple(values.shape)}")
    lut = COLORMAPS[colormap].to(device=values.device, dtype=values.dtype)
    pos = values.clamp(0.0, 1.0) * (lut.shape[0] - 1)
    low = pos.floor().clamp(max=lut.shape[0] - 2).long()
    frac = (pos - low.to(pos.dtype)).unsqueeze(-1)
    rgb = lut[low] * (1.0 - frac) + lut[low + 1] * frac
    return rgb.permute(2, 0, 1)


def featuremap_heatmap(
    activation: Tensor, image: Tensor, *, alpha: float = 0.5, colormap: str = "jet"
) -> Tensor:
    """Overlay one filter's featuremap on its input image (paper A.4).

    Steps: ReLU on the featuremap (only positively activated pixels count),
    divide by its maximum so it lies in [0, 1] (an all-zero map stays zero
    instead of dividing by zero), bilinear upsampling to the image size,
    colour mapping, then the blend::

        out = (1 - alpha) * image + alpha * apply_colormap(upsampled)

    so pixels where the filter is silent get ``(1-alpha)*image +
    alpha*apply_colormap(0)``.

    Example: ``featuremap_heatmap(maps["features.4"][0, 17], images[0])``.
    """
    if activation.dim() != 2:
        raise ValueError(f"activation must be 2-D (h, w), got shape {tuple(activation.shape)}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor in [0, 1], got dtype {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    act = activation.detach().to(device=image.device, dtype=image.dtype).relu()
    peak = act.max()
    act = act / peak if peak > 0 else torch.zeros_like(act)
    up = F.interpolate(act[None, None], size=image.shape[1:], mode="bilinear", align_corners=False)
    colour = apply_colormap(up[0, 0], colormap)
    return (1.0 - alpha) * image + alpha * colour


def to_png_bytes(img: Tensor) -> bytes:
    """Encode a (3, H, W) float image in [0, 1] as PNG bytes (values clamped).

    PNG is lossless and its encoding deterministic, so equal images give
    equal bytes.  Example: ``data = to_png_bytes(overlay)``.
    """
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"img must have shape (3, H, W), got {tuple(img.shape)}")
    pixels = (img.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(img: Tensor, path: PathLike) -> Path:
    """Write ``img`` as a PNG at ``path`` atomically and return the path.

    The bytes go to a temporary sibling file that then replaces ``path``
    (:func:`hookchains.io.atomic_write_bytes`, i.e. ``os.replace``), so
    readers never see a half-written image.  Parent directories are created.

    Example: ``save_png(overlay, "report/img/features.4_17.png")``.
    """
    return atomic_write_bytes(path, to_png_bytes(img))
