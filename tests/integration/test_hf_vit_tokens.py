"""An HF ViT image classifier (transformers' ``ViTForImageClassification``, tiny random config) on the image
token path: per-image token scores applied per layer through hooks, the class token never pruned, pruned
tokens excluded from later keys/values, the token-dropping module exact against the thresholded network
and against the same model run by hand on the kept tokens only."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from hookchains.core.objectives import OutputLogits
from hookchains.tokens.fit import fit_tokens
from hookchains.tokens.hooks import TokenChains, check_token_model, is_text_model
from hookchains.tokens.materialize import materialize_tokens
from hookchains.tokens.result import TokenSubnetwork

transformers = pytest.importorskip("transformers", reason="the text extra is not installed (pip install hookchains[text])")

LAYERS, IMAGES, TOKENS = 2, 4, 1 + (32 // 8) ** 2  # class token + 4 x 4 patches


def _config(**extra):
    return dict(hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                image_size=32, patch_size=8, num_labels=5, initializer_range=0.2, **extra)  # attention that matters


def _vit():
    torch.manual_seed(0)
    return OutputLogits(transformers.ViTForImageClassification(transformers.ViTConfig(**_config())).eval()).eval()


def _images():
    return torch.randn(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _sites(model, x):
    with TokenChains(model, IMAGES, example=x[:1]) as chains:
        return chains.sites


def _random_result(model, x, seed=0):
    sites = _sites(model, x)
    scores = torch.rand(IMAGES, LAYERS, sites[0].tokens, generator=torch.Generator().manual_seed(seed)) * 1.2
    scores[..., :sites[0].prefix_tokens] = 1.0
    return TokenSubnetwork(scores, sites, tau=0.3)


def _by_hand(vit, x, masks):
    """The binary sub-network computed without hookchains: before each layer keep only that layer's tokens."""
    outs = []
    with torch.no_grad():
        for n in range(x.shape[0]):
            h = vit.vit.embeddings(x[n:n + 1])
            for i, layer in enumerate(vit.vit.layers):
                h = layer(h[:, masks[n, i, :h.shape[1]]] if i == 0 else h[:, masks[n, i][masks[n, i - 1]]], None)
            outs.append(vit.classifier(vit.vit.layernorm(h)[:, 0]))
    return torch.cat(outs)


def test_sites_and_round_trip_are_exact():
    model, x = _vit(), _images()
    assert not is_text_model(model)  # images in, no padding mask
    with torch.no_grad():
        before = model(x)
    state, flags = copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]
    scores = _random_result(model, x).scores
    with TokenChains(model, IMAGES, example=x[:1]) as chains:
        assert [(s.name, s.tokens, s.prefix_tokens) for s in chains.sites] == [
            ("model.vit.layers.0", TOKENS, 1), ("model.vit.layers.1", TOKENS, 1)]
        chains.load_scores(scores)
        with torch.no_grad(), chains.using("off"):
            off = model(x)
        with torch.no_grad(), chains.using("hard"):
            hard = model(x)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(off, before) and torch.equal(after, before) and (hard - before).abs().max() > 1e-3
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags and model.model.config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("masking", ["hard", "mask"])
def test_dropped_tokens_equal_the_thresholded_network(masking):
    model, x = _vit(), _images()
    tsub = _random_result(model, x)
    assert 0 < int(tsub.masks[:, :, 1:].sum()) < IMAGES * LAYERS * (TOKENS - 1)  # some pruned, some kept
    small = materialize_tokens(tsub, model, x, masking=masking)  # raises MaterializeError unless exact
    assert small.max_abs_diff <= 1e-4
    assert small.tokens_per_block().tolist() == tsub.masks.sum(2).tolist()  # the layers really see fewer tokens


def test_the_binary_sub_network_equals_the_model_run_by_hand_on_the_kept_tokens():
    model, x = _vit(), _images()
    tsub = _random_result(model, x, seed=2)
    with torch.no_grad():
        dropped = materialize_tokens(tsub, model, x, masking="mask")(x)
    assert torch.allclose(dropped, _by_hand(model.model, x, tsub.masks), atol=1e-5)


def test_fit_keeps_the_class_token_prunes_cumulatively_and_ste_is_the_hard_network():
    model, x = _vit(), _images()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    result = fit_tokens(model, x, steps=15, lr=0.1, lam=0.005, progress=False, seed=0)
    masks = result.masks
    assert masks[:, :, 0].all() and (masks[:, 1:] <= masks[:, :-1]).all()
    assert 0 < int(masks[:, :, 1:].sum()) < IMAGES * LAYERS * (TOKENS - 1)
    assert result.counts()["slots_total"] == LAYERS * TOKENS
    with TokenChains(model, IMAGES, example=x[:1]) as chains:
        chains.load_scores(result.scores)
        with torch.no_grad():
            outs = {}
            for masking in ("hard", "ste"):
                with chains.using(masking):
                    outs[masking] = model(x)
    assert torch.allclose(outs["ste"], outs["hard"], atol=1e-5)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert model.model.config._attn_implementation == "sdpa"
    materialize_tokens(result, model, x)


def test_ste_gives_pruned_tokens_a_gradient():
    model, x = _vit(), _images()
    with TokenChains(model, IMAGES, example=x[:1]) as chains:
        with torch.no_grad():
            chains.scores[:, :, 5:] = 0.0
        with chains.using("ste"):
            model(x).square().sum().backward()
    assert chains.scores.grad[:, 0, 5:].abs().sum() > 0


def test_attribution_reads_the_hf_attentions():
    from hookchains.tokens.attribution import rollout, text_token_attribution
    model, x = _vit(), _images()
    full = TokenSubnetwork(torch.ones(IMAGES, LAYERS, TOKENS), _sites(model, x), tau=0.5)
    got = text_token_attribution(model, x, full)
    vit = model.model
    vit.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = torch.stack([a.mean(1) for a in vit(x, output_attentions=True).attentions], 1)
    vit.config._attn_implementation = "sdpa"
    assert torch.allclose(got, rollout(attentions, full.masks), atol=1e-5)


def test_deit_keeps_both_prefix_tokens_and_pooling_models_are_refused():
    torch.manual_seed(0)
    deit = OutputLogits(transformers.DeiTForImageClassification(transformers.DeiTConfig(**_config())).eval())
    x = _images()
    assert [s.prefix_tokens for s in _sites(deit, x)] == [2, 2]
    materialize_tokens(_random_result(deit, x, seed=1), deit, x)
    beit = OutputLogits(transformers.BeitForImageClassification(transformers.BeitConfig(**_config())).eval())
    with pytest.raises(ValueError, match="model_type 'beit'") as info:
        check_token_model(beit)
    assert "\n" not in str(info.value)


def test_extract_from_the_cli_on_an_image_folder(tmp_path):
    """``hookchains extract --model hf:PATH --data DIR``: images preprocessed as the saved processor does,
    a token run folder whose saved logits are the thresholded network's, the class token kept."""
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image
    from safetensors.torch import load_file

    from hookchains.cli.main import main
    from hookchains.inputs.models import hf_preprocessing_note
    from hookchains.workflow.runs import load_run

    folder, data = tmp_path / "vit", tmp_path / "data"
    _vit().model.save_pretrained(folder)
    std = (0.2, 0.25, 0.3)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.3, 0.4, 0.5],
                                               image_std=list(std))
    processor.save_pretrained(folder)
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(data / name / f"{i}.png")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{folder}", "--data", str(data), "--classes", "a,b",
                                       "--per-class", "3", "--steps", "20", "--lam", "0.3", "--lr", "0.1", "--seed",
                                       "0", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()  # the explorer: Fig. 7 rows per image (Eq. 10 from HF attentions)
    start = page.index('<script type="application/json" id="explorer-data">')
    explorer = json.loads(page[page.index(">", start) + 1:page.index("</script>", start)])
    assert len(explorer["images"]) == 6 and all(len(image["rows"]) == 3 for image in explorer["images"])
    run = load_run(out)
    tsub, images = run.sub, run.images
    assert run.is_token_run and images.shape == (6, 3, 32, 32) and run.model_ref.spec == f"hf:{folder}"
    theirs = torch.cat([processor(images=Image.open(p), return_tensors="pt")["pixel_values"] for p in run.task.paths])
    assert (images - theirs).abs().max() <= 1.01 / 255 / min(std)  # transformers' own preprocessing, to a grey level
    masks = tsub.masks
    assert masks[:, :, 0].all() and int(masks[:, :, 1:].sum()) < masks[:, :, 1:].numel()  # class token kept, some pruned
    model = OutputLogits(transformers.AutoModelForImageClassification.from_pretrained(str(folder))).eval()
    with TokenChains(model, 6, example=images[:1]) as chains, torch.no_grad():
        chains.load_scores(tsub.scores)
        with chains.using("hard"):
            masked = model(images)
    saved = load_file(str(out / "token_logits.safetensors"))["logits"]
    assert (saved - masked).abs().max() <= 1e-4 * masked.abs().max()  # the saved run is the thresholded network
    refused = CliRunner().invoke(main, ["report", str(out)])  # no silent rebuild of another model
    assert refused.exit_code == 1 and "cannot be rebuilt from its run folder yet" in refused.output.splitlines()[-1]
    assert hf_preprocessing_note(model) is None
    (folder / "preprocessor_config.json").unlink()
    assert "mean = std = 0.5" in hf_preprocessing_note(model)
