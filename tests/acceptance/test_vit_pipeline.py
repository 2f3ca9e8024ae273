"""ViT token chains end to end (paper section 4.5, Fig. 7): CLI extract -> run folder -> load -> report.

Random weights (no ImageNet ViT weights offline): these tests check structure and exactness, never
fidelity. timm's random initialisation gives nearly constant logits, so any fit would prune every
token; the checkpoint used here scales the head (x30) and the qkv weights (x5) so the output depends
on the tokens and a few steps keep a mix (measured: 100-800 of 2364 slots per image), which is what
makes the equality checks below meaningful.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import hookchains
from hookchains.assets import demo_photos
from hookchains.cli.main import main
from hookchains.core.io import read_json, write_json, write_tensors
from hookchains.inputs.data import augmented_views
from hookchains.inputs.models import preprocessing
from hookchains.tokens.hooks import TokenChains
from hookchains.tokens.materialize import TokenDroppedViT
from hookchains.viz.explorer import script_hash
from hookchains.workflow.runs import TOKEN_LOGITS, load_run

MODEL = "deit_tiny_patch16_224"
CLASSES = {"Egyptian cat": "cat", "espresso": "espresso"}
VIEWS = 3  # per class
# 8 steps, fewer than min_steps: the fit returns its last network, whatever its fidelity; these tests are
# about structure and exactness, not fidelity
FIT = ["--steps", "8", "--lr", "0.15", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Tuple[Path, Path]:
    """(checkpoint of a seeded random DeiT-tiny, ImageFolder of augmented views of the demo photos)."""
    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = timm.create_model(MODEL).eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)
        for block in model.blocks:
            block.attn.qkv.weight.mul_(5.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "deit_tiny_random.safetensors")
    views = augmented_views({name: demo_photos()[name] for name in CLASSES}, VIEWS, preprocessing(model))
    for i, (picture, label) in enumerate(zip(views.raw, views.labels.tolist())):
        folder = root / "data" / list(CLASSES.values())[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{i}.png")
    return root / "deit_tiny_random.safetensors", root / "data"


@pytest.fixture(scope="module")
def run_dir(inputs) -> Path:
    checkpoint, data = inputs
    out = data.parent / "run"
    result = _invoke("extract", "--model", MODEL, "--checkpoint", checkpoint, "--data", data, "--classes",
                     "cat,espresso", "--per-class", VIEWS, "--out", out, *FIT)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # stderr: warnings, if any
    return out


def test_extract_writes_a_token_run_folder(run_dir):
    files = {p.name for p in run_dir.iterdir()}
    token_files = {"tokens.json", "token_scores.safetensors", "model.json", "task.safetensors", TOKEN_LOGITS}
    assert token_files | {"manifest.json", "summary.txt", "report.html"} == files
    assert set(read_json(run_dir / "manifest.json")["files"]) == token_files
    assert not (run_dir.parent / f".{run_dir.name}.partial").exists()
    summary = (run_dir / "summary.txt").read_text()
    assert re.fullmatch(r"keeps \d+/2364 token slots per image .*; top-1 agreement \d/6; KL \d+\.\d+; .*\n", summary)
    run = load_run(run_dir)
    assert run.is_token_run and tuple(run.sub.scores.shape) == (2 * VIEWS, 12, 197)
    assert run.task.class_names == ["cat", "espresso"] and run.sub.model_ref["spec"] == MODEL
    kept = run.sub.counts()["slots_kept"]
    assert all(12 < k < 2364 for k in kept), kept  # some patches pruned, some kept: the checks below bite


def test_loaded_module_drops_tokens_and_reproduces_the_masked_model(run_dir):
    module = hookchains.load(run_dir)
    run = load_run(run_dir)
    assert isinstance(module, TokenDroppedViT)
    lengths = module.tokens_per_block()
    assert lengths.shape == (2 * VIEWS, 12) and int(lengths.min()) < 197 and bool((lengths[:, 1:] <= lengths[:, :-1]).all())
    base = run.model_ref.build()
    with torch.no_grad():
        full = base(run.images)
        with TokenChains(base, len(run.task), tau=run.sub.tau, sites=run.sub.sites) as chains:
            chains.load_scores(run.sub.scores)
            with chains.using("hard"):
                masked = base(run.images)
        dropped = module(run.images)
    assert (masked - full).abs().max() > 1e-2  # pruning changes the outputs ...
    torch.testing.assert_close(dropped, masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))  # ... identically


def test_load_refuses_logits_from_another_model(run_dir, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for path in run_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    write_tensors(copy / TOKEN_LOGITS, {"logits": torch.zeros(2 * VIEWS, 1000)})  # as if from another model
    digest = hashlib.sha256((copy / TOKEN_LOGITS).read_bytes()).hexdigest()
    manifest = read_json(copy / "manifest.json")
    write_json(copy / "manifest.json", {**manifest, "files": {**manifest["files"], TOKEN_LOGITS: digest}})
    with pytest.raises(ValueError, match="differs from token_logits.safetensors"):
        hookchains.load(copy)
    (copy / "tokens.json").write_text((copy / "tokens.json").read_text().replace('"tau": 0.1', '"tau": 0.2'))
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_run(copy)


def _explorer(page: str) -> Dict:
    """The explorer's data (its JSON element), with every picture decoded."""
    start = page.index('<script type="application/json" id="explorer-data">')
    data = json.loads(page[page.index(">", start) + 1:page.index("</script>", start)])
    data["decoded"] = {key: Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
                       for key, uri in data["pics"].items()}
    return data


def test_report_shows_fig7_per_image_and_keeps_the_report_guarantees(run_dir):
    result = _invoke("report", run_dir)
    assert result.exit_code == 0 and result.stdout.strip() == str(run_dir / "report.html")  # stderr: stages
    page = (run_dir / "report.html").read_text()
    run = load_run(run_dir)
    csp = re.search(r'Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert csp.startswith("default-src 'none'; img-src data:;") and f"script-src {script_hash()}" in csp
    assert page.count("<script") == 2 and not re.findall(r'(?:src|href)="(?!data:)', page)  # nothing fetched
    data = _explorer(page)
    encoded = list(data["pics"].values())
    assert len(encoded) == len(set(encoded))  # each picture stored once
    assert [h for h in re.findall(r"<(h[12])[^>]*>([^<]+)</h[12]>", page)] == [
        ("h1", "NeuroChains explorer: token run"), ("h2", "Details"), ("h2", "Token sub-network"),
        ("h2", "Task images")]  # the side panel, then the sections below the graph
    assert len(data["images"]) == len(run.task)  # Fig. 7 for every image
    assert all(im["caption"].startswith(f"Image {i + 1}: true {run.task.class_names[int(run.task.labels[i])]}, "
                                        "predicted ") for i, im in enumerate(data["images"]))
    counts = run.sub.counts()
    assert data["title"].startswith(f"{counts['slots_kept_mean']:.1f}/2364 ") and "Top-1 agreement" in page
    assert "checkpoint deit_tiny_random.safetensors" in page
    _check_fig7_rows(data, run)


def _check_fig7_rows(data: Dict, run) -> None:
    """Per image: kept patches match the masks, 12 class-token maps, patch-token maps where kept; per
    cell: the tokens its block keeps."""
    masks = run.sub.masks
    for i, image in enumerate(data["images"]):
        kept_row, class_row, patch_row = image["rows"]
        per_block = masks[i, :, 1:].sum(1).tolist()
        [(_, key, alt)] = kept_row["pics"]
        assert alt.startswith(f"Kept patches (red squares) per block on image {i + 1};")
        assert alt.endswith(", ".join(f"B{b + 1} {n}" for b, n in enumerate(per_block)))
        sheet = data["decoded"][key]
        rgb = np.asarray(sheet).astype(int)
        red = int(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())
        assert sheet.width > 12 * 80 and red > sum(per_block)  # every kept patch outlined in red
        assert [p[2] for p in class_row["pics"]] == [f"Class-token attribution heatmap, block B{b}, image {i + 1}"
                                                     for b in range(1, 13)]
        token = int(re.search(r"B1_T(\d+)$", patch_row["pics"][0][0]).group(1))
        assert token >= 1 and bool(masks[i, 0, token])
        assert [p[0] for p in patch_row["pics"]] == [f"B{b + 1}_T{token}" for b in range(12)]
        assert [p[1] is not None for p in patch_row["pics"]] == masks[i, :, token].tolist()
    cells = {n["id"]: n for n in data["nodes"]}
    for i in range(len(data["images"])):
        for b in range(12):
            assert dict(cells[f"t{i}:{b}"]["facts"])["Tokens kept"] == f"{int(masks[i, b, 1:].sum())}/196"


def test_cli_refuses_what_token_runs_do_not_have(run_dir, inputs):
    for command in (["render", run_dir], ["export", run_dir]):
        result = CliRunner().invoke(main, [str(a) for a in command])
        assert result.exit_code == 1 and "token run" in result.output and "Traceback" not in result.output
    out = inputs[1].parent / "cnn-tokens"
    result = CliRunner().invoke(main, ["extract", "--model", "hookchains:mobilenet_v2", "--data", str(inputs[1]),
                                       "--classes", "cat,espresso", "--per-class", "1", "--out", str(out),
                                       "--mode", "tokens", "--quiet"])
    assert result.exit_code == 1 and "is not a timm ViT/DeiT" in result.output and not out.exists()


def test_inspect_deit_small_shows_table_1_counts():
    result = _invoke("inspect", "deit_small_patch16_224")
    assert result.exit_code == 0
    totals = result.output.strip().splitlines()[-1]
    assert "token slots 2,364" in totals and "MHA params 7,096,320" in totals and "FFN params 14,178,816" in totals
