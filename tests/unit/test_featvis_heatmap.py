"""Tests for hookchains.analysis.featvis (filter visualisation) and hookchains.viz.heatmap (paper A.4)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn

from hookchains.analysis.featvis import FeatureVisCache, visualize_filter, visualize_filters
from hookchains.core.io import save_png, to_png_bytes
from hookchains.core.state import capture_featuremaps
from hookchains.viz.heatmap import apply_colormap, featuremap_heatmap

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)


def red_minus_blue_net() -> nn.Sequential:
    """Conv whose channel 0 sums (R - B) over a 3×3 window; channel 1 is random."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1.0
        conv.weight[0, 2] = -1.0
        conv.weight[1] = torch.randn(3, 3, 3)
    return nn.Sequential(
        conv, nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)
    )


class ColourTokenNet(nn.Module):
    """Known colour units in three output layouts.

    ``embed`` (N×3×H×W): mean R, G, B of each 4×4 patch; ``proj`` (N×T×2):
    per-token red-minus-blue and blue-minus-red; ``head`` (N×2): their means.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 3, 4, stride=4, bias=False)
        self.proj = nn.Linear(3, 2, bias=False)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(3)[:, :, None, None].expand(3, 3, 4, 4) / 16)
            self.proj.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]]))
            self.head.weight.copy_(torch.eye(2))

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(tokens.mean(1))


class CountingNet(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x)


def conv_channel0(net: nn.Sequential, image: Tensor) -> float:
    """Mean pre-activation of the red-minus-blue channel on a [0, 1] image."""
    with torch.no_grad():
        return net[0](((image - MEAN) / STD)[None])[0, 0].mean().item()


pytestmark = pytest.mark.usefixtures("one_thread")


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- featvis


def test_visualisation_finds_red_minus_blue_pattern() -> None:
    net = red_minus_blue_net()
    img = visualize_filter(net, "0", 0, image_size=32, steps=128)
    assert img.shape == (3, 32, 32)
    assert img.min() >= 0.0 and img.max() <= 1.0
    random_act = conv_channel0(net, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    vis_act = conv_channel0(net, img)
    assert vis_act > 10.0 > random_act + 10.0
    assert img[0].mean() > img[2].mean() + 0.3


def test_same_seed_same_image_other_seed_other_image() -> None:
    net = red_minus_blue_net()
    first = visualize_filter(net, "0", 1, image_size=32, steps=6, seed=3)
    again = visualize_filter(net, "0", 1, image_size=32, steps=6, seed=3)
    other = visualize_filter(net, "0", 1, image_size=32, steps=6, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_weights_flags_modes_and_hooks_are_restored() -> None:
    net = red_minus_blue_net()
    net[5].bias.requires_grad_(False)
    net.train()
    flags = [p.requires_grad for p in net.parameters()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    visualize_filter(net, "2", 1, image_size=32, steps=4)
    assert [p.requires_grad for p in net.parameters()] == flags == [True, True, True, True, False]
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(m.training for m in net.modules())
    assert hook_count(net) == 0


def test_errors_are_clear_and_leave_no_hooks() -> None:
    net = red_minus_blue_net()
    with pytest.raises(ValueError, match="channel 2 out of range.*2 channels"):
        visualize_filter(net, "0", 2, image_size=32, steps=2)
    assert hook_count(net) == 0
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="no module at path 'nope'"):
        visualize_filter(net, "nope", 0, image_size=32, steps=2)
    with pytest.raises(ValueError, match="steps"):
        visualize_filter(net, "0", 0, steps=0)


@pytest.mark.parametrize(
    ("module_path", "channel", "redness_sign"),
    [("embed", 0, 1), ("embed", 2, -1), ("proj", 0, 1), ("proj", 1, -1), ("head", 0, 1), ("head", 1, -1)],
)
def test_conv_token_and_linear_layouts_pick_the_channel(module_path: str, channel: int, redness_sign: int) -> None:
    img = visualize_filter(ColourTokenNet(), module_path, channel, image_size=32, steps=64, lr=0.1)
    means = img.mean((1, 2))
    assert redness_sign * (means[0] - means[2]) > 0.08
    assert int(means.argmax() if redness_sign > 0 else means.argmin()) == 0


def test_runs_on_real_mobilenet_v2() -> None:
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    img = visualize_filter(net, "features.3.conv.1", 5, image_size=64, steps=8)
    assert img.shape == (3, 64, 64)
    assert torch.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    assert img.std() > 0.0
    assert hook_count(net) == 0


def test_cache_hits_disk_without_recomputing(tmp_path: Path) -> None:
    net = CountingNet(red_minus_blue_net())
    cache = FeatureVisCache(tmp_path, "rgb-net", model=net)
    params = {"image_size": 24, "steps": 3}
    first = cache.get("inner.0", 0, **params)
    calls = net.calls
    assert calls == 3
    assert cache.get("inner.0", 0, **params) == first
    assert cache.get("inner.0", 0, lr=0.05, seed=0, **params) == first  # defaults spelled out
    assert FeatureVisCache(tmp_path, "rgb-net").get("inner.0", 0, **params) == first
    assert net.calls == calls
    assert cache.get("inner.0", 0, seed=1, **params) != first
    assert net.calls == calls + 3
    files = sorted(p.name for p in (tmp_path / "rgb-net").iterdir())
    assert len(files) == 2 and all(name.endswith(".png") for name in files)
    assert Image.open(io.BytesIO(first)).size == (24, 24)


def test_cache_without_model_and_bad_params(tmp_path: Path) -> None:
    cache = FeatureVisCache(tmp_path, "m")
    with pytest.raises(LookupError, match="not cached"):
        cache.get("layer", 0)
    with pytest.raises(TypeError, match="unknown visualisation parameters"):
        cache.path("layer", 0, stepz=3)


# ---------------------------------------------------------------- heatmap


def test_heatmap_highlights_only_the_active_quadrant() -> None:
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    fmap = torch.full((8, 8), -3.0)
    fmap[:4, :4] = 2.0
    out = featuremap_heatmap(fmap, image, alpha=0.4)
    silent = (1 - 0.4) * image + 0.4 * apply_colormap(torch.zeros(1, 1))
    assert out.shape == image.shape
    assert torch.equal(out[:, 20:, 20:], silent[:, 20:, 20:])
    assert (out[:, :12, :12] - silent[:, :12, :12]).abs().sum(0).min() > 0.05
    assert torch.equal(apply_colormap(torch.ones(1, 1))[:, 0, 0], torch.tensor([0.5, 0.0, 0.0]))


def test_heatmap_normalises_by_maximum_after_relu() -> None:
    image = torch.zeros(3, 16, 16)
    fmap = torch.ones(4, 4)
    fmap[:2, :2] = 2.0
    out = featuremap_heatmap(fmap, image, alpha=1.0, colormap="viridis")
    half = apply_colormap(torch.full((1, 1), 0.5), "viridis")[:, 0, 0]
    assert torch.allclose(out[:, 15, 15], half, atol=1e-6)
    assert torch.allclose(out[:, 0, 0], apply_colormap(torch.ones(1, 1), "viridis")[:, 0, 0])


def test_relu_comes_before_bilinear_upsampling() -> None:
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3))
    fmap = torch.tensor([[0.0, 1.0], [-4.0, 0.5]])
    out = featuremap_heatmap(fmap, image, alpha=1.0)
    assert torch.equal(out, featuremap_heatmap(fmap.clamp(min=0), image, alpha=1.0))
    assert len(torch.unique(out[:, 0, :8].T, dim=0)) > 2  # smooth ramp, not nearest-neighbour blocks


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_silent_featuremap_gives_plain_tint(fill: float) -> None:
    image = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(1))
    out = featuremap_heatmap(torch.full((5, 6), fill), image)
    expected = 0.5 * image + 0.5 * apply_colormap(torch.zeros(10, 12))
    assert torch.isfinite(out).all()
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("activation", "image", "kwargs", "message"),
    [
        (torch.zeros(1, 4, 4), torch.zeros(3, 8, 8), {}, "activation must be 2-D"),
        (torch.zeros(4, 4), torch.zeros(1, 8, 8), {}, r"image must have shape \(3, H, W\)"),
        (torch.zeros(4, 4), torch.zeros(1, 3, 8, 8), {}, r"image must have shape \(3, H, W\)"),
        (torch.zeros(4, 4), torch.zeros(3, 8, 8, dtype=torch.uint8), {}, "float"),
        (torch.zeros(4, 4), torch.zeros(3, 8, 8), {"alpha": 1.5}, "alpha"),
        (torch.zeros(4, 4), torch.zeros(3, 8, 8), {"colormap": "hot"}, "unknown colormap"),
    ],
)
def test_heatmap_rejects_bad_inputs(activation: Tensor, image: Tensor, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        featuremap_heatmap(activation, image, **kwargs)


def test_png_round_trip_and_atomic_save(tmp_path: Path) -> None:
    img = torch.rand(3, 9, 7, generator=torch.Generator().manual_seed(2))
    data = to_png_bytes(img)
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    expected = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert decoded.shape == (9, 7, 3) and np.array_equal(decoded, expected)
    target = save_png(img, tmp_path / "sub" / "x.png")
    assert target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["x.png"]
    with pytest.raises(ValueError, match="shape"):
        to_png_bytes(torch.zeros(4, 9, 7))


def test_capture_featuremaps_matches_direct_forward_and_cleans_up() -> None:
    net = red_minus_blue_net()
    net.train()
    x = torch.randn(2, 3, 16, 16)
    maps = capture_featuremaps(net, x, ["2", "5"])
    assert list(maps) == ["2", "5"]
    net.eval()
    with torch.no_grad():
        assert torch.equal(maps["2"], net[:3](x))
        assert torch.equal(maps["5"], net(x))
    net.train()
    assert not maps["5"].requires_grad
    assert hook_count(net) == 0 and all(m.training for m in net.modules())
    with pytest.raises(RuntimeError):
        capture_featuremaps(net, torch.randn(2, 4, 16, 16), ["2"])
    assert hook_count(net) == 0 and all(m.training for m in net.modules())
    with pytest.raises(ValueError, match="no module at path"):
        capture_featuremaps(net, x, ["9"])


def test_filters_visualised_together_are_each_the_one_visualised_alone():
    """One batch over two layers and repeated layers gives each filter its own single-run picture."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU()).eval()
    filters = [("3", 2), ("1", 5), ("1", 0)]
    together = visualize_filters(net, filters, image_size=24, steps=10)
    for picture, (path, channel) in zip(together, filters):
        torch.testing.assert_close(picture, visualize_filter(net, path, channel, image_size=24, steps=10),
                                   rtol=0, atol=1e-4)
    assert not torch.allclose(together[1], together[2], atol=1e-3)  # different channels, different pictures
