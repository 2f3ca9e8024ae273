"""Results display in Jupyter: ``_repr_html_`` gives the summary line, HTML-escaped."""
from __future__ import annotations

import html

import torch
from torch import nn

from hookchains.core.testing import random_subnetwork


def test_subnetwork_repr_html_is_the_escaped_summary():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    sub = random_subnetwork(model.eval(), torch.randn(1, 3, 16, 16), keep=0.5)
    shown = sub._repr_html_()
    assert shown.startswith("<p><strong>Subnetwork</strong>: ") and shown.endswith("</p>")
    assert html.unescape(shown[len("<p><strong>Subnetwork</strong>: "):-len("</p>")]) == sub.summary()
    assert f"{sub.counts()['filters_kept']}/{sub.counts()['filters_total']} filters" in shown
