"""Degenerate tasks (constant or near-uniform predictions, random weights) and the run's progress
lines: hand-set logits and stages, values computed another way."""
from __future__ import annotations

import io
import math

import pytest
import torch

from hookchains.core.progress import Progress
from hookchains.inputs.degenerate import NEAR_UNIFORM_ENTROPY, check_predictions, random_weights_warning, task_warnings
from hookchains.inputs.models import ModelRef


def test_constant_predictions_are_flagged_with_the_class():
    logits = torch.tensor([[0.0, 5.0, 1.0], [1.0, 3.0, 0.0], [0.0, 9.0, 8.0]])
    check = check_predictions(logits, classes=2)
    assert check.constant and check.top_output == 1 and check.top_share == 1.0
    assert check.warnings()[0].startswith("the model predicts the same class (output 1) for all 3 task images")
    assert not check_predictions(logits, classes=1).constant  # one class: a constant is the right answer


def test_near_uniform_is_the_mean_normalised_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]])  # top-1: outputs 0 and 1
    p = torch.tensor([1, math.exp(0.5), 1, 1]) / (math.exp(0.5) + 3)
    by_hand = (1.0 + float(-(p * p.log()).sum() / math.log(4))) / 2  # the uniform row has entropy 1
    check = check_predictions(logits, classes=2)
    assert check.entropy == pytest.approx(by_hand, abs=1e-6) and by_hand >= NEAR_UNIFORM_ENTROPY
    assert check.near_uniform and not check.constant and check.to_json()["near_uniform"] is True
    assert "near-uniform (mean normalised entropy 0.99 >= 0.9)" in check.warnings()[0]
    sharper = check_predictions(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]), classes=2)
    assert not sharper.near_uniform  # mean normalised entropy 0.83


def test_confident_and_varied_predictions_raise_nothing():
    logits = torch.tensor([[9.0, 0.0], [0.0, 9.0], [8.0, 1.0]])
    check = check_predictions(logits, classes=2)
    assert not check.constant and not check.near_uniform and check.warnings() == []
    assert check.top_output == 0 and check.top_share == pytest.approx(2 / 3)


def test_random_weights_are_named_with_what_to_do():
    assert "has random weights" in random_weights_warning(ModelRef("resnet18"))
    assert random_weights_warning(ModelRef("resnet18", pretrained=True)) is None
    assert random_weights_warning(ModelRef("torchvision:resnet18", checkpoint="/w.pt", checkpoint_sha256="0")) is None
    assert random_weights_warning(ModelRef("hookchains:mobilenet_v2")) is None  # shipped weights
    assert random_weights_warning(ModelRef("my_nets:build")) is None  # a factory decides its own weights
    confident = check_predictions(torch.tensor([[9.0, 0.0], [0.0, 9.0]]), classes=2)
    assert task_warnings(ModelRef("torchvision:resnet18"), confident) == [random_weights_warning(
        ModelRef("torchvision:resnet18"))]


def test_bad_logits_are_refused():
    with pytest.raises(ValueError, match="N x K"):
        check_predictions(torch.zeros(3), classes=2)


def test_progress_prints_stages_bars_and_warnings_and_times_them():
    stream = io.StringIO()
    progress = Progress(stream=stream)
    with progress.stage("fit", "up to 3 steps"):
        assert list(progress.bar(range(3), "fit")) == [0, 1, 2]
    with progress.stage("fit"):
        pass
    progress.warn("weights are random")
    lines = [line for line in stream.getvalue().splitlines() if line.strip() and "\r" not in line]
    assert lines[0] == "fit: up to 3 steps ..." and lines[-1] == "warning: weights are random"
    assert list(progress.seconds) == ["fit"] and progress.seconds["fit"] >= 0.0
    progress.seconds.update({"fit": 41.2, "report": 95.0})
    assert progress.breakdown(total=140.0) == "time: fit 41 s, report 95 s, other 4 s (total 140 s)"
    assert progress.breakdown(total=136.3) == "time: fit 41 s, report 95 s (total 136 s)"


def test_quiet_progress_prints_only_warnings():
    stream = io.StringIO()
    progress = Progress(enabled=False, stream=stream)
    with progress.stage("materialise"):
        list(progress.bar(range(3), "x"))
    progress.warn("constant predictions")
    assert stream.getvalue() == "warning: constant predictions\n" and "materialise" in progress.seconds
