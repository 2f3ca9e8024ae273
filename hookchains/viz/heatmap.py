"""Featuremap heatmaps: where in the image a filter fires (appendix A.4).

NeuroChains (appendix A.4) shows, next to every retained filter, *where* in
the input image that filter fires: the filter's featuremap is passed through
an activation function (so only a few pixels stay lit), upsampled bilinearly
to the input size and overlaid on the image.  This module implements that
recipe without matplotlib.

Example::

    maps = capture_featuremaps(model, images, ["features.4"])
    overlay = featuremap_heatmap(maps["features.4"][0, 17], images[0])
    save_png(overlay, "chain/features.4_17.png")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["COLORMAPS", "apply_colormap", "featuremap_heatmap"]

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
