"""Three things once all called ``mode`` have their own names (issue 10): the hooks' ``masking``, a run's
``sites`` (filters or tokens); the old keywords and ``--mode`` still work for one release and say so."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from hookchains.cli.main import main
from hookchains.core.attach import MASKINGS, MODES, attach
from hookchains.core.fit import logits_of
from hookchains.core.recipes import Ste
from hookchains.workflow.extract import EXTRACT_MODES, EXTRACT_SITES, extraction_mode, fit_config, resolve_sites


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


def test_hooks_take_masking_and_the_old_mode_keyword_with_a_warning():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    with attach(model, example=x[:1]) as hooks:
        with torch.no_grad():
            hooks.scores["0"][:2] = 0.0
        hard = logits_of(hooks, x, masking="hard")
        with pytest.warns(DeprecationWarning, match=r"logits_of\(mode=...\) is deprecated: use masking="):
            assert torch.equal(logits_of(hooks, x, mode="hard"), hard)
        with pytest.warns(DeprecationWarning, match="use masking="), hooks.using(mode="off"):
            assert hooks.masking == "off" and torch.equal(model(x), logits_of(hooks, x, "off"))
        assert not torch.equal(hard, logits_of(hooks, x, "off"))
        with pytest.raises(TypeError, match="pass masking= only"):
            logits_of(hooks, x, mode="hard", masking="hard")
    assert MODES is MASKINGS and EXTRACT_MODES is EXTRACT_SITES


def test_a_recipe_written_with_mode_still_sets_its_masking():
    with pytest.warns(DeprecationWarning, match="OldRecipe.mode is deprecated: name it masking"):
        @dataclass
        class OldRecipe(Ste):
            mode = "soft"
    assert OldRecipe().masking == "soft" and Ste().masking == "ste"


def test_sites_choose_filters_or_tokens_and_the_old_names_warn():
    model = _net()
    assert resolve_sites(model) == "filters" and fit_config(model, "filters", steps=7).steps == 7
    with pytest.warns(DeprecationWarning, match="use resolve_sites"):
        assert extraction_mode(model, "filters") == "filters"
    with pytest.warns(DeprecationWarning, match="use sites="):
        assert fit_config(model, mode="filters", steps=7) == fit_config(model, sites="filters", steps=7)
    with pytest.raises(ValueError, match="unknown sites 'pixels'"):
        resolve_sites(model, "pixels")


def test_cli_mode_option_still_works_with_a_one_line_note():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = CliRunner().invoke(main, ["extract", "--model", "resnet18", "--mode", "filters"])
        new = CliRunner().invoke(main, ["extract", "--model", "resnet18", "--sites", "filters"])
    note = "note: --mode is deprecated; it is now called --sites\n"
    assert old.output == note + new.output and "extract needs --data DIR" in new.output and old.exit_code == new.exit_code != 0
    assert "--sites [auto|filters|tokens]" in CliRunner().invoke(main, ["extract", "--help"]).output


def test_token_hooks_take_masking_and_the_old_mode_name_with_a_warning():
    import timm

    from hookchains.tokens.hooks import TokenChains
    from hookchains.tokens.materialize import materialize_tokens
    from hookchains.tokens.result import TokenSubnetwork

    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), TokenChains(model, 2, example=x[:1]) as chains:
        chains.scores[:, 1:, 3:] = 0.0
        with chains.using("mask"):
            masked = model(x)
        with pytest.warns(DeprecationWarning, match=r"using\(mode=...\) is deprecated: use masking="):
            with chains.using(mode="mask"):
                assert torch.equal(model(x), masked) and chains.masking == "mask"
                with pytest.warns(DeprecationWarning, match="TokenChains.mode is deprecated: use TokenChains.masking"):
                    assert chains.mode == "mask"
        with pytest.warns(DeprecationWarning, match="use masking="):
            assert torch.equal(chains.key_bias(0, mode="mask"), chains.key_bias(0, "mask"))
        assert not torch.equal(masked, model(x))  # soft, outside the block
        tsub = TokenSubnetwork(chains.scores.detach().clone(), chains.sites, tau=0.5)
    with pytest.warns(DeprecationWarning, match=r"materialize_tokens\(mode=...\) is deprecated"):
        small = materialize_tokens(tsub, model, x, mode="mask")
    assert small.masking == "mask" and torch.allclose(small(x), masked, atol=1e-5)
    with pytest.warns(DeprecationWarning, match="TokenDroppedViT.mode is deprecated"):
        assert small.mode == "mask"
    with pytest.warns(DeprecationWarning, match="TokenChains.mode is deprecated"):
        chains.mode = "off"   # setting the old attribute sets the new one
    assert chains.masking == "off"
