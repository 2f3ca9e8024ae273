"""Materialise model kinds that broke it (issue 11, kinds 4 and 5): half precision, re-parametrised weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from hookchains.core.attach import ScoreHooks
from hookchains.core.materialize import materialize
from hookchains.core.testing import random_subnetwork


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _hooked(model, sub, x):
    chains = ScoreHooks(model, sub.sites, tau=sub.tau)
    chains.load_state(sub.scores, sub.gate_logits)
    with torch.no_grad(), chains.using("hard"):
        out = model(x)
    chains.detach()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_materialises_in_its_dtype(dtype):
    model, x = _net(), torch.randn(4, 3, 16, 16)
    sub = random_subnetwork(model, x[:1], counts={"0": 3, "3": 5}, gates_open=True)
    model = model.to(dtype)
    module, report = materialize(sub, model, x.to(dtype))
    assert {p.dtype for p in module.parameters()} == {dtype} and report.dtype == str(dtype)[6:]
    assert [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)] == [3, 5]
    expected = _hooked(model, sub, x.to(dtype)).float()
    with torch.no_grad():
        got = module(x.to(dtype)).float()
    assert (got - expected).abs().max() <= 8 * torch.finfo(dtype).eps * expected.abs().max()
    assert next(model.parameters()).dtype == dtype  # the user's model is left in its dtype


def _spectral(model):
    parametrizations.spectral_norm(model[0])            # torch.nn.utils.parametrize based
    torch.nn.utils.spectral_norm(model[3])              # the older hook-based form
    parametrizations.weight_norm(model[8])
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 16, 16))            # power iterations: u, v settle
    return model.eval()


def test_reparametrised_weights_take_the_folded_scores():
    model, x = _spectral(_net()), torch.randn(4, 3, 16, 16)
    sub = random_subnetwork(model, x[:1], counts={"0": 3, "3": 5}, gates_open=True)
    sub.scores = {k: torch.where(v > 0, torch.full_like(v, 0.5), v) for k, v in sub.scores.items()}  # scale != 1
    module, report = materialize(sub, model, x)
    expected = _hooked(model, sub, x)
    with torch.no_grad():
        assert (module(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not any(parametrize.is_parametrized(m) for m in module.modules())
    assert parametrize.is_parametrized(model[0]) and hasattr(model[3], "weight_orig")  # user's model untouched
    assert [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)] == [3, 5]
