"""Sweeps: task plans, task images, kill-and-resume, batched tasks, and 2 processes under torchrun.

The sweeps run the real command in child processes (``python -m hookchains.cli.main sweep``) on the
digits CNN of ``benchmarks/digits.py`` (a brief real training) and real PNG files, one torch thread
each so every run computes the same numbers.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from benchmarks.digits import build, train, write_images  # on the path: pytest's pythonpath = ["."]
from hookchains.inputs.data import class_folders
from hookchains.inputs.models import create_model, preprocessing
from hookchains.inputs.tasks import REST, SweepTask, load_task, plan_tasks
from hookchains.workflow.runs import load_run
from hookchains.workflow.sweep import append_record, read_results

ROOT = Path(__file__).resolve().parents[2]
CLASSES = "0,1,2,3"
RUNTIME = ("seconds", "fit_seconds", "rank", "device")  # the only fields allowed to differ between runs


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory):
    """PNG digits (8 per class) and a checkpoint trained briefly on the other digits."""
    root = tmp_path_factory.mktemp("digits")
    held = write_images(root / "images", per_class=8)
    torch.manual_seed(0)
    model = build()
    train(model, [r for r in range(1797) if r not in held][::4], epochs=2, log=None)
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(root / "digits.safetensors"))
    return root


def _sweep_args(study: Path, out: Path, *extra: str):
    return ["sweep", "--model", "benchmarks.digits:build", "--checkpoint", str(study / "digits.safetensors"),
            "--data", str(study / "images"), "--classes", CLASSES, "--tasks", "4", "--per-class", "4",
            "--held-out", "2", "--steps", "25", "--baseline-steps", "5", "--robustness", "--pgd-steps", "2",
            "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(study: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hookchains.cli.main", *_sweep_args(study, out, *extra), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _comparable(records):
    return [{k: v for k, v in r.items() if k not in RUNTIME} for r in records]


@pytest.fixture(scope="module")
def straight_out(digits_study, tmp_path_factory) -> Path:
    """An uninterrupted single-process sweep: the reference every other run must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "sweep"
    _run(digits_study, out)
    return out


@pytest.fixture(scope="module")
def straight(straight_out):
    return read_results(straight_out)


def test_a_scatter_point_opens_its_task_explorer(straight_out, straight, browser):
    page = (straight_out / "report.html").read_text()
    links = re.findall(r'<a href="([^"]+)" aria-label="task ([^ ]+) ', page)
    assert [task for _, task in links] == [r["task"] for r in straight]  # a point per task
    for href, task in links:
        assert href == f"tasks/{task}/report.html"  # relative: the sweep folder can move, file:// works
        run = load_run(straight_out / "tasks" / task)  # the runs layout, checked against its manifest
        record = next(r for r in straight if r["task"] == task)
        assert run.sub.counts()["filters_kept"] == record["size"]["filters_kept"] and len(run.task) == record["images"]
    browser.get((straight_out / "report.html").as_uri())
    task = links[-1][1]
    browser.find_element(By.CSS_SELECTOR, f'.scatter a[href="tasks/{task}/report.html"]').click()
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.ready"))
    assert browser.current_url == (straight_out / "tasks" / task / "report.html").as_uri()
    assert browser.find_elements(By.CSS_SELECTOR, "#graph .node") and browser.get_log("browser") == []


def test_plan_covers_every_pair_and_extends_stably():
    names = [str(i) for i in range(10)]
    plan = plan_tasks(names, 100, seed=3)
    assert len(plan) == 45 and len({t.classes for t in plan}) == 45
    assert all(t.classes == tuple(sorted(t.classes)) and t.kind == "pairs" for t in plan)
    assert plan_tasks(names, 7, seed=3) == plan[:7]          # asking for more tasks keeps the first ones
    assert plan_tasks(names, 7, seed=4) != plan[:7]
    multi = plan_tasks(names, 5, 3)
    assert all(len(t.classes) == 3 and t.kind == "multi" for t in multi)
    rest = plan_tasks(names, 20, one_vs_rest=True)
    assert sorted(t.classes[0] for t in rest) == names and rest[0].class_names[-1] == REST
    with pytest.raises(ValueError, match="between 2 and the 10 classes"):
        plan_tasks(names, 3, 11)


def test_task_images_are_disjoint_and_rest_comes_from_other_classes(digits_study):
    model, _ = create_model("benchmarks.digits:build")
    prep, images = preprocessing(model), digits_study / "images"
    classes = class_folders(images)
    data = load_task(images, SweepTask(0, ("3", "8")), 5, 3, prep, all_classes=classes)
    assert data.images.shape[0] == 10 and data.held_images.shape[0] == 6
    assert data.labels.tolist() == [0] * 5 + [1] * 5 and data.held_labels.tolist() == [0] * 3 + [1] * 3
    fit_rows, held_rows = {x.numpy().tobytes() for x in data.images}, {x.numpy().tobytes() for x in data.held_images}
    assert not fit_rows & held_rows
    rest = load_task(images, SweepTask(1, ("3",), True), 6, 2, prep, all_classes=classes)
    assert rest.class_names == ["3", REST]
    assert set(rest.true_classes[6:]) <= set(classes) - {"3"} and len(set(rest.true_classes[6:])) > 1


def test_killed_sweep_resumes_without_losing_or_repeating_a_task(digits_study, straight, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "hookchains.cli.main", *_sweep_args(digits_study, out)]
    child = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in child.stdout:           # one line per finished task; kill right after the first
            if line.startswith("task "):
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait()
    before = (out / "results.jsonl").read_text().split("\n")[:-1]   # whole lines (a torn tail is dropped)
    assert 0 < len(before) < 4 and all(json.loads(line) for line in before)
    assert not (out / "report.html").exists()
    _run(digits_study, out)
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[:len(before)] == before                      # finished lines are kept as they were
    records = read_results(out)
    assert [r["task"] for r in records] == [f"{i:05d}" for i in range(4)]
    assert _comparable(records) == _comparable(straight)
    assert (out / "report.html").exists() and sorted(p.name for p in (out / "tasks").iterdir()) == [
        f"{i:05d}" for i in range(4)]  # no staging folder left by the kill
    assert all((out / "tasks" / f"{i:05d}" / "report.html").is_file() for i in range(4))


def test_sweep_refuses_to_resume_with_other_settings(digits_study, tmp_path):
    out = tmp_path / "sweep"
    _run(digits_study, out, "--tasks", "1", "--no-explorers")
    cmd = [sys.executable, "-m", "hookchains.cli.main", *_sweep_args(digits_study, out, "--lam", "0.02")]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "other settings (fit differ)" in done.stderr and "--out" in done.stderr


def _differences(a, b, where="records"):
    """Where ``a`` and ``b`` differ beyond float rounding: floats within 1 % relative or 1e-6 absolute (a
    Taylor importance, a product of small gradients, moves 0.4 % from the rounding; KLs move < 1e-6)."""
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-6) else [f"{where}: {a} vs {b}"]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return [d for k in a for d in _differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def test_batched_tasks_give_the_same_records(digits_study, straight, tmp_path):
    """The same records up to float rounding: a single task's fit folds its scores into the norms
    (hookchains.core.folding), batched tasks multiply the featuremaps; every count and choice is equal."""
    out = tmp_path / "sweep"
    _run(digits_study, out, "--batch-tasks", "2", "--no-explorers")  # explorers do not change records
    assert not _differences(_comparable(read_results(out)), _comparable(straight))


def test_torchrun_two_processes_share_the_tasks(digits_study, straight, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "hookchains.cli.main", *_sweep_args(digits_study, out), "--quiet", "--no-explorers"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_results(out)
    assert sorted(r["rank"] for r in records) == [0, 0, 1, 1]
    assert _comparable(records) == _comparable(straight)
    assert not list(out.glob("results.rank-*.jsonl"))         # merged into results.jsonl
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    assert (out / "report.html").exists() and not list(out.glob("tasks/*/report.html"))
    assert '<a href="#task-00000"' in (out / "report.html").read_text()  # no explorer: the point jumps to the row


@pytest.mark.parametrize("kind, extra, images, labels", [
    ("one-vs-rest", ("--one-vs-rest",), 8, ["rest"]),
    ("multi", ("--classes-per-task", "3"), 12, []),
])
def test_one_vs_rest_and_multi_class_sweeps(digits_study, tmp_path, kind, extra, images, labels):
    out = tmp_path / "sweep"
    _run(digits_study, out, "--tasks", "2", "--no-baselines", *extra)
    records = read_results(out)
    assert len(records) == 2 and {r["kind"] for r in records} == {kind}
    assert all(r["images"] == images and r["fidelity"]["images"] == images for r in records)
    saved = json.loads((out / "tasks" / records[0]["task"] / "subnetwork.json").read_text())
    assert saved["task"]["classes"][len(records[0]["classes"]):] == labels
    # ground-truth accuracy needs a label per model output: the 'rest' side has none
    assert ("accuracy_original" in records[0]["held_out"]) == (kind == "multi")


def test_a_line_torn_by_a_crash_is_ignored_and_cut_before_the_next_append(tmp_path):
    results = tmp_path / "results.jsonl"
    append_record(results, {"task": "00000", "index": 0})
    with open(results, "ab") as fh:                        # what a crash inside write() would leave
        fh.write(b'{"task": "00001", "ind')
    assert [r["task"] for r in read_results(tmp_path)] == ["00000"]
    append_record(results, {"task": "00002", "index": 2})
    assert results.read_text().splitlines() == ['{"index": 0, "task": "00000"}', '{"index": 2, "task": "00002"}']
    (tmp_path / "results.rank-1.jsonl").write_text('{"index": 0, "task": "00000", "rank": 1}\nnot json\n')
    with pytest.raises(ValueError, match="results.rank-1.jsonl line 2 is not JSON"):
        read_results(tmp_path)
