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
    assert data["text_totals"]["token_slots"] == 2 * (1 + 4 * 4)  # class token + 4 x 4 patches, per layer
    assert "the class token never pruned" in CliRunner().invoke(main, ["inspect", f"hf:{tmp_path / 'vit'}"]).output
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


@pytest.mark.parametrize("mode, curve, parameter, values", [("filters", "kl_target=0.1,0.5", "kl_target", [0.1, 0.5]),
                                                         ("tokens", "lam=0.005,0.05", "lam", [0.005, 0.05])])
def test_curve_refits_per_value_beside_the_random_weights_control(bert_dir, text_data, tmp_path, mode, curve,
                                                                   parameter, values):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{bert_dir}", "--text-data", str(text_data),
                                       "--out", str(out), "--steps", "3", "--mode", mode, "--kl-target", "0.1",
                                       "--curve", curve, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    curve_data = json.loads((out / "curve.json").read_text())
    assert curve_data["parameter"] == parameter and curve_data["values"] == values
    assert [p[parameter] for p in curve_data["random_weights"]] == values
    real = curve_data["real"][0]  # the main fit's point (lam 0.005 is the token default), reused
    assert real["kl"] == pytest.approx(data["fidelity"]["kl"]) and real["agree"] == [data["fidelity"]["agree"], 9]
    if mode == "filters":
        assert real["heads"][1] == 8 and real["neurons"][1] == 96 and real["layers"][1] == 2
        assert sum(real[k][0] for k in ("heads", "neurons")) == data["counts"]["filters_kept"]
    else:
        assert real["slots"][0] == pytest.approx(data["counts"]["slots_kept_mean"])
    assert curve_data["output_spread"]["real"] != curve_data["output_spread"]["random_weights"]
    assert data["summary"][-3].startswith("size-fidelity trade-off (one fit per " + parameter)
    assert data["summary"][-1].startswith(f"  {parameter} {values[1]:g}:")
    assert "curve.json" in json.loads((out / "manifest.json").read_text())["files"]


def test_a_bad_curve_list_is_one_line(bert_dir, text_data, tmp_path):
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{bert_dir}", "--text-data", str(text_data),
                                       "--out", str(tmp_path / "r"), "--curve", "tau=0.1,0.2"])
    assert result.exit_code == 1 and "is not [kl_target=|lam=] and a list of positive values" in result.output
    assert result.output.count("\n") == 1


def test_a_classification_head_drops_tokens_end_to_end(bert_dir, text_data, tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "clf"
    transformers.BertForSequenceClassification(transformers.BertConfig.from_pretrained(bert_dir, num_labels=3)
                                               ).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(bert_dir).save_pretrained(folder)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["extract", "--model", f"hf:{folder}", "--text-data", str(text_data),
                                       "--out", str(out), "--mode", "tokens", "--steps", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert json.loads((out / "text_task.json").read_text())["kind"] == "classifier"
    assert data["fidelity"]["images"] == 9 and "max abs diff" in data["summary"][-1]
    assert (out / "report.html").is_file()


def test_the_text_defaults_are_the_cores_preset_for_transformers(bert_dir, text_data, tmp_path):
    from hookchains.core.fit import preset_for
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["extract", "--model", f"hf:{bert_dir}", "--text-data", str(text_data),
                                     "--out", str(out), "--steps", "1", "--quiet"]).exit_code == 0
    config = json.loads((out / "subnetwork.json").read_text())["config"]
    preset = preset_for("transformers")
    assert (config["lr"], config["lam_gate"], config["lam"]) == (preset.lr, preset.lam_gate, preset.lam) == (0.02, 0.05, 0.005)


def test_text_commands_run_one_thread_unless_omp_is_set_and_restore_the_count(monkeypatch):
    from hookchains.cli.text import text_threads
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        with text_threads() as used:
            assert used == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        with text_threads() as used:
            assert used == 2
    finally:
        torch.set_num_threads(caller)


def test_extract_with_data_refuses_an_hf_text_model(tmp_path, bert_dir, text_data):
    refused = CliRunner().invoke(main, ["extract", "--model", f"hf:{bert_dir}", "--data", str(text_data),
                                        "--classes", "sport,food"])
    last = refused.output.splitlines()[-1]
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert last.startswith("Error:") and "is a text model (embedding), not an image classifier: give text with" in last
