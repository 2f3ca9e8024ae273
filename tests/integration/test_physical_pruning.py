"""Physically pruned means channels removed: exact widths after materialise, computed independently.

Each expected width is derived from the scores alone and the architecture's coupling (which layers
write into the same channels), never from what torch-pruning did."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from hookchains.core.attach import ScoreHooks
from hookchains.core.materialize import materialize
from hookchains.core.testing import random_subnetwork


def _kept(sub, name):
    return set(torch.nonzero(sub.scores[name] >= sub.tau).flatten().tolist())


def _assert_exact(module, model, sub, example):
    chains = ScoreHooks(model, sub.sites, tau=sub.tau)
    chains.load_state(sub.scores, sub.gate_logits)
    x = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), chains.using("hard"):
        expected = model(x)
    chains.detach()
    with torch.no_grad():
        assert (module(x) - expected).abs().max() <= 1e-4 * expected.abs().max()


def _cnn(widths):
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()] + ([nn.MaxPool2d(2)] if i == 1 else [])
        c = w
    torch.manual_seed(0)
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # a trained-looking BN: non-zero bias and statistics
            nn.init.normal_(m.bias), nn.init.normal_(m.running_mean), nn.init.uniform_(m.running_var, 0.5, 2)
    return model


@pytest.mark.parametrize("widths,kept", [((16, 32), (5, 8)), ((16, 32, 48, 80), (7, 14, 20, 30))],
                         ids=["sequential-13-of-48", "4-conv-71-of-176"])
def test_plain_cnn_keeps_exactly_the_kept_filters(widths, kept):
    model, example = _cnn(widths), torch.randn(1, 3, 16, 16)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    sub = random_subnetwork(model, example, counts=dict(zip(convs, kept)), gates_open=True)
    module, report = materialize(sub, model, example)
    widths_after = [m.weight.shape for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert widths_after == [torch.Size([k, c, 3, 3]) for k, c in zip(kept, (3,) + kept[:-1])]
    assert module[-1].weight.shape == (10, kept[-1])
    assert report.pruned and report.channels_removed == sum(widths) - sum(kept)
    assert all(entry["removed"] == entry["zeroed"] and not entry["stayed"] for entry in report.sites.values())
    _assert_exact(module, model, sub, example)


def test_resnet18_inner_convs_shrink_and_streams_keep_the_union():
    """timm resnet18, 30 % random filters, every gate open: each block's conv1 keeps its kept filters;
    a stage's residual stream keeps every channel kept by any of its writers (stem/downsample + conv2s)."""
    model, example = timm.create_model("resnet18").eval(), torch.randn(1, 3, 32, 32)
    sub = random_subnetwork(model, example, gates_open=True)
    module, report = materialize(sub, model, example)
    stream = {0: _kept(sub, "conv1")}
    for stage in range(1, 5):
        writers = [f"layer{stage}.0.downsample.0"] if stage > 1 else []
        writers += [f"layer{stage}.{b}.conv2" for b in range(2)]
        stream[stage] = set().union(*(_kept(sub, w) for w in writers)) | (stream[0] if stage == 1 else set())
    for stage in range(1, 5):
        for b in range(2):
            block = module.get_submodule(f"layer{stage}.{b}")
            inner = len(_kept(sub, f"layer{stage}.{b}.conv1"))
            assert block.conv1.out_channels == inner
            assert block.conv2.weight.shape[:2] == (len(stream[stage]), inner)
    assert module.fc.in_features == len(stream[4])
    conv2 = report.sites["layer1.0.conv2"]
    removed_here = len(set(range(64)) - stream[1])
    assert conv2["removed"] == removed_here and conv2["stayed"] == {"coupled": conv2["zeroed"] - removed_here}
    _assert_exact(module, model, sub, example)


def test_mobilenetv2_expansion_keeps_what_the_expand_or_depthwise_conv_keeps():
    model, example = timm.create_model("mobilenetv2_100").eval(), torch.randn(1, 3, 32, 32)
    sub = random_subnetwork(model, example, gates_open=True)
    module, report = materialize(sub, model, example)
    checked = 0
    for name, block in model.named_modules():
        if type(block).__name__ == "InvertedResidual":
            union = _kept(sub, f"{name}.conv_pw") | _kept(sub, f"{name}.conv_dw")
            small = module.get_submodule(name)
            assert small.conv_pw.out_channels == small.conv_dw.out_channels == len(union)
            checked += 1
    assert checked == 16 and module.conv_head.out_channels == len(_kept(sub, "conv_head"))
    _assert_exact(module, model, sub, example)


class _SigmoidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.sigmoid(self.bn1(self.conv1(x)))           # a zeroed channel reads 0.5 downstream, padded at borders
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.bn3(self.conv3(x))).mean((2, 3)))


def test_channels_read_as_non_zero_or_inside_grouped_convs_stay_with_their_reason():
    torch.manual_seed(0)
    model, example = _SigmoidNet().eval(), torch.randn(1, 3, 8, 8)
    sub = random_subnetwork(model, example, counts={"conv1": 3, "conv2": 3, "conv3": 4})
    module, report = materialize(sub, model, example)
    assert report.sites["conv1"]["stayed"] == {"read non-zero": 5} and report.sites["conv1"]["removed"] == 0
    assert report.sites["conv2"]["stayed"] == {"grouped conv": 5}   # read by the grouped conv3
    assert report.sites["conv3"]["stayed"] == {"grouped conv": 4}
    assert report.channels_removed == 0 and not report.pruned
    _assert_exact(module, model, sub, example)


class EcaNet(nn.Module):
    """conv-BN-ReLU, timm's ECA attention (a 1-D conv over the channel axis), conv-BN-ReLU, pooled linear."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import EcaModule
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.eca = EcaModule(16, kernel_size=3)
        self.body = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))

    def forward(self, x):
        return self.head(self.body(self.eca(self.stem(x))))


def test_channels_under_eca_attention_stay_and_the_others_go():
    """Removing a zeroed channel before ECA's 1-D conv over channels would shift its neighbours under the
    kernel: those channels stay ("channel mixing"); the conv after it loses exactly its zeroed filters."""
    torch.manual_seed(0)
    model, example = EcaNet().eval(), torch.randn(1, 3, 16, 16)
    sub = random_subnetwork(model, example, counts={"stem.0": 6, "body.0": 10}, gates_open=True)
    module, report = materialize(sub, model, example)
    assert report.sites["stem.0"] == {"channels": 16, "zeroed": 10, "removed": 0, "stayed": {"channel mixing": 10}}
    assert report.sites["body.0"]["removed"] == 14 and module.body[0].weight.shape == (10, 16, 3, 3)
    assert module.stem[0].out_channels == 16 and module.head[2].weight.shape == (5, 10)
    _assert_exact(module, model, sub, example)


class HardCodedHalves(nn.Module):
    """A conv whose output is cut into halves by code with sizes of its own (as attention cuts q, k, v):
    ``split([8, 8])``, or slices ``y[:, :8], y[:, 8:]``. Removing one of its channels breaks that."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pair = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x):
        y = self.pair(self.stem(x))
        a, b = y.split([8, 8], dim=1) if self.how == "split" else (y[:, :8], y[:, 8:])
        return self.head(self.body(a * b.sigmoid()))


@pytest.mark.parametrize("how, stayed", [
    ("split", {"split": 4}),  # the search stops at the split
    ("slice", {"exactness fallback": 4})])  # the group is pruned, breaks the forward and is put back
def test_channels_cut_by_hard_coded_sizes_stay_and_the_rest_is_pruned(how, stayed):
    torch.manual_seed(0)
    model, example = HardCodedHalves(how).eval(), torch.randn(1, 3, 16, 16)
    sub = random_subnetwork(model, example, counts={"stem.0": 9, "pair.0": 12, "body.0": 5}, gates_open=True)
    module, report = materialize(sub, model, example)
    assert report.sites["pair.0"] == {"channels": 16, "zeroed": 4, "removed": 0, "stayed": stayed}
    assert module.pair[0].out_channels == 16  # whole: the halves still get 8 + 8
    assert report.sites["stem.0"]["removed"] == 7 and module.stem[0].out_channels == 9
    assert report.sites["body.0"]["removed"] == 7 and module.body[0].out_channels == 5
    put_back = ["1 group(s) put back because pruning them changed the outputs (first at pair.1: "] if how == "slice" else []
    assert [note[:len(p)] for note, p in zip(report.notes, put_back)] == put_back  # no whole-model fallback
    assert len(report.notes) == len(put_back)
    _assert_exact(module, model, sub, example)


class InputWidthReshape(nn.Module):
    """As timm's ``LambdaLayer`` (lambda_resnet26rpt_256): the block's output is reshaped to its *input's*
    channel count, ``out.reshape(B, C, H, W)`` with ``C = h.shape[1]``, a coupling of ``reduce``'s output
    width to ``mix``'s that torch-pruning does not trace (they are in different groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix = nn.Conv2d(8, 8, 1)
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x):
        h = self.reduce(self.stem(x))
        b, c, height, width = h.shape
        return self.head(self.body(self.mix(h).reshape(b, c, height, width)))


def test_a_group_coupled_by_untraced_code_is_put_back_with_its_cause_and_the_rest_is_pruned():
    torch.manual_seed(0)
    model, example = InputWidthReshape().eval(), torch.randn(1, 3, 16, 16)
    sub = random_subnetwork(model, example, counts={"stem.0": 9, "reduce.0": 5, "mix": 8, "body.0": 5},
                            gates_open=True)
    module, report = materialize(sub, model, example)
    assert report.sites["reduce.0"] == {"channels": 8, "zeroed": 3, "removed": 0, "stayed": {"exactness fallback": 3}}
    assert module.reduce[0].out_channels == 8 and module.mix.in_channels == 8
    assert report.sites["stem.0"]["removed"] == 7 and module.stem[0].out_channels == 9
    assert report.sites["body.0"]["removed"] == 7 and module.body[0].out_channels == 5
    assert report.channels_removed == 14
    assert len(report.notes) == 1 and report.notes[0].startswith(
        "1 group(s) put back because pruning them changed the outputs (first at reduce.1: the pruned module "
        "failed to run (RuntimeError: shape '[")
    _assert_exact(module, model, sub, example)


def test_a_headless_encoder_whose_last_linear_is_cut_with_its_block_materialises_exactly():
    """timm's dinov2 ViTs have no head (``num_classes=0``): the last linear, taken as the classifier, sits
    in the last block; closing that block's gate cuts it (materialise raised AttributeError)."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=0).eval()
    example = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:])
    sub = random_subnetwork(model, example, gates_open=False)
    assert sub.sites.classifier == "blocks.5.mlp.fc2" and "blocks.5" in sub.removed_gates
    module, report = materialize(sub, model, example)
    assert report.channels_after == model.patch_embed.proj.out_channels  # every block cut: the stem is left
    _assert_exact(module, model, sub, example)
