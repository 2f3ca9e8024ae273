"""Batched extraction: several tasks in one forward pass, each exactly as if fitted alone without norm folding."""
from __future__ import annotations

import pytest
import torch

import hookchains
from hookchains.core.fit import fit_tasks, logits_of


def _task(digits, a: int, b: int) -> torch.Tensor:
    x, y = digits
    idx = torch.cat([torch.nonzero(y[1500:] == c).flatten()[:10] + 1500 for c in (a, b)])
    return x[idx]


@pytest.fixture(scope="module")
def tasks(digits):
    return [_task(digits, 3, 8), _task(digits, 1, 7), _task(digits, 0, 6)]


def test_batched_fit_equals_one_by_one(digits_net, tasks, one_thread):
    options = dict(steps=300, lr=0.05, progress=False)
    alone = []
    for images in tasks:
        with hookchains.attach(digits_net, example=images[:1]) as chains:
            chains.fold_norms = False  # the batched forward multiplies featuremaps: the same arithmetic
            alone.append(hookchains.fit(chains, images, **options))
    with hookchains.attach(digits_net, example=tasks[0][:1], tasks=len(tasks)) as chains:
        together = fit_tasks(chains, tasks, **options)
    steps = [s.config["steps_run"] for s in alone]
    assert len(set(steps)) > 1, f"{steps}: the tasks should converge at different steps to test freezing"
    for one, batch in zip(alone, together):
        assert batch.config["steps_run"] == one.config["steps_run"]
        assert batch.kept_filters() == one.kept_filters()
        assert batch.removed_gates == one.removed_gates
        for name in one.scores:
            torch.testing.assert_close(batch.scores[name], one.scores[name], rtol=0, atol=1e-6)
        assert batch.fidelity["kl"] == pytest.approx(one.fidelity["kl"], abs=1e-5)
        assert batch.history["kl"] == pytest.approx(one.history["kl"], abs=1e-5)


def test_each_task_block_uses_its_own_scores(digits_net, tasks):
    """Image i of a batched forward sees task i // N's scores and gates, in every mode."""
    with hookchains.attach(digits_net, example=tasks[0][:1], tasks=2) as batched:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in batched.parameters():
                p.copy_(torch.rand(p.shape, generator=gen) * 2 - 0.5)
        states = [batched.task_state(t) for t in range(2)]
        out = {mode: logits_of(batched, torch.cat(tasks[:2]), mode) for mode in ("soft", "hard", "mask")}
    with hookchains.attach(digits_net, example=tasks[0][:1]) as single:
        for t in range(2):
            single.load_state(*states[t])
            for mode, logits in out.items():
                torch.testing.assert_close(logits[20 * t:20 * (t + 1)], logits_of(single, tasks[t], mode))


def test_batched_fit_rejects_mismatched_tasks(digits_net, tasks):
    with hookchains.attach(digits_net, example=tasks[0][:1], tasks=2) as chains:
        with pytest.raises(ValueError, match="hold 2 task"):
            fit_tasks(chains, tasks, steps=1, progress=False)
        with pytest.raises(ValueError, match="same shape and count"):
            fit_tasks(chains, [tasks[0], tasks[1][:10]], steps=1, progress=False)
        with pytest.raises(ValueError, match="fit_tasks"):
            hookchains.fit(chains, tasks[0], steps=1, progress=False)
        with pytest.raises(ValueError, match="cannot be split into 2 tasks"):
            logits_of(chains, tasks[0][:3], "hard")


class _ViewNet(torch.nn.Module):
    """Flattens a featuremap with ``.view``, which a channels-last activation cannot do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Linear(256, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.view(h.shape[0], -1))


def test_fit_falls_back_to_the_usual_layout_when_the_model_needs_it(tasks):
    torch.manual_seed(0)
    net, images = _ViewNet().eval(), tasks[0].repeat(1, 3, 1, 1)
    with pytest.raises(RuntimeError, match="view"):
        net(images.contiguous(memory_format=torch.channels_last))
    with hookchains.attach(net, example=images[:1]) as chains:
        sub = hookchains.fit(chains, images, steps=5, progress=False)
    assert sub.config["steps_run"] == 5 and sub.fidelity["images"] == 20
