"""Shared fixtures (a tiny CNN trained here on scikit-learn's real digits: fast, real weights) and the
test tiers: ``unit`` (hand-set networks, docstring examples), ``integration`` (one small model per test),
``acceptance`` (CLI, subprocesses, real-weight fits, browser, sweeps), marked ``slow``:
``pytest tests -m "not slow"`` runs the fast tiers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


class DigitsNet(nn.Module):
    """A small VGG-like CNN with BN, a residual block and a shape-preserving conv layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.features(x))


def pytest_collection_modifyitems(config, items):
    """Every test under tests/acceptance/ is ``slow``."""
    acceptance = Path(__file__).parent / "acceptance"
    for item in items:
        if acceptance in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one torch thread (results independent of the machine), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits():
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    return x, torch.tensor(data.target)


@pytest.fixture(scope="session")
def digits():
    """(images N x 1 x 8 x 8, labels) of scikit-learn's bundled handwritten digits."""
    return _digits()


@pytest.fixture(scope="session")
def digits_net(digits):
    """DigitsNet trained for a few epochs on the first 1500 digits (real weights, seconds on CPU)."""
    torch.manual_seed(0)
    x, y = digits
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(8):
        for i in range(0, 1500, 100):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    net.eval()
    acc = (net(x[1500:]).argmax(-1) == y[1500:]).float().mean().item()
    assert acc > 0.9, f"digits net trained badly ({acc:.2f})"
    return net


@pytest.fixture(scope="session")
def digits_task(digits):
    """20 held-in images of classes 3 and 8 (10 each), from the held-out part of the data."""
    x, y = digits
    idx = torch.cat([torch.nonzero(y[1500:] == c).flatten()[:10] + 1500 for c in (3, 8)])
    return x[idx], y[idx]
