"""Issue 13, the first hour of a new user: what the command line says and writes (click's runner,
the real pipeline, real models), and the README's Python example run as written."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hookchains.assets import demo_photos
from hookchains.cli.main import main
from hookchains.workflow.runs import load, load_run

FAST = ["--steps", "3", "--image-size", "64", "--no-graph", "--no-report"]
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """cat/ and espresso/: 3 real crops each, plus 2 unreadable files among the cats."""
    root = tmp_path_factory.mktemp("photos")
    for cls, folder in (("Egyptian cat", "cat"), ("espresso", "espresso")):
        (root / folder).mkdir()
        with Image.open(demo_photos()[cls][0]) as img:
            w, h = img.convert("RGB").size
            for i in range(3):
                img.convert("RGB").crop((i * w // 10, 0, w - i * w // 10, h)).save(root / folder / f"{i}.png")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    return root


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error(result) -> str:
    """The one error line a refused command prints (after at most its status lines), no traceback."""
    errors = [line for line in result.output.splitlines() if not line.endswith(" ...")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("Error: ")
    return errors[0]


def _extract(photos, out, *extra, model="hookchains:mobilenet_v2", classes="cat,espresso"):
    return _run("extract", "--model", model, "--data", photos, "--classes", classes, "--per-class", 3, "--out", out,
                *extra)


@pytest.fixture(scope="module")
def skipped_run(photos, tmp_path_factory):
    """A quiet run of the embedded MobileNetV2 that had to skip both unreadable cats."""
    out = tmp_path_factory.mktemp("runs") / "skipped"
    return out, _extract(photos, out, *FAST, "--skip-bad-images", "--quiet")


def test_random_weights_and_a_constant_model_are_flagged_everywhere(photos, tmp_path):
    out = tmp_path / "random"
    made = _extract(photos, out, *FAST, "--json", "--skip-bad-images", model="torchvision:resnet18")
    assert made.exit_code == 0, made.output
    warned = [line for line in made.stderr.splitlines() if line.startswith("warning: ")]
    assert "torchvision:resnet18 has random weights" in warned[0] and "--pretrained" in warned[0]
    assert made.stderr.index("warning: ") < made.stderr.index("fit: ")  # said before the minutes of work
    data = json.loads(made.stdout)
    predictions = data["predictions"]
    run = load_run(out)
    assert predictions["images"] == len(run.task) == 6 and predictions["outputs"] == 1000
    assert data["warnings"] == [line.removeprefix("warning: ") for line in warned]
    assert predictions["constant"] == any("the same class" in w for w in data["warnings"])
    assert predictions["near_uniform"] == any("near-uniform" in w for w in data["warnings"])
    assert predictions["constant"] or predictions["near_uniform"]  # random weights: nothing to explain
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("retains ") and summary[1:] == [f"warning: {w}" for w in data["warnings"]]
    assert run.sub.task["warnings"] == data["warnings"]


def test_each_stage_reports_itself_and_the_end_says_where_the_time_went(skipped_run, photos, tmp_path):
    out = tmp_path / "loud"
    loud = _extract(photos, out, *FAST, "--skip-bad-images")
    assert loud.exit_code == 0, loud.output
    for stage in ("load: ", "fit: up to 3 steps on 6 images ...", "materialise ...", "save ..."):
        assert stage in loud.stderr
    assert "warning: " not in loud.output  # real ImageNet weights, confident: nothing to flag
    last = loud.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"time: load \d+ s, fit \d+ s, materialise \d+ s, save \d+ s(, other \d+ s)? "
                        r"\(total \d+ s\)", last), last
    quiet_out, quiet = skipped_run
    assert quiet.exit_code == 0 and quiet.stdout.strip() == str(quiet_out)  # --quiet: the location only
    assert "fit: " not in quiet.stderr and "time: " not in quiet.output


def test_skipped_images_are_one_clean_line_each_with_a_count(skipped_run, photos):
    out, result = skipped_run
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and lines[2] == "skipped 2 unreadable images; using 6"
    named = sorted(line.removeprefix(f"skipped unreadable image {photos / 'cat'}/").split(" (")[0] for line in lines[:2])
    assert named == ["broken.png", "empty.jpg"] and all(line.endswith(")") for line in lines[:2])
    assert "Warning" not in result.output and "warnings.warn" not in result.output
    assert len(load_run(out).task) == 6


def test_several_unreadable_images_are_all_named(photos, tmp_path):
    error = _error(_extract(photos, tmp_path / "r", *FAST))
    assert error.startswith("Error: cannot read 2 images: ")
    assert "broken.png" in error and "empty.jpg" in error and "--skip-bad-images" in error
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["--classes", "cat"], "names 1 class; a task needs at least 2"),
    (["--image-size", "4"], "--image-size 4 is too small for this model (made for 224 px): use at least 28 px"),
])
def test_a_task_that_cannot_mean_anything_is_refused_in_one_line(photos, tmp_path, args, message):
    options = dict(zip(args[::2], args[1::2]))
    extra = ["--image-size", options.get("--image-size", "64"), "--skip-bad-images"]
    assert message in _error(_extract(photos, tmp_path / "r", *extra, classes=options.get("--classes", "cat,espresso")))
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.partial").exists()


def test_inspect_columns_line_up_for_long_names():
    result = _run("inspect", "convnext_atto")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith(("label ", "stages.", "stem."))]
    header = rows[0]
    starts = {column: header.index(column) for column in ("kind", "gate", "module")}
    assert len(rows) > 20 and max(len(r.split()[0]) for r in rows) > 22  # longer than the old fixed width
    for row in rows[1:]:
        assert row[starts["kind"] - 1] == " " and row[starts["kind"]] != " "
        assert row[starts["module"] - 1] == " " and row[starts["module"]] != " "


def test_onnx_export_runs_a_batch_of_several_images(skipped_run):
    ort = pytest.importorskip("onnxruntime")
    out, _ = skipped_run
    help_text = _run("export", "--help").output
    assert "hookchains[onnx]" in help_text and "dynamic batch" in help_text
    result = _run("export", out, "--format", "onnx")
    assert result.exit_code == 0, result.output
    images = load_run(out).images
    session = ort.InferenceSession(result.output.strip(), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": images.numpy()})[0]
    assert logits.shape == (6, 1000)
    with torch.no_grad():
        expected = load(out)(images)
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4 * float(expected.abs().max()))


def test_demo_help_says_what_the_demo_takes():
    from hookchains.workflow.demo import DEMO_DURATION
    text = " ".join(_run("demo", "--help").output.split())
    assert "a few minutes" not in text and " ".join(DEMO_DURATION.split()) in text


def _python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python block, at 64 px, 2 views per class and 3 steps (the only edits), in a fresh folder."""
    (block,) = _python_blocks()
    edits = {"image_size=160": "image_size=64", "per_class=10": "per_class=2", "steps=150": "steps=3"}
    small = block
    for old, new in edits.items():
        assert block.count(old) == 1, old  # the README still has the knob this test turns down
        small = small.replace(old, new)
    monkeypatch.chdir(tmp_path)
    exec(compile(small, str(README), "exec"), {"__name__": "readme"})
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    comments = dict(re.findall(r"^(print\(.*\))[ \t]+# (.*)$", block, re.M))
    assert printed[0] == comments["print(prep(Image.open(photos[\"espresso\"][0])).shape)"].replace("160", "64")
    for line, code in ((printed[1], "print(result.summary())"),
                       (printed[2], 'print(f"{report.params_after:,}/{report.params_before:,} parameters")')):
        shape = re.sub(r"\d[\d,.]*", r"\\d[\\d,.]*", re.escape(comments[code].split(";")[0]))
        assert re.match(shape, line), (comments[code], line)  # the README's printed line, other numbers
    saved = tmp_path / "run"
    assert (saved / "subnetwork.json").is_file()
    with pytest.raises(FileNotFoundError, match=r"hookchains.Subnetwork.load\("):
        load(saved)  # a saved result is not a run folder, and the error says what reads it
    shutil.rmtree(saved)
