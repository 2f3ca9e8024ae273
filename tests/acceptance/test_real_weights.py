"""Claims on real pretrained weights: the embedded MobileNetV2 (ImageNet) on real photos.

The images are 10 augmented views (crops, flips, slight colour jitter) of one bundled photo per class,
not 20 independent photos: the only real photos that ship offline (see hookchains.workflow.demo). The
sub-network is the one ``hookchains demo`` fitted (the session's ``demo_run``, read back from its folder).
"""
from __future__ import annotations

import pytest
import torch

import hookchains
from hookchains.workflow.runs import load_run


@pytest.fixture(scope="module")
def demo_result(demo_run):
    run = load_run(demo_run)
    print("\n" + run.sub.summary())
    return run.base_model(), run.task, run.sub


def test_teacher_is_confident_on_the_demo_photos(demo_result):
    model, task, _ = demo_result
    with torch.no_grad():
        top = model(task.images).argmax(-1)
    assert (top[:10] == 285).sum() >= 7 and (top[10:] == 967).sum() >= 9  # Egyptian cat, espresso


def test_demo_subnetwork_is_small_and_faithful(demo_result):
    _, _, sub = demo_result
    counts, fid = sub.counts(), sub.fidelity
    assert counts["filters_total"] == 17056
    assert counts["filters_kept"] <= 0.10 * counts["filters_total"], sub.summary()
    assert fid["agree"] >= 18, sub.summary()  # >= 90 % top-1 agreement of the thresholded network
    assert fid["kl"] <= 0.3, sub.summary()


def test_demo_subnetwork_materialises_smaller_and_exact(demo_result):
    model, task, sub = demo_result
    small, report = hookchains.materialize(sub, model, task.images)
    assert report.pruned
    # measured: 1,768,148 / 3,504,872 parameters (50.4 %), 7,374 / 18,056 channels
    assert report.params_after < 0.6 * report.params_before
    assert report.channels_after < 0.5 * report.channels_before
    with hookchains.attach(model, example=task.images[:1]) as chains, torch.no_grad():
        chains.load_state(sub.scores, sub.gate_logits)
        with chains.using("hard"):
            expected = model(task.images)
    with torch.no_grad():
        got = small(task.images)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
