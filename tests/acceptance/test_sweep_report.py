"""The sweep summary (hookchains.viz.sweep_report): headline numbers checked by hand on synthetic records,
plots skipped where data is missing, and the HTML page opened in real headless Chromium."""
from __future__ import annotations

import base64
import math
import re
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List

import pytest
from PIL import Image

from hookchains.cli.tables import sweep_headline
from hookchains.core.io import read_json
from hookchains.viz.sweep_report import (
    PAPER,
    headline,
    plot_baselines,
    plot_faithfulness,
    plot_fidelity,
    plot_held_out,
    plot_quotients,
    plot_robustness,
    plot_sign,
    plot_size,
    write_sweep_report,
)

CHROMIUM = "/usr/bin/chromium"
META = {"model": "benchmarks.digits:build", "data": "/tmp/digits/images", "classes_per_task": 2, "seed": 0}


KLS = {0.5: [0.5] * 20, 0.8: [0.1] * 10 + [1.5] * 10, 1.5: [1.5] * 20, 2.0: [0.0] * 15 + [8.0] * 5}
"""Per-image KLs whose mean is the task's KL: per image 45/80 are <= 0.8 and 35/80 >= 1.5 (per task 2/4, 2/4)."""


def _record(i: int, kl: float, agree: int, negative: int, kept: int, **extra) -> Dict:
    """A task record of the sweep's schema with 20 images and the given fidelity and size."""
    quotients = [-0.5] * negative + [1.0] * (20 - negative)
    return {"task": f"{i:04d}", "index": i, "classes": [str(i), str(i + 1)], "kind": "pairs", "images": 20,
            "size": {"filters_kept": kept, "filters_total": 100, "layers_kept": 3, "layers_total": 6,
                     "conv_filters_kept": kept - 2, "conv_filters_total": 90, "conv_layers_kept": 2,
                     "conv_layers_total": 5, "linear_units_kept": 2, "linear_units_total": 10},
            "fidelity": {"kl": kl, "agree": agree, "images": 20, "negative_quotients": negative,
                         "quotients": quotients, "kls": KLS[kl], "outputs": 10},
            **extra}


def _baselines(magnitude: float, random: float) -> Dict:
    protocol = {"allocation": "proportional", "gates": "open", "steps": 120, "budget": 30}
    return {name: {"filters_kept": 30, "kl": kl, "kls": [kl] * 20, "protocol": {**protocol, "kind": name}}
            for name, kl in (("magnitude", magnitude), ("random", random))}


def _faith(spearman: float) -> Dict:
    return {"spearman": spearman, "spearman_untied": spearman - 0.1, "spearman_taylor": 0.3,
            "filters": ["L0_1", "L0_2", "L3_0"], "scores": [0.2, 0.5, 0.9],
            "degradation": [0.01, 0.1, 0.3], "negative_share": [0.0, 0.05, 0.2]}


def _robust(clean: float) -> Dict:
    side = {"clean": [clean, clean], "fgsm": [0.5, 0.3], "pgd": [0.1, 0.1]}
    correct = {"clean": [True, clean > 0.9], "fgsm": [True, False], "pgd": [False, False]}
    return {"eps": 0.1, "pgd_steps": 10, "original": side, "subnetwork": side,
            "transfer": {"fgsm": [0.6, 0.6], "pgd": [0.2, 0.2]},
            "correct": {"original": correct, "subnetwork": correct, "transfer": {"fgsm": [True, True], "pgd": [True, False]}}}


def _control(shared: int) -> Dict:
    return {"seed": 0, "size": {"filters_kept": 50}, "fidelity": {"kl": 0.05}, "steps_run": 80,
            "overlap": {"shared": shared, "shared_by_chance": 4.0, "jaccard": shared / 60, "real_kept_share": 0.1},
            "output_spread": {"random": 0.001, "real": 0.5 + shared / 10}}


RECORDS = [
    _record(0, 0.5, 20, 0, 10, faithfulness=_faith(0.5), robustness=_robust(1.0), baselines=_baselines(1.0, 2.0),
            held_out={"kl": 0.3, "accuracy_original": 1.0, "accuracy_subnetwork": 0.9}, random_weights=_control(2)),
    _record(1, 0.8, 19, 1, 20, faithfulness=_faith(-0.2), robustness=_robust(0.8), baselines=_baselines(0.7, 1.5),
            random_weights=_control(6)),
    _record(2, 1.5, 20, 0, 30, faithfulness=_faith(0.9), baselines=_baselines(0.1, 0.9)),
    _record(3, 2.0, 18, 3, 40),  # baselines, faithfulness, robustness and held-out evaluation switched off
]
PLOTS = [plot_size, plot_fidelity, plot_baselines, plot_faithfulness, plot_quotients, plot_sign, plot_robustness,
         plot_held_out]


def test_headline_numbers_match_a_hand_count():
    h = headline(RECORDS)
    assert h["tasks"] == 4
    size = h["size"]
    assert (size["filters_kept_mean"], size["filters_kept_min"], size["filters_kept_max"]) == (25, 10, 40)
    assert math.isclose(size["filters_kept_std"], statistics.pstdev([10, 20, 30, 40]))
    assert math.isclose(size["filters_kept_percent"], 25.0) and size["layers_kept_mean"] == 3
    fid = h["fidelity"]  # KL 0.5, 0.8, 1.5, 2.0: the marks are inclusive
    assert (fid["kl_le_0.8"], fid["kl_ge_1.5"], fid["all_agree"]) == (0.5, 0.5, 0.5)
    assert math.isclose(fid["kl_mean"], 1.2) and math.isclose(fid["negative_q_images"], 4 / 80)
    magnitude, random = h["baselines"]["magnitude"], h["baselines"]["random"]  # over the 3 tasks that ran them
    assert (magnitude["kl_le_0.8"], magnitude["kl_ge_1.5"]) == (2 / 3, 0.0) and magnitude["tasks"] == 3
    assert (random["kl_le_0.8"], random["kl_ge_1.5"]) == (0.0, 2 / 3) and random["filters_kept_mean"] == 30
    faith = h["faithfulness"]
    assert math.isclose(faith["spearman_mean"], 0.4) and faith["spearman_median"] == 0.5
    assert faith["spearman_positive"] == 2 / 3
    assert h["held_out"] == {"tasks": 1, "accuracy_original": 1.0, "accuracy_subnetwork": 0.9}
    robust = h["robustness"]
    assert robust["probability"]["original"] == pytest.approx({"clean": 0.9, "fgsm": 0.4, "pgd": 0.1})
    assert robust["probability"]["transfer"] == pytest.approx({"fgsm": 0.6, "pgd": 0.2})
    # 4 images: clean correct T,T (task 0) T,F (task 1); FGSM T,F,T,F; PGD all wrong
    assert robust["accuracy"]["original"] == {"clean": 0.75, "fgsm": 0.5, "pgd": 0.0}
    assert robust["attack_success"]["original"] == {"fgsm": 1 / 3, "pgd": 1.0}
    # transfer: the sub-network's clean correctness (3 of 4) under the original's attacks: FGSM all right,
    # PGD wrong on the 2nd image of each task, of which only task 0's was right when clean
    assert robust["accuracy"]["transfer"] == {"fgsm": 1.0, "pgd": 0.5}
    assert robust["attack_success"]["transfer"] == {"fgsm": 0.0, "pgd": 1 / 3}
    assert PAPER["vgg19"]["kl_le_0.8"] == {"neurochains": 0.543, "magnitude": 0.388, "random": 0.211}


def test_per_image_shares_conv_counts_bins_control_and_notes_match_a_hand_count():
    h = headline(RECORDS)
    assert h["fidelity"]["per_image"] == {"images": 80, "kl_mean": pytest.approx(1.2), "kl_le_0.8": 45 / 80,
                                          "kl_ge_1.5": 35 / 80}
    assert (h["fidelity"]["kl_le_0.8"], h["fidelity"]["outputs"]) == (0.5, 10)
    magnitude = h["baselines"]["magnitude"]
    assert magnitude["per_image"]["kl_le_0.8"] == 2 / 3 and magnitude["per_image"]["images"] == 60
    assert (magnitude["allocation"], magnitude["gates"], magnitude["steps_mean"]) == (["proportional"], ["open"], 120)
    size = h["size"]
    assert (size["conv_filters_kept_mean"], size["conv_filters_total"], size["conv_layers_total"]) == (23, 90, 5)
    assert (size["linear_units_kept_mean"], size["linear_units_total"]) == (2, 10)
    faith = h["faithfulness"]
    assert faith["spearman_untied_median"] == pytest.approx(0.4) and faith["spearman_taylor_median"] == 0.3
    # scores 0.2 / 0.5 / 0.9 of 3 tasks in 8 equal intervals of [0.2, 0.9]: intervals 0, 3 and 7
    assert [b["filters"] for b in faith["bins"]] == [3, 3, 3]
    assert [b["degradation"] for b in faith["bins"]] == pytest.approx([0.01, 0.1, 0.3])
    assert faith["bins"][1]["low"] == pytest.approx(0.2 + 3 * 0.7 / 8)
    control = h["random_weights"]
    assert (control["tasks"], control["shared_mean"], control["real_filters_kept_mean"], control["kl_mean"]) == \
        (2, 4.0, 15.0, 0.05)
    assert (control["output_spread_mean"], control["real_output_spread_mean"]) == pytest.approx((0.001, 0.9))
    assert len(h["notes"]) == 2 and "10 outputs" in h["notes"][0] and "25.6 %" in h["notes"][1]


def test_cli_headline_prints_both_shares_the_protocol_accuracy_the_control_and_the_notes():
    lines = sweep_headline(RECORDS).splitlines()
    assert lines[0].endswith("; conv filters 23.0 of 90 in 2.0 of 5 conv layers")
    assert lines[1] == ("KL <= 0.8, share of tasks / of images (paper, VGG-19, of images): neurochains 50.0 % / "
                        "56.2 % (54.3 %); magnitude 66.7 % / 66.7 % (38.8 %); random 0.0 % / 0.0 % (21.1 %); mean KL 1.200")
    assert "magnitude baseline: 30.0 filters, proportional allocation, gates open, 120 fine-tuning steps" in lines
    assert "degradation per score interval (pooled, low -> high): 0.0100 -> 0.1000 -> 0.3000" in lines
    assert ("robustness, original: accuracy clean 75 %, fgsm 50 %, pgd 0 %; attack success fgsm 33 %, pgd 100 %; "
            "P(true class) clean 0.90, fgsm 0.40, pgd 0.10") in lines
    assert any(line.startswith("random-weights control: 50.0 filters kept (real 15.0)") for line in lines)
    assert sum(line.startswith("note: ") for line in lines) == 2


def test_missing_evaluations_skip_their_plots_and_numbers(tmp_path):
    bare = [RECORDS[3]]
    made = {plot.__name__: plot(bare, tmp_path / f"{plot.__name__}.png") for plot in PLOTS}
    assert sorted(name for name, path in made.items() if path) == ["plot_fidelity", "plot_quotients", "plot_size"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot_fidelity.png", "plot_quotients.png", "plot_size.png"]
    assert set(headline(bare)) == {"tasks", "size", "fidelity", "notes"}  # notes: 10 outputs, 42 % kept
    page = write_sweep_report(tmp_path / "sweep", bare, META).read_text()
    assert sorted(p.stem for p in (tmp_path / "sweep" / "plots").iterdir()) == ["fidelity", "quotients", "size"]
    assert page.count("<img ") == 3 and "Magnitude pruning" not in page
    assert headline([]) == {"tasks": 0} and plot_size([], tmp_path / "none.png") is None


class _Images(HTMLParser):
    """Collects the attributes of every ``<img>`` and whether the page has a script."""

    def __init__(self) -> None:
        super().__init__()
        self.images: List[Dict[str, str]] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.images += [dict(attrs)] if tag == "img" else []
        self.scripts += tag == "script"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return write_sweep_report(tmp_path_factory.mktemp("sweep"), RECORDS, META)


def test_report_embeds_every_plot_with_alt_text_and_the_headline(sweep):
    out = sweep.parent
    pngs = sorted((out / "plots").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(["size", "fidelity", "baselines", "faithfulness", "quotients", "sign",
                                             "robustness", "held_out"])
    page = sweep.read_text()
    parser = _Images()
    parser.feed(page)
    assert parser.scripts == 0 and "Content-Security-Policy" in page and "default-src 'none'" in page
    assert len(parser.images) == len(pngs) and all(img["alt"].strip() for img in parser.images)
    sources = {img["src"] for img in parser.images}
    assert sources == {"data:image/png;base64," + base64.b64encode(p.read_bytes()).decode() for p in pngs}
    for text in ("benchmarks.digits:build", "25.0 ± 11.2 of 100 (25.0 %)", "NeuroChains: tasks with KL ≤ 0.8",
                 "50.0 %", "54.3 % (VGG-19)", "Random pruning: tasks with KL ≥ 1.5", "66.7 %", "38.8 % (VGG-19)",
                 "0.40 / 0.50", "100.0 % / 90.0 %", "0.90 / 0.40 / 0.10", "157 ± 43", "of 5,504 conv filters",
                 "0.0100 → 0.1000 → 0.3000", "75.0% / 50.0% / 0.0%", "33.3% / 100.0%", "Note: the model has 10 outputs"):
        assert text in page, text
    assert "4,480" not in page and "of 67" not in page  # the paper's totals that the architectures do not give
    rows = dict(re.findall(r'<th scope="row">([^<]*)</th><td>[^<]*</td><td>([^<]*)</td>', page))
    assert rows["NeuroChains: tasks with KL ≤ 0.8"] == "— (the paper counts images)"
    assert rows["NeuroChains: images with KL ≤ 0.8"] == "54.3 % (VGG-19)"
    assert page.count('<th scope="row">000') == 4  # the task table; the last task has no baselines or Spearman
    assert "<td>2.000</td><td>18/20</td><td>—</td><td>—</td><td>—</td>" in page
    assert read_json(out / "headline.json") == headline(RECORDS)


def test_report_renders_in_headless_chromium(sweep, tmp_path):
    shot = tmp_path / "sweep.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
               "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1280,3000", sweep.as_uri()]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    assert not [line for line in run.stderr.splitlines() if ":CONSOLE" in line]  # no CSP violation, no error
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
        assert image.format == "PNG" and image.size == (1280, 3000)
        assert len(pixels.getcolors(1 << 20)) > 100 and pixels.getextrema() != ((255, 255),) * 3


def test_size_vs_fidelity_scatter_links_each_task_to_its_row(sweep):
    page = sweep.read_text()
    points = re.findall(r'<a href="#(task-[^"]+)" aria-label="([^"]+)"><circle cx="([\d.]+)" cy="([\d.]+)"', page)
    measured = [r for r in RECORDS if r.get("size", {}).get("filters_kept") is not None
                and r.get("fidelity", {}).get("kl") is not None]
    assert [p[0] for p in points] == [f"task-{r['task']}" for r in measured] and points
    for anchor, label, _, _ in points:
        assert f'<tr id="{anchor}">' in page
        record = next(r for r in measured if f"task-{r['task']}" == anchor)
        assert f"{record['size']['filters_kept']} filters kept, KL {record['fidelity']['kl']:.3f}" in label
    by_kept = sorted(points, key=lambda p: float(p[2]))  # more filters: further right; larger KL: higher up
    kept = [next(r for r in measured if f"task-{r['task']}" == p[0])["size"]["filters_kept"] for p in by_kept]
    assert kept == sorted(kept)
    by_height = sorted(points, key=lambda p: -float(p[3]))
    kls = [next(r for r in measured if f"task-{r['task']}" == p[0])["fidelity"]["kl"] for p in by_height]
    assert kls == sorted(kls)
