"""Tasks with nothing to explain: random weights, and predictions that are constant or near-uniform.

NeuroChains explains the model's *predictions* on a task (Eq. 8 keeps what preserves them). When
those predictions carry no information, the extracted sub-network "explains" nothing, however good
its fidelity looks: a randomly initialised ResNet-18 that predicts one class for every image is
reproduced perfectly by an empty sub-network (0 filters, top-1 agreement 20/20, KL 0.000).

:func:`check_predictions` flags two such cases from the original model's logits on the task images:

* **constant**: every image gets the same top-1 class although the task has at least two classes;
* **near-uniform**: the predicted distributions are close to uniform over the model's ``K``
  outputs: the mean over the images of the normalised entropy ``H(p) / log K`` (0 for a one-hot
  prediction, 1 for the uniform one) is at least :data:`NEAR_UNIFORM_ENTROPY` (0.9). For a
  1000-class model, a prediction whose probability is spread evenly over about 500 classes has
  normalised entropy 0.9; a trained ImageNet model on its own classes stays far below (MobileNetV2
  on the demo photos: about 0.1).

:func:`task_warnings` turns these and :attr:`~hookchains.inputs.models.ModelRef.random_init` into the
one-line warnings that ``hookchains extract`` prints before the fit and records in the result
(``subnetwork.json``'s ``task.warnings``, ``summary.txt``, ``--json`` and the report).

Example:
    >>> logits = torch.tensor([[4.0, 0.0], [3.0, 1.0], [5.0, -1.0]])
    >>> check = check_predictions(logits, classes=2)
    >>> check.constant, round(check.entropy, 2), check.warnings()[0][:40]
    (True, 0.23, 'the model predicts the same class (outpu')
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from hookchains.inputs.models import ModelRef

__all__ = ["NEAR_UNIFORM_ENTROPY", "PredictionCheck", "check_predictions", "random_weights_warning", "task_warnings"]

NEAR_UNIFORM_ENTROPY = 0.9
"""Mean normalised entropy ``H(p) / log K`` at or above which predictions count as near-uniform."""


@dataclass(frozen=True)
class PredictionCheck:
    """What the original model predicts on the task images, reduced to what makes a task degenerate.

    Attributes:
        constant: every image has the same top-1 output although the task has two or more classes.
        entropy: mean over the images of ``H(p) / log K`` (``K`` outputs), in [0, 1].
        top_output: the most frequent top-1 output index; top_share: the share of images predicted as it.
        images: number of images; outputs: ``K``.
    """

    constant: bool
    entropy: float
    top_output: int
    top_share: float
    images: int
    outputs: int

    @property
    def near_uniform(self) -> bool:
        """Whether ``entropy >= NEAR_UNIFORM_ENTROPY`` (see the module docstring)."""
        return self.entropy >= NEAR_UNIFORM_ENTROPY

    def warnings(self) -> List[str]:
        """One line per problem found (empty when the predictions are informative)."""
        found = []
        if self.constant:
            found.append(f"the model predicts the same class (output {self.top_output}) for all {self.images} "
                         "task images: the sub-network can only explain that constant, so the result is meaningless")
        if self.near_uniform:
            found.append(f"the model's predictions are near-uniform (mean normalised entropy {self.entropy:.2f} >= "
                         f"{NEAR_UNIFORM_ENTROPY}): it is not confident about any class, so the result explains noise")
        return found

    def to_json(self) -> Dict[str, object]:
        """The figures as plain JSON data, with ``near_uniform``."""
        return {**asdict(self), "near_uniform": self.near_uniform}


def check_predictions(logits: torch.Tensor, classes: int) -> PredictionCheck:
    """Check the original model's ``logits`` (N x K) on a task of ``classes`` classes.

    Raises:
        ValueError: ``logits`` is not a non-empty N x K tensor with K >= 2.

    Example:
        >>> check_predictions(torch.zeros(4, 10), classes=2).near_uniform
        True
    """
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must be N x K with N >= 1 and K >= 2, got shape {tuple(logits.shape)}")
    log_p = F.log_softmax(logits.detach().float().cpu(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1) / math.log(logits.shape[1])
    top = log_p.argmax(-1)
    values, counts = top.unique(return_counts=True)
    best = int(counts.argmax())
    return PredictionCheck(constant=classes >= 2 and len(values) == 1, entropy=float(entropy.mean()),
                           top_output=int(values[best]), top_share=float(counts[best]) / len(top),
                           images=len(top), outputs=int(logits.shape[1]))


def random_weights_warning(ref: ModelRef) -> Optional[str]:
    """The warning for a model with random weights (:attr:`ModelRef.random_init`), else ``None``.

    Example:
        >>> random_weights_warning(ModelRef("torchvision:resnet18"))[:40]
        'torchvision:resnet18 has random weights '
    """
    if not ref.random_init:
        return None
    return (f"{ref.spec} has random weights (neither --pretrained nor --checkpoint was given): its predictions, "
            "and any sub-network explaining them, mean nothing; pass --pretrained or --checkpoint FILE")


def task_warnings(ref: ModelRef, check: PredictionCheck) -> List[str]:
    """All warnings of a task: random weights first, then those of ``check``.

    Example: ``task_warnings(ref, check_predictions(model(images), 2))``."""
    first = random_weights_warning(ref)
    return ([first] if first else []) + check.warnings()
