"""Which network a fit at the step limit returns (hookchains.core.fit module doc): the sparsest feasible
one met from ``min_steps`` on, checked on scripted fidelities so that every case is certain."""
from __future__ import annotations

import timm
import torch

import hookchains
from hookchains.core.fit import FitConfig, KLTerm, chunks, kl_backward, logits_of, optimise
from hookchains.core.recipes import Ste

# (KL, top-1 agreement) measured at the start of steps 0..11 (the others: KL 0.5): feasible (KL <= 0.1,
# agreement >= 0.95) at step 2 (before min_steps 4) and step 6; step 8 is within KL but loses half the
# images. lr 0.15 / lam 0.05 shrink the net within the 12 steps (1040 filters, 853 after 6 steps, then 0).
SCRIPT = {2: (0.05, 1.0), 6: (0.05, 1.0), 8: (0.05, 0.5)}


def _fit(final, min_agreement=0.95):
    model, x = timm.create_model("test_resnet", num_classes=3).eval(), torch.randn(2, 3, 32, 32)
    with hookchains.attach(model) as hooks:
        teacher = torch.log_softmax(logits_of(hooks, x, "off"), -1)
        step = iter(range(100))

        def backward(weights):  # real gradients, scripted figures
            kl_backward(hooks, x, teacher, chunks(2, None), float(weights[0]))
            figures = SCRIPT.get(next(step), (0.5, 1.0))
            return [figures[0]], [figures[1]]
        cfg = FitConfig(steps=12, min_steps=4, lr=0.15, lam=0.05, min_agreement=min_agreement, progress=False)
        track = optimise(hooks, Ste(), KLTerm(backward, lambda: ([final[0]], [final[1]])), cfg)[0]
        kept = hooks.kept_counts(0)["filters"]
    return track, kept


def test_the_sparsest_feasible_network_after_min_steps_is_returned():
    track, kept = _fit(final=(0.5, 1.0))  # the last network is not feasible
    assert track.returned_step == 6 and track.ending(FitConfig())["returned_step"] == 6
    # the network after 6 steps, restored: the fit shrank it meanwhile, and step 8's sparser one is not feasible
    assert kept == track.history["filters"][5] and track.history["filters"][-1] < kept < track.history["filters"][0]


def test_the_last_network_stays_when_nothing_after_min_steps_is_feasible_and_sparser():
    track, kept = _fit(final=(0.05, 1.0))  # the last network is feasible and sparser than step 6's
    assert track.history["filters"][-1] <= track.history["filters"][5]
    assert track.returned_step is None and kept == track.history["filters"][-1]



def test_min_agreement_zero_returns_the_sparser_network_that_loses_images():
    track, kept = _fit(final=(0.5, 1.0), min_agreement=0.0)  # step 8 is now feasible, and sparser
    assert track.returned_step == 8 and kept == track.history["filters"][7]
