"""The embedded default task: real MobileNetV2 ImageNet weights and bundled photos, fully offline.

Chosen so ``hookchains demo`` stays short on a CPU (:data:`DEMO_DURATION` says what it takes): 2 classes
x 10 augmented views of one bundled photo each (Egyptian cat, espresso), 160 px (docs/design.md measured the same
sub-network size and agreement as 224 px at half the time), at most 150 steps at lr 0.02 (the
paper's lr 0.005 needs ~180 steps just to move a score from 1 below tau = 0.1).
"""
from __future__ import annotations

from typing import Tuple

from torch import nn

from hookchains.assets import demo_photos
from hookchains.inputs.data import ImageSet, augmented_views
from hookchains.inputs.models import ModelRef, create_model, preprocessing

__all__ = ["DEMO_CLASSES", "DEMO_DURATION", "DEMO_FIT", "DEMO_IMAGE_SIZE", "demo_task"]

DEMO_CLASSES = ("Egyptian cat", "espresso")
DEMO_IMAGE_SIZE = 160
DEMO_FIT = {"steps": 150, "lr": 0.02}
DEMO_DURATION = ("It takes about 50 s on an idle 2-core CPU (measured: 51 s, 37 s of it the 150-step fit) "
                 "and many times that on a busy one (measured before the speed-ups of issue 16: 19 min at load 20); "
                 "each stage prints a status line, and the last line says where the time went.")
"""What the demo takes. Measured with ``hookchains demo`` on a 2-core CPU shared by other jobs (load
average 20, one torch thread): ``time: load 3 s, fit 972 s, materialise 3 s, save 1 s, graph 3 s,
chains 15 s, feature visualisation 105 s, heatmaps 20 s, report page 2 s, other 7 s (total 1129 s)``.
That was before the fit folded its scores into the norms and the command kept freed memory (issue 16).
The idle figure is ``benchmarks/demo_time.py``'s best of two runs: ``current 51.2 s (load 0, fit 37,
materialise 0, save 0, graph 1, chains 0, feature visualisation 5, heatmaps 1, degradation 4, report page 0)``
against 84.8 s for the code before (fit 53, feature visualisation 13, heatmaps 8, degradation 5)."""


def demo_task(image_size: int = DEMO_IMAGE_SIZE, per_class: int = 10, seed: int = 0) -> Tuple[nn.Module, ModelRef, ImageSet]:
    """The embedded model and the demo images (augmented views of one photo per class, say so).

    Example:
        >>> model, ref, task = demo_task()
        >>> task.images.shape
        torch.Size([20, 3, 160, 160])
    """
    model, ref = create_model("hookchains:mobilenet_v2")
    photos = {name: demo_photos()[name] for name in DEMO_CLASSES}
    return model, ref, augmented_views(photos, per_class, preprocessing(model, image_size), seed=seed)
