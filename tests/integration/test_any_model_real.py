"""Issue 11 on real torchvision/timm models (one small model each) and through the CLI.

The /work/shared/cases reproductions 02 (mixed modes), 05 (non-tensor outputs), 10 (in-place
accumulation, timm mobileone_s0) and 12 (two inputs through the CLI) as project tests.
"""
from __future__ import annotations

import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from torch import nn

from hookchains.cli.main import main
from hookchains.core.attach import attach
from hookchains.core.fit import fit
from hookchains.core.materialize import materialize
from hookchains.core.testing import random_subnetwork


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Results independent of the machine."""


def test_resnet18_with_frozen_batchnorms_keeps_every_mode_and_its_running_statistics():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()                         # the usual fine-tuning set-up
    modes = [m.training for m in model.modules()]
    x = torch.randn(4, 3, 32, 32)
    with attach(model, example=x[:1]) as hooks:
        fit(hooks, x, steps=2, progress=False)
    assert [m.training for m in model.modules()] == modes
    stats = model.bn1.running_mean.clone()
    model(x)                                  # a training step's forward: frozen BNs must not update
    assert torch.equal(model.bn1.running_mean, stats)


def test_mobileone_s0_random_subnetwork_with_closed_branches_materialises_exactly():
    model = timm.create_model("mobileone_s0", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with attach(model, example=x[:1]) as hooks:
        assert hooks.sites.refused == {"filters": {}, "gates": {}}
    sub = random_subnetwork(model, x[:1], seed=0)
    assert sub.removed_gates  # some branches are closed, so the in-place `out +=` meets a pass-through
    small, report = materialize(sub, model, x)
    assert report.max_abs_diff <= report.tolerance


def test_segmentation_dict_output_needs_output_out_then_fits_per_pixel():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"a dict with keys \['out'\]: pass output=<key>, e.g. output='out'"):
        attach(model, example=x[:1])
    with attach(model, example=x[:1], output="out") as hooks:
        sub = fit(hooks, x, steps=2, progress=False)
        hooks.load_state(sub.scores, sub.gate_logits)
        with torch.no_grad(), hooks.using("hard"):
            q = F.log_softmax(model(x)["out"].double(), 1)
    with torch.no_grad():
        p = F.log_softmax(model(x)["out"].double(), 1)
    assert sub.fidelity["positions"] == 2 * 64 * 64
    assert sub.fidelity["kl"] == pytest.approx(float((p.exp() * (p - q)).sum(1).mean()), abs=1e-5)


def test_features_only_backbone_lists_its_outputs():
    model = timm.create_model("resnet18", features_only=True, out_indices=(2, 3)).eval()
    with pytest.raises(ValueError, match=r"a list of 2 items \[\(1, 128, 4, 4\), \(1, 256, 2, 2\)\]: pass output=<index>"):
        attach(model, example=torch.randn(1, 3, 32, 32))


_TWO_INPUT = textwrap.dedent('''
    import torch
    from torch import nn

    class TwoInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.meta, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(4, 8), nn.Linear(16, 5)

        def forward(self, x, meta):
            return self.fc(torch.cat([self.conv(x).mean((2, 3)), self.meta(meta)], 1))

    def build(pretrained=False, num_classes=5):
        return TwoInput()
''')


def test_cli_prints_one_error_line_and_the_traceback_only_with_debug(tmp_path, monkeypatch):
    (tmp_path / "hc_two_input.py").write_text(_TWO_INPUT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hc_two_input", raising=False)
    result = CliRunner().invoke(main, ["inspect", "hc_two_input:build", "--image-size", "16"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: TwoInput.forward failed on an input of shape (1, 3, 16, 16)")
    debug = CliRunner().invoke(main, ["--debug", "inspect", "hc_two_input:build", "--image-size", "16"])
    assert debug.exit_code != 0 and isinstance(debug.exception, ValueError)


def test_cli_inspect_output_selects_a_tuple_item(tmp_path, monkeypatch):
    (tmp_path / "hc_pair.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Pair(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)

            def forward(self, x):
                f = self.conv(x).mean((2, 3))
                return self.fc(f), f

        def build(pretrained=False, num_classes=5):
            return Pair()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    refused = CliRunner().invoke(main, ["inspect", "hc_pair:build", "--image-size", "16"])
    assert refused.exit_code == 1 and "pass output=<index>, e.g. output=0 (CLI --output 0)" in refused.output
    result = CliRunner().invoke(main, ["inspect", "hc_pair:build", "--image-size", "16", "--output", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert '"select": 0' in result.output and '"classifier": "fc"' in result.output


def test_token_fit_leaves_the_callers_rng_state_alone():
    from hookchains.tokens.fit import fit_tokens
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    state = torch.random.get_rng_state()
    fit_tokens(vit, images, steps=2, progress=False)
    assert torch.equal(state, torch.random.get_rng_state())
