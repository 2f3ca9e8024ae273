"""Token sites of a Hugging Face BERT-like encoder (small random config, no download): the same semantics as
the ViT token path -- cumulative per-sentence token pruning, the first token never pruned, padding never kept --
and the token-dropping module exact against the thresholded network."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from hookchains.cli.main import main
from hookchains.core.objectives import OutputLogits, ZeroShotClassifier, class_prototypes
from hookchains.tokens.fit import fit_tokens
from hookchains.tokens.hooks import TokenChains, check_token_model
from hookchains.tokens.materialize import materialize_tokens
from hookchains.tokens.result import TokenSubnetwork

transformers = pytest.importorskip("transformers", reason="the text extra is not installed (pip install hookchains[text])")

LAYERS, LENGTH = 3, 8


def _bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48, vocab_size=60,
        max_position_embeddings=32)).eval()


def _inputs():
    ids = torch.randint(1, 60, (6, LENGTH), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def _zero_shot(bert, x):
    return ZeroShotClassifier(bert, class_prototypes(bert, [{k: v[:3] for k, v in x.items()},
                                                            {k: v[3:] for k, v in x.items()}])).eval()


def _sites(model, x):
    with TokenChains(model, 6, example={k: v[:1] for k, v in x.items()}) as chains:
        return chains.sites


def _random_result(model, x, seed=0):
    """Scores that prune a good share of the real tokens, first token 1, padding 0."""
    valid = x["attention_mask"].bool()
    scores = torch.rand(6, LAYERS, LENGTH, generator=torch.Generator().manual_seed(seed)) * 1.2
    scores[..., 0] = 1.0
    return TokenSubnetwork(scores * valid[:, None], _sites(model, x), tau=0.3, valid=valid)


@pytest.mark.parametrize("masking", ["hard", "mask"])
def test_dropped_tokens_equal_the_thresholded_network(masking):
    x = _inputs()
    model = _zero_shot(_bert(), x)
    tsub = _random_result(model, x)
    assert 0 < int(tsub.masks.sum()) < int(x["attention_mask"].sum()) * LAYERS  # something pruned, something kept
    small = materialize_tokens(tsub, model, x, masking=masking)  # raises MaterializeError unless exact
    assert small.max_abs_diff <= 1e-4
    assert small.tokens_per_block().tolist() == tsub.masks.sum(2).tolist()  # the layers really see fewer tokens


def test_tokens_pruned_from_the_first_layer_equal_padding_them():
    """Computed another way: a token pruned before layer 1 is, in the binary network, exactly a padded
    token (masked as a key everywhere and left out of the mean pooling)."""
    x = _inputs()
    model = _zero_shot(_bert(), x)
    keep = x["attention_mask"].bool().clone()
    keep[:, 2] = False
    keep[1, 4] = False
    scores = keep[:, None, :].expand(6, LAYERS, LENGTH).float()
    tsub = TokenSubnetwork(scores, _sites(model, x), tau=0.5, valid=x["attention_mask"].bool())
    small = materialize_tokens(tsub, model, x, masking="mask")
    with torch.no_grad():
        padded = model(input_ids=x["input_ids"], attention_mask=keep.long())
        dropped = small(x)
    assert torch.allclose(dropped, padded, atol=1e-4)


def test_first_token_never_pruned_padding_never_kept_nor_counted():
    x = _inputs()
    model = _zero_shot(_bert(), x)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    # 12 steps, fewer than min_steps: the fit returns its last network, whatever its fidelity
    result = fit_tokens(model, x, steps=12, lr=0.2, lam=0.5, progress=False, seed=0)
    masks, valid = result.masks, x["attention_mask"].bool()
    assert masks[:, :, 0].all()                                  # [CLS] kept everywhere
    assert not (masks & ~valid[:, None, :]).any()                # padding never kept
    assert int(masks.sum()) < int(valid.sum()) * LAYERS          # the L1 term pruned something
    assert result.counts()["slots_total"] == pytest.approx(float(valid.sum()) * LAYERS / 6)
    assert (masks[:, 1:] <= masks[:, :-1]).all()                 # cumulative: never re-admitted later
    assert model.model.config._attn_implementation == "sdpa"     # the eager switch of masking ste is undone
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_ste_forward_is_the_hard_network_and_off_is_the_original():
    x = _inputs()
    model = _zero_shot(_bert(), x)
    with torch.no_grad():
        original = model(**x)
    scores = _random_result(model, x).scores
    with TokenChains(model, 6, example={k: v[:1] for k, v in x.items()}, valid=x["attention_mask"]) as chains:
        chains.load_scores(scores)
        with torch.no_grad():
            outs = {}
            for masking in ("off", "hard", "ste"):
                with chains.using(masking):
                    outs[masking] = model(**x)
    assert torch.equal(outs["off"], original)
    assert torch.allclose(outs["ste"], outs["hard"], atol=1e-5) and not torch.allclose(outs["hard"], original, atol=1e-3)


def test_a_classification_head_drops_tokens_exactly():
    torch.manual_seed(0)
    head = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=48, vocab_size=60,
        max_position_embeddings=32, num_labels=3)).eval()
    x = _inputs()
    model = OutputLogits(head).eval()
    materialize_tokens(_random_result(model, x, seed=3), model, x)


def test_a_causal_lm_is_refused_in_one_line():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=60,
                                                                 n_positions=32)).eval()
    with pytest.raises(ValueError, match="causal LM") as info:
        check_token_model(OutputLogits(gpt2, "last"))
    assert "\n" not in str(info.value)


WORDS = "the a goal match team ran won bake sauce bread oven salt rain snow wind cold sun".split()


def test_cli_extract_mode_tokens_writes_an_exact_run_with_the_token_grid(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=len(WORDS) + 5,
        max_position_embeddings=32, architectures=["BertModel"])).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "data"
    data.mkdir()
    (data / "sport.txt").write_text("the team won the match\na goal\n")
    (data / "food.txt").write_text("bake the bread\nsalt the sauce\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{folder}", "--text-data", str(data), "--sites",
                                       "tokens", "--out", str(out), "--steps", "4", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])["summary"]
    assert "token slots per sentence" in summary[0] and "max abs diff" in summary[-1]
    tsub = TokenSubnetwork.load(out)
    assert tsub.valid.sum(1).tolist() == [5, 5, 7, 4]            # [CLS] + words + [SEP]; padding excluded
    page = (out / "report.html").read_text()
    assert page.count("[CLS] draws on (Eq. 10)") == 4 and "bread" in page and "Sentence 1: bake the bread" in page


def test_attribution_of_the_unpruned_network_is_eq10_over_transformers_own_attentions():
    from hookchains.tokens.attribution import rollout, text_token_attribution
    x = _inputs()
    bert = _bert()
    model = _zero_shot(bert, x)
    valid = x["attention_mask"].bool()
    full = TokenSubnetwork(valid[:, None, :].expand(6, LAYERS, LENGTH).float(), _sites(model, x), tau=0.5, valid=valid)
    got = text_token_attribution(model, x, full)
    bert.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = torch.stack([a.mean(1) for a in bert(**x, output_attentions=True).attentions], 1)
    bert.config._attn_implementation = "sdpa"
    expected = rollout(attentions, valid[:, None, :].expand(6, LAYERS, LENGTH))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got[:, -1, 0].sum(-1), torch.ones(6), atol=1e-5)  # a distribution over the words
