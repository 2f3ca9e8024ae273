"""Hugging Face transformers through hooks only: small random-config BERT, GPT-2 and HF ViT (no download).

Checks the adapter's sites against the configs, the exactness facts (round trip, zeroed head = head
removed by hand, closed gate = layer skipped), a short real fit, and the sliced module against the
thresholded hooked network."""
from __future__ import annotations

import copy

import pytest
import torch

import hookchains
from hookchains.core.objectives import OutputLogits, ZeroShotClassifier, class_prototypes
from hookchains.core.slicing import materialize_transformer, parameter_count
from hookchains.core.testing import random_subnetwork

transformers = pytest.importorskip("transformers", reason="the text extra is not installed (pip install hookchains[text])")

LAYERS, HEADS, HIDDEN, FFN = 3, 4, 32, 48


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        vocab_size=60, max_position_embeddings=32)).eval()


def _tokens(n=6, length=7):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 60, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # one padded sentence
    return {"input_ids": ids, "attention_mask": mask}


def _zero_shot(bert, x):
    return ZeroShotClassifier(bert, class_prototypes(bert, [{k: v[:3] for k, v in x.items()},
                                                            {k: v[3:] for k, v in x.items()}])).eval()


def _gpt2():
    torch.manual_seed(0)
    return OutputLogits(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, vocab_size=60, n_positions=32,
        bos_token_id=0, eos_token_id=0)).eval(), "last")


def _vit():
    torch.manual_seed(0)
    return OutputLogits(transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
        image_size=16, patch_size=4, num_labels=3)).eval())


def _models():
    x = _tokens()
    pixels = {"pixel_values": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))}
    return {"bert": (_zero_shot(_bert(), x), x), "gpt2": (_gpt2(), x), "vit": (_vit(), pixels)}


def _one(x):
    return {k: v[:1] for k, v in x.items()}


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
def test_sites_match_the_config_and_round_trip_is_exact(family):
    model, x = _models()[family]
    before, state = model(**x), copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    with hookchains.attach(model, example=_one(x)) as hooks:
        sites = hooks.sites
        result = hookchains.fit(hooks, x, steps=2, progress=False)
    assert sites.adapter == "transformers" and not sites.refused["filters"] and not sites.refused["gates"]
    assert [s.channels for s in sites.filters if s.kind == "head"] == [HEADS] * LAYERS
    assert [s.channels for s in sites.filters if s.kind == "neuron"] == [FFN] * LAYERS
    assert all(s.width == HIDDEN // HEADS for s in sites.filters if s.kind == "head")
    assert [g.label for g in sites.gates] == ["L1", "L2", "L3"]
    assert result.counts()["filters_total"] == LAYERS * (HEADS + FFN)
    assert torch.equal(model(**x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_zeroed_head_equals_the_head_removed_by_hand():
    """Head 2 of layer 1 zeroed by its score equals the value projection's rows of that head at zero
    (its context is then exactly zero), computed without hookchains."""
    model, x = _models()["bert"]
    layer = model.model.encoder.layer[1].attention.self
    with hookchains.attach(model, example=_one(x)) as hooks:
        with torch.no_grad():
            hooks.scores["model.encoder.layer.1.attention.self"][2] = 0.0
        with hooks.using("hard"), torch.no_grad():
            hooked = model(**x)
    reference_model = copy.deepcopy(model)
    value = reference_model.model.encoder.layer[1].attention.self.value
    d = HIDDEN // HEADS
    with torch.no_grad():
        value.weight[2 * d:3 * d] = 0
        value.bias[2 * d:3 * d] = 0
        reference = reference_model(**x)
    assert layer.num_attention_heads == HEADS
    assert (hooked - reference).abs().max() < 1e-5
    assert (hooked - model(**x)).abs().max() > 1e-4  # the head mattered


@pytest.mark.parametrize("family", ["bert", "gpt2", "vit"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_module_equals_the_thresholded_network(family, seed):
    model, x = _models()[family]
    sub = random_subnetwork(model, _one(x), keep=0.4, seed=seed, gates_open=seed == 0)
    small, report = materialize_transformer(sub, model, x)
    assert report.max_abs_diff <= report.tolerance
    assert report.params_after == parameter_count(small) < report.params_before == parameter_count(model)
    kept = sub.kept_filters()
    open_layers = [g.name for g in sub.sites.gates if sub.gate_open(g.name)]
    assert report.layers_kept == len(open_layers)
    heads = sum(len(kept.get(s.name, ())) for s in sub.sites.filters if s.kind == "head"
                and any(s.name.startswith(p + ".") for p in open_layers))
    assert report.heads_kept == heads
    assert not any(m._forward_hooks for m in model.modules())


def test_a_layer_with_nothing_kept_holds_a_zeroed_placeholder():
    model, x = _models()["bert"]
    sub = random_subnetwork(model, _one(x), keep=0.5, gates_open=True,
                            counts={"model.encoder.layer.0.attention.self": 0, "model.encoder.layer.0.intermediate.dense": 0})
    small, report = materialize_transformer(sub, model, x)
    assert report.max_abs_diff <= report.tolerance and "2 layer part(s)" in report.notes[0]
    assert small.model.encoder.layer[0].attention.self.query.out_features == HIDDEN // HEADS


def test_closed_layer_becomes_a_pass_through():
    model, x = _models()["gpt2"]
    sub = random_subnetwork(model, _one(x), keep=1.0, gates_open=True)
    sub.scores = {k: torch.ones_like(v) for k, v in sub.scores.items()}  # every unit kept at scale 1
    sub.gate_logits["model.transformer.h.1"] = torch.tensor(-1.0)
    small, report = materialize_transformer(sub, model, x)
    assert type(small.model.transformer.h[1]).__name__ == "PassThrough" and report.layers_kept == LAYERS - 1
    skipped = copy.deepcopy(model)
    del skipped.model.transformer.h[1]
    with torch.no_grad():
        assert (small(**x) - skipped(**x)).abs().max() <= report.tolerance


def test_mean_ablation_is_refused_for_head_sites():
    model, x = _models()["bert"]
    with hookchains.attach(model, example=_one(x)) as hooks, pytest.raises(ValueError, match="attention-head"):
        hookchains.fit(hooks, x, steps=1, ablation="mean", progress=False)


def test_zero_shot_scores_are_cosines_of_mean_pooled_real_tokens_over_the_temperature():
    bert, x = _bert(), _tokens()
    model = _zero_shot(bert, x)
    with torch.no_grad():
        hidden = bert(**x).last_hidden_state
        lengths = x["attention_mask"].sum(1).tolist()
        pooled = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])  # real tokens only
        protos = torch.stack([torch.nn.functional.normalize(pooled[rows], dim=-1).mean(0) for rows in (slice(0, 3), slice(3, 6))])
        expected = torch.nn.functional.cosine_similarity(pooled[:, None], protos[None], dim=-1) / 0.05
        assert (model(**x) - expected).abs().max() < 1e-4


def test_causal_objective_reads_the_last_real_token():
    model, x = _gpt2(), _tokens()
    with torch.no_grad():
        logits = model.model(**x).logits
        last = model(**x)
    assert torch.equal(last[0], logits[0, 3]) and torch.equal(last[1], logits[1, -1])
