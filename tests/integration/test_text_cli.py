"""The text CLI end to end on a small random BERT saved with its own tokenizer (no download):
``inspect hf:PATH``, ``extract --text-data``, and the one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from hookchains.cli.main import main

transformers = pytest.importorskip("transformers", reason="the text extra is not installed (pip install hookchains[text])")

WORDS = "the a goal match team ran won bake sauce bread oven salt rain snow wind cold sun".split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(str(vocab))  # positional: vocab_file in 4.x, vocab in 5.x
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     vocab_size=len(WORDS) + 5, max_position_embeddings=32, architectures=["BertModel"])
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_data(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sport.txt").write_text("the team won the match\na goal\nthe team ran\n")
    (tmp_path / "data" / "food.txt").write_text("bake the bread\nsalt the sauce\nthe oven\n")
    (tmp_path / "data" / "weather.txt").write_text("rain and snow\ncold wind\nthe sun\n")
    return tmp_path / "data"


def test_inspect_lists_heads_neurons_and_layers(bert_dir):
    result = CliRunner().invoke(main, ["inspect", f"hf:{bert_dir}", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["text_totals"]["heads"] == 8 and data["text_totals"]["neurons"] == 96 and data["text_totals"]["layers"] == 2
    assert data["kind"] == "embedding" and not data["refused"]["filters"]
    text = CliRunner().invoke(main, ["inspect", f"hf:{bert_dir}"]).output
    assert "2 layers, 8 attention heads, 96 MLP neurons" in text


def test_extract_writes_an_exact_sliced_run(bert_dir, text_data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{bert_dir}", "--text-data", str(text_data),
                                       "--classes", "sport,food", "--out", str(out), "--steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["physical"]["max_abs_diff"] <= data["physical"]["tolerance"]
    assert data["counts"]["filters_total"] == 8 + 96
    task = json.loads((out / "text_task.json").read_text())
    assert task["classes"] == ["sport", "food"] and len(task["texts"]) == 6
    assert {"subnetwork.json", "scores.safetensors", "pruned.safetensors", "materialize.json", "manifest.json"} <= {
        p.name for p in out.iterdir()}


@pytest.mark.parametrize("case, message", [
    ("unknown", "unknown class 'cars'"),
    ("tokenizer", "no tokenizer in"),
    ("nodata", "needs --text-data"),
])
def test_text_errors_are_one_line(bert_dir, text_data, tmp_path, case, message):
    model = f"hf:{bert_dir}"
    args = ["extract", "--model", model, "--text-data", str(text_data), "--classes", "sport,cars", "--out", str(tmp_path / "r")]
    if case == "tokenizer":
        bare = tmp_path / "bare"
        transformers.BertModel.from_pretrained(bert_dir).save_pretrained(bare)
        args = ["extract", "--model", f"hf:{bare}", "--text-data", str(text_data), "--out", str(tmp_path / "r")]
    elif case == "nodata":
        args = ["extract", "--model", model, "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert message in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output


def test_the_report_lists_layers_and_the_words_of_kept_neurons(bert_dir, text_data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{bert_dir}", "--text-data", str(text_data),
                                       "--out", str(out), "--steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "Kept attention heads (indices) and MLP neurons per layer" in page and "<td>L2</td>" in page
    words = [w for w in WORDS if f'"words":[["{w}",' in page]  # a kept neuron's panel (the explorer's data)
    assert words, "no task word shown for the kept neurons"


def test_inspect_reads_an_hf_image_model_and_extract_refuses_it_text(tmp_path, text_data):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                    image_size=16, patch_size=4, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    result = CliRunner().invoke(main, ["inspect", f"hf:{tmp_path / 'vit'}", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "image-classifier" and data["text_totals"]["heads"] == 8 and data["text_totals"]["neurons"] == 80
    refused = CliRunner().invoke(main, ["extract", "--model", f"hf:{tmp_path / 'vit'}", "--text-data", str(text_data),
                                        "--out", str(tmp_path / "r")])
    assert refused.exit_code == 1 and "is an image model" in refused.output


def test_image_commands_refuse_a_text_run_in_one_line(bert_dir, text_data, tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["extract", "--model", f"hf:{bert_dir}", "--text-data", str(text_data),
                                     "--out", str(out), "--steps", "1", "--quiet"]).exit_code == 0
    result = CliRunner().invoke(main, ["render", str(out)])
    assert result.exit_code == 1 and "is a text run" in result.output and result.output.count("\n") == 1


def test_a_classification_head_keeps_its_logits(bert_dir, text_data, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "clf"
    head = transformers.BertForSequenceClassification(transformers.BertConfig.from_pretrained(bert_dir, num_labels=3))
    head.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(bert_dir).save_pretrained(folder)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{folder}", "--text-data", str(text_data),
                                       "--out", str(out), "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert json.loads((out / "text_task.json").read_text())["kind"] == "classifier"
    assert data["physical"]["max_abs_diff"] <= data["physical"]["tolerance"] and data["fidelity"]["images"] == 9
