"""Like-for-like figures (issue 12, item 5): paper-comparable counts, baselines the paper's way, per-image
KL shares, faithfulness binned and against a gradient x activation baseline, robustness as accuracy, and the
random-weights control."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from hookchains.adapters import discover
from hookchains.subnetwork import Subnetwork

VGG19_CONV = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]  # Simonyan & Zisserman, config E


def _on_meta(build):
    """Sites of a real architecture discovered on the meta device (no weights, no memory)."""
    with torch.device("meta"):
        model = build().eval()
        return discover(model, example=torch.empty(1, 3, 224, 224))


def _keep_all(sites) -> Subnetwork:
    return Subnetwork(sites, {s.name: torch.ones(s.channels) for s in sites.filters},
                      {g.name: torch.tensor(1.0) for g in sites.gates})


@pytest.mark.parametrize("build", [torchvision.models.vgg19, lambda: timm.create_model("vgg19")])
def test_vgg19_counts_conv_filters_and_fully_connected_units_apart(build):
    sites = _on_meta(build)
    counts = _keep_all(sites).counts()
    assert counts["conv_filters_total"] == sum(VGG19_CONV) == 5504
    assert counts["conv_layers_total"] == len(VGG19_CONV) == 16
    assert counts["linear_units_total"] == 2 * 4096 and counts["linear_layers_total"] == 2
    assert counts["filters_total"] == 5504 + 8192 and counts["layers_total"] == 18  # the old keys stay
    scores = {s.name: torch.ones(s.channels) for s in sites.filters}
    first_conv, first_fc = sites.filters[0], next(s for s in sites.filters if s.kind == "linear")
    scores[first_conv.name][:60] = 0.0   # 4 of 64 kept
    scores[first_fc.name][:] = 0.0       # a whole fully-connected layer removed
    part = Subnetwork(sites, scores, {g.name: torch.tensor(1.0) for g in sites.gates}).counts()
    assert (part["conv_filters_kept"], part["conv_layers_kept"]) == (5504 - 60, 16)
    assert (part["linear_units_kept"], part["linear_layers_kept"]) == (4096, 1)
    assert part["filters_kept"] == part["conv_filters_kept"] + part["linear_units_kept"]


def test_resnet50_has_26560_conv_filters_in_53_conv_layers_not_67():
    counts = _keep_all(_on_meta(torchvision.models.resnet50)).counts()
    widths = {1: 64, 2: 128, 3: 256, 4: 512}
    blocks = {1: 3, 2: 4, 3: 6, 4: 3}
    # stem + per stage: blocks x (w, w, 4w) + one 4w downsample conv
    expected = 64 + sum(blocks[i] * 6 * widths[i] + 4 * widths[i] for i in widths)
    assert counts["conv_filters_total"] == expected == 26560
    assert counts["conv_layers_total"] == 1 + 3 * sum(blocks.values()) + 4 == 53
    assert counts["linear_units_total"] == 0
