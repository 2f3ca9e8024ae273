"""Text task loading (folder of CLASS.txt files or JSONL) and its one-line errors; the install hint."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from hookchains.inputs.forward import validate_inputs
from hookchains.inputs.text import INSTALL_HINT, TextInputError, load_text_data, require_transformers


def _folder(tmp_path, **classes):
    for name, lines in classes.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_a_folder_gives_one_class_per_file_and_one_example_per_line(tmp_path):
    data = load_text_data(_folder(tmp_path, sport=["Goal!", "", "A race."], food=["Bake it."]))
    assert data.classes == ["food", "sport"] and data.texts == ["Bake it.", "Goal!", "A race."]
    assert data.labels == [0, 1, 1]


def test_jsonl_and_class_selection_keep_the_given_order(tmp_path):
    path = tmp_path / "task.jsonl"
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "z"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = load_text_data(path, ["z", "x"])
    assert (data.classes, data.texts, data.labels) == (["z", "x"], ["a", "c"], [1, 0])


@pytest.mark.parametrize("case, message", [
    ("empty", "class 'food' has no examples"),
    ("unknown", "unknown class 'cars'"),
    ("one", "at least two classes"),
    ("missing", "does not exist"),
    ("badjson", "is not a JSON object with 'text' and 'label'"),
])
def test_bad_text_data_is_one_line_naming_the_fix(tmp_path, case, message):
    path, classes = _folder(tmp_path, sport=["Goal!"], food=["  "]), None
    if case == "unknown":
        (tmp_path / "food.txt").write_text("Bake it.\n")
        classes = ["sport", "cars"]
    elif case == "one":
        (tmp_path / "food.txt").unlink()
    elif case == "missing":
        path = tmp_path / "nowhere"
    elif case == "badjson":
        path = tmp_path / "t.jsonl"
        path.write_text('{"text": "a"}\n')
    with pytest.raises(TextInputError, match=message) as error:
        load_text_data(path, classes)
    assert "\n" not in str(error.value)


def test_without_transformers_the_hint_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like to import
    with pytest.raises(TextInputError, match=r"pip install hookchains\[text\]"):
        require_transformers()
    assert "hookchains[text]" in INSTALL_HINT


def test_token_ids_are_valid_inputs_and_floats_of_two_dims_are_not():
    validate_inputs({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)}, 2)
    with pytest.raises(ValueError, match="empty batch"):
        validate_inputs(torch.ones(0, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        validate_inputs(torch.ones(2, 5))


@pytest.mark.parametrize("args", [["inspect", "hf:all-MiniLM-L6-v2"], ["demo", "--text"],
                                  ["extract", "--model", "hf:x", "--text-data", "."]])
def test_every_text_command_without_transformers_prints_the_install_hint(monkeypatch, tmp_path, args):
    from click.testing import CliRunner

    from hookchains.cli.main import main
    monkeypatch.setitem(sys.modules, "transformers", None)
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.txt").write_text("y\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output == f"Error: {INSTALL_HINT}\n"
