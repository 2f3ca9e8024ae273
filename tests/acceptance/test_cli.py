"""The command line, run as a user runs it (click's runner in-process; the real pipeline)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import hookchains
from hookchains.assets import demo_photos
from hookchains.cli.main import main
from hookchains.workflow.runs import discard_staging, is_run_folder, load, load_run, prepare_run_dir

FAST = ["--steps", "3", "--image-size", "64", "--no-graph", "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """An ImageFolder tree of real photos: cat/ and espresso/ with 3 crops each, plus an empty class."""
    root = tmp_path_factory.mktemp("data")
    photos = demo_photos()
    for cls, folder in (("Egyptian cat", "cat"), ("espresso", "espresso")):
        (root / folder).mkdir()
        img = Image.open(photos[cls][0]).convert("RGB")
        w, h = img.size
        for i in range(3):
            img.crop((i * w // 10, 0, w - i * w // 10, h)).save(root / folder / f"{i}.png")
    (root / "dog").mkdir()
    return root


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _extract(data, out, *extra):
    return _invoke("extract", "--model", "hookchains:mobilenet_v2", "--data", data, "--classes", "cat,espresso",
                   "--per-class", 2, "--out", out, *FAST, *extra)


@pytest.fixture(scope="module")
def run_dir(photo_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cat-espresso"
    result = _extract(photo_folder, out)
    assert result.exit_code == 0, result.output
    return out


def test_inspect_table_and_json():
    result = _invoke("inspect", "torchvision:resnet18")
    assert result.exit_code == 0
    assert "L1B1C1" in result.output and "conv filters 4,800" in result.output
    data = json.loads(_invoke("inspect", "hookchains:mobilenet_v2", "--json").output)
    assert data["totals"]["conv_filters"] == 17056 and data["totals"]["gate_sites"] == 10


def test_unknown_model_suggests_close_matches():
    result = CliRunner().invoke(main, ["inspect", "resnt18"])
    assert result.exit_code == 1
    assert "resnet18" in result.output and "Traceback" not in result.output


def test_extract_writes_a_complete_run_folder(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"subnetwork.json", "scores.safetensors", "model.json", "task.safetensors", "pruned.safetensors",
            "manifest.json", "summary.txt"} <= names
    assert not (run_dir.parent / f".{run_dir.name}.partial").exists() and is_run_folder(run_dir)
    summary = (run_dir / "summary.txt").read_text()
    assert summary.startswith("retains ") and "/17056 filters" in summary and "top-1 agreement" in summary
    run = load_run(run_dir)
    assert run.task.class_names == ["cat", "espresso"] and len(run.task) == 4


def test_load_rebuilds_the_pruned_module_without_pickle(run_dir):
    module = load(run_dir)
    run = load_run(run_dir)
    base = run.model_ref.build()
    with hookchains.attach(base, example=run.images[:1]) as chains, torch.no_grad():
        chains.load_state(run.sub.scores, run.sub.gate_logits)
        with chains.using("hard"):
            expected = base(run.images)
    with torch.no_grad():
        assert torch.allclose(module(run.images), expected, atol=1e-4 * float(expected.abs().max()))


def test_tampered_or_truncated_files_are_refused(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    data = (copy / "scores.safetensors").read_bytes()
    (copy / "scores.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated or modified"):
        load(copy)
    result = CliRunner().invoke(main, ["export", str(copy)])
    assert result.exit_code == 1 and "sha256" in result.output


def test_export_formats(run_dir):
    assert _invoke("export", run_dir).exit_code == 0
    ts = _invoke("export", run_dir, "--format", "torchscript")
    assert ts.exit_code == 0
    scripted = torch.jit.load(ts.output.strip())
    images = load_run(run_dir).images
    with torch.no_grad():
        assert torch.allclose(scripted(images), load(run_dir)(images), atol=1e-5)
    refused = CliRunner().invoke(main, ["export", str(run_dir), "--format", "pt"])
    assert refused.exit_code == 1 and "--unsafe-pickle" in refused.output


def test_existing_run_folder_is_refused_without_overwrite(photo_folder, run_dir):
    before = (run_dir / "manifest.json").read_bytes()
    result = CliRunner().invoke(main, ["extract", "--model", "hookchains:mobilenet_v2", "--data", str(photo_folder),
                                       "--classes", "cat,espresso", "--per-class", "2", "--out", str(run_dir), *FAST])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (run_dir / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("classes,per_class,message", [
    ("cat,horse", 2, "cat, dog, espresso"),      # unknown class: list the classes found
    ("cat,espresso", 5, "3"),                     # fewer images than asked: say how many
])
def test_bad_data_is_one_clear_line_and_writes_nothing(photo_folder, tmp_path, classes, per_class, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["extract", "--model", "hookchains:mobilenet_v2", "--data", str(photo_folder),
                                       "--classes", classes, "--per-class", str(per_class), "--out", str(out), *FAST])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert not out.exists() and not (out.parent / ".out.partial").exists()


def test_interrupted_run_leaves_nothing_and_the_rerun_starts_clean(photo_folder, tmp_path):
    out = tmp_path / "run"
    stale = prepare_run_dir(out, overwrite=False)  # what a killed run leaves behind
    (stale / "scores.safetensors").write_bytes(b"half a file")
    assert not out.exists()
    result = _extract(photo_folder, out)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and load_run(out).sub.counts()["filters_total"] == 17056


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("victim", ["dataset", "notes", "cwd"])
def test_overwrite_never_deletes_a_folder_that_is_not_a_run(photo_folder, tmp_path, monkeypatch, victim):
    data = tmp_path / "photos"
    shutil.copytree(photo_folder, data)
    target = {"dataset": data, "notes": tmp_path / "notes", "cwd": Path(".")}[victim]
    if victim == "notes":
        target.mkdir()
        (target / "todo.txt").write_text("my notes")
    if victim == "cwd":
        monkeypatch.chdir(tmp_path)
        (tmp_path / "readme.txt").write_text("mine")
    folder = target.absolute()
    before = _tree(folder)
    result = CliRunner().invoke(main, ["extract", "--model", "hookchains:mobilenet_v2", "--data", str(data),
                                       "--classes", "cat,espresso", "--per-class", "2", "--out", str(target),
                                       "--overwrite", *FAST])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "is not a hookchains run" in result.output
    assert "PosixPath" not in result.output and len(result.output.strip().splitlines()) == 1
    assert _tree(folder) == before


def test_overwrite_replaces_an_earlier_run_only_once_the_new_one_is_complete(photo_folder, run_dir, tmp_path):
    earlier = tmp_path / "earlier"
    shutil.copytree(run_dir, earlier)
    before = _tree(earlier)
    staging = prepare_run_dir(earlier, overwrite=True)  # a new run has started...
    assert _tree(earlier) == before                      # ...and the earlier one is still whole
    discard_staging(staging)                             # the new run failed: nothing changed
    assert _tree(earlier) == before and not staging.exists()
    result = _extract(photo_folder, earlier, "--overwrite", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert is_run_folder(earlier) and load_run(earlier).sub.config["seed"] == 1


def test_a_user_folder_in_the_staging_place_is_never_removed(photo_folder, tmp_path):
    out = tmp_path / "run"
    mine = tmp_path / ".run.partial"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    result = _extract(photo_folder, out)
    assert result.exit_code == 1 and "was not made by hookchains" in result.output
    assert (mine / "keep.txt").read_text() == "mine" and not out.exists()


def test_export_and_figure_never_replace_a_file_unasked(run_dir, tmp_path):
    precious = tmp_path / "thesis.pdf"
    precious.write_bytes(b"my thesis")
    for args in (["export", run_dir, "--out", precious], ["report", run_dir, "--figure", precious]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
        assert precious.read_bytes() == b"my thesis"
    replaced = _invoke("export", run_dir, "--out", precious, "--overwrite")
    assert replaced.exit_code == 0 and precious.read_bytes() == (run_dir / "pruned.safetensors").read_bytes()


def test_sweep_refuses_a_folder_that_is_not_a_sweep(photo_folder, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.html").write_text("my page")
    result = CliRunner().invoke(main, ["sweep", "--model", "hookchains:mobilenet_v2", "--data", str(photo_folder),
                                       "--classes", "cat,espresso", "--per-class", "1", "--held-out", "0",
                                       "--tasks", "1", "--out", str(notes), "--steps", "2", "--image-size", "64",
                                       "--quiet"])
    assert result.exit_code == 1 and "is not a sweep folder" in result.output
    assert _tree(notes) == {"report.html": b"my page"}


def test_corrupt_image_is_named_and_can_be_skipped(photo_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(photo_folder, data)
    (data / "cat" / "broken.png").write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["extract", "--model", "hookchains:mobilenet_v2", "--data", str(data),
                                       "--classes", "cat,espresso", "--per-class", "3", "--out", str(tmp_path / "r"), *FAST])
    assert result.exit_code == 1 and "broken.png" in result.output and "--skip-bad-images" in result.output
    skipped = _extract(data, tmp_path / "r2", "--skip-bad-images")
    assert skipped.exit_code == 0, skipped.output


def test_run_of_randomly_initialised_model_is_not_redrawn_with_other_weights(photo_folder, tmp_path):
    out = tmp_path / "random"
    made = CliRunner().invoke(main, ["extract", "--model", "torchvision:resnet18", "--data", str(photo_folder),
                                     "--classes", "cat,espresso", "--per-class", "2", "--out", str(out), *FAST])
    assert made.exit_code == 0, made.output
    result = CliRunner().invoke(main, ["render", str(out), "--format", "dot"])
    assert result.exit_code == 1 and "randomly initialised" in result.output and "--checkpoint" in result.output
    assert not (out / "subnetwork.dot").exists()
