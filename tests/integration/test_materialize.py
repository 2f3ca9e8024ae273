"""Materialisation: exactness over a broad list of architectures, physical pruning, safe export."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision

import hookchains
from hookchains.core.attach import ScoreHooks
from hookchains.core.testing import check_model, input_for

ARCHS = [("tv", "resnet18"), ("timm", "resnet50"), ("tv", "resnext50_32x4d"), ("timm", "vgg11_bn"),
         ("timm", "mobilenetv2_100"), ("tv", "mobilenet_v3_small"), ("timm", "efficientnet_b0"),
         ("timm", "regnetx_002"), ("timm", "convnext_atto"), ("tv", "densenet121"), ("timm", "nfnet_l0"),
         ("timm", "deit_tiny_patch16_224"), ("timm", "vit_tiny_patch16_224")]


def _model(source, name):
    torch.manual_seed(0)
    m = timm.create_model(name) if source == "timm" else torchvision.models.get_model(name)
    return m.eval()


@pytest.mark.parametrize("source,name", ARCHS, ids=[a[1] for a in ARCHS])
def test_materialised_module_equals_thresholded_network(source, name):
    model = _model(source, name)
    example = input_for(model, size=64)
    module, report, sub = check_model(model, example)
    # independent check on an input the contract check did not see
    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(7))
    chains = ScoreHooks(model, sub.sites, tau=sub.tau)
    chains.load_state(sub.scores, sub.gate_logits)
    with torch.no_grad(), chains.using("hard"):
        expected = model(x)
    chains.detach()
    with torch.no_grad():
        got = module(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert report.params_after <= report.params_before
    assert type(module) is type(model)  # the user's class, not a wrapper


def test_model_with_cached_non_leaf_tensors_materialises():
    model = _model("timm", "levit_128")
    example = input_for(model)
    model(example)  # a forward with gradients on fills LeViT's attention-bias cache with non-leaf tensors
    _, report, _ = check_model(model, example)
    assert report.max_abs_diff <= report.tolerance


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_physical_pruning_removes_channels_on_cnns(name):
    model = _model("tv", name)
    module, report, _ = check_model(model, input_for(model, size=64))
    assert report.pruned, report.notes
    assert report.channels_after < report.channels_before
    assert report.macs_after < report.macs_before


def test_materialise_fitted_digits_net(digits_net, digits_task):
    images, _ = digits_task
    model = copy.deepcopy(digits_net)
    with hookchains.attach(model, example=images[:1]) as chains:
        # any network accepted (kl_tol, min_agreement): after 60 steps the KL is above 0.1, and a fit returns its sparsest network within kl_tol
        result = hookchains.fit(chains, images, steps=60, lr=0.05, lam=0.01, kl_tol=10.0, min_agreement=0.0,
                                progress=False)
        with torch.no_grad(), chains.using("hard"):
            expected = model(images)
    small, report = hookchains.materialize(result, model, images)
    with torch.no_grad():
        assert torch.allclose(small(images), expected, atol=1e-4 * float(expected.abs().max()))
    assert report.pruned and report.params_after < report.params_before
    kept_conv = sum(m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d))
    assert kept_conv >= result.counts()["filters_kept"]  # coupled channels may stay, zeroed
    unfolded, _ = hookchains.materialize(result, model, images, fold_scores=False)  # binary sub-network of Eq. 1
    assert not torch.allclose(unfolded(images), small(images))
