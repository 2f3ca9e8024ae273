"""Everything the paper measures about one extracted sub-network, as one JSON-able record.

For a fitted :class:`~hookchains.core.subnetwork.Subnetwork` and its task's images this collects:

* size -- kept filters, layers and gated blocks (Table 1 style counts);
* fidelity on the fitting images -- KL, probability drop, quotient Q of Eq. 9 per image, agreement;
* generalisation (A.3, Fig. 9) -- the same on held-out images of the task's classes, plus ground-truth
  accuracy of the original and the sub-network when the class folders name model outputs;
* faithfulness (Fig. 2, 11) -- the degradation from removing each kept filter vs its score;
* baselines (Fig. 3) -- magnitude and random pruning to the same budget, scores fine-tuned;
* robustness (Fig. 12) -- ground-truth probability under FGSM / PGD, original vs sub-network.

:func:`evaluate` is what ``hookchains sweep`` writes as one line per task.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from hookchains.core.attach import ScoreHooks
from hookchains.core.fit import logits_of
from hookchains.core.metrics import accuracy, fidelity, quotient
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.baselines import baseline
from hookchains.evaluation.faithfulness import faithfulness
from hookchains.evaluation.robustness import robustness
from hookchains.inputs.tasks import TaskImages

__all__ = ["EvalOptions", "evaluate", "summary_line", "BASELINES"]

BASELINES = ("magnitude", "random")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Which evaluations :func:`evaluate` runs, and their settings.

    Attributes:
        faithfulness: remove each kept filter in turn (one forward pass per kept filter).
        baselines: magnitude and random pruning to the same budget (Fig. 3).
        baseline_steps / baseline_lr: fine-tuning of the baselines' scores.
        allocation: ``matched`` (each layer keeps as many filters as the sub-network) or
            ``proportional`` (the same total spread over layers by width); see :mod:`hookchains.evaluation.baselines`.
        robustness: FGSM and PGD attacks (Fig. 12); off by default (``2 + 2 * pgd_steps`` backward passes).
        eps: attack radius in the model's input units (the normalised tensor).
        pgd_steps: PGD iterations.
        seed: seeds the random baseline and PGD's start (offset by the task index).
    """

    faithfulness: bool = True
    baselines: bool = True
    baseline_steps: int = 100
    baseline_lr: float = 0.05
    allocation: str = "matched"
    robustness: bool = False
    eps: float = 0.1
    pgd_steps: int = 10
    seed: int = 0


def evaluate(chains: ScoreHooks, sub: Subnetwork, data: TaskImages, options: EvalOptions = EvalOptions(), *,
             output_index: Optional[List[int]] = None, seed_offset: int = 0) -> Dict[str, Any]:
    """Measure ``sub`` on its task: size, fidelity, held-out generalisation, faithfulness, baselines,
    robustness (see the module docstring). ``chains`` are single-task hooks on the model ``sub`` was
    fitted on; their scores are left as ``sub``'s.

    Args:
        output_index: model output index of each label of ``data`` (ground truth can then be scored);
            ``None``: ground-truth accuracy is omitted and robustness attacks the original's prediction.
        seed_offset: added to ``options.seed`` (e.g. the task index), so tasks draw different randoms.

    Example:
        >>> import hookchains, torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> images = torch.randn(4, 3, 16, 16)
        >>> data = TaskImages(images, torch.tensor([0, 0, 1, 1]), images[:2], torch.tensor([0, 1]),
        ...                   ["a", "b"], list("aabb"), ["a", "b"])
        >>> with hookchains.attach(model) as chains:
        ...     sub = hookchains.fit(chains, data.images, steps=3, progress=False)
        ...     options = EvalOptions(baseline_steps=2, robustness=True, pgd_steps=2)
        ...     record = evaluate(chains, sub, data, options)
        >>> record["fidelity"]["kl"] >= 0, -1 <= record["faithfulness"]["spearman"] <= 1
        (True, True)
    """
    chains.load_state(sub.scores, sub.gate_logits)
    device = next(chains.model.parameters()).device
    images = data.images.to(device)
    teacher, student = logits_of(chains, images, "off").cpu(), logits_of(chains, images, "hard").cpu()
    record: Dict[str, Any] = {"size": sub.counts(),
                              "fidelity": {**fidelity(teacher, student), "quotients": quotient(teacher, student).tolist()}}
    seed = options.seed + seed_offset
    if data.held_images.shape[0]:
        record["held_out"] = _held_out(chains, data, output_index, device)
    if options.faithfulness:
        record["faithfulness"] = faithfulness(chains, sub, images, teacher=teacher.to(device)).to_json()
    if options.baselines:
        record["baselines"] = {kind: _baseline(chains, images, sub, kind, options, seed, teacher.to(device))
                               for kind in BASELINES}
    if options.robustness:
        labels = _labels(data.labels, output_index, teacher)
        record["robustness"] = robustness(chains, sub, images, labels.to(device), eps=options.eps,
                                          pgd_steps=options.pgd_steps, seed=seed)
    chains.load_state(sub.scores, sub.gate_logits)
    return record


def _held_out(chains: ScoreHooks, data: TaskImages, output_index: Optional[List[int]], device) -> Dict[str, Any]:
    """Fidelity of the sub-network on images it was not fitted on (A.3), and accuracies when known."""
    held = data.held_images.to(device)
    teacher, student = logits_of(chains, held, "off").cpu(), logits_of(chains, held, "hard").cpu()
    result: Dict[str, Any] = fidelity(teacher, student)
    if output_index is not None:
        truth = _labels(data.held_labels, output_index, teacher)
        result.update(accuracy_original=accuracy(teacher, truth), accuracy_subnetwork=accuracy(student, truth))
    return result


def _labels(labels: torch.Tensor, output_index: Optional[List[int]], teacher: torch.Tensor) -> torch.Tensor:
    """Ground-truth model outputs of the images, or the original model's predictions when unknown."""
    if output_index is None:
        return teacher.argmax(-1)
    return torch.tensor(output_index)[labels]


def _baseline(chains: ScoreHooks, images: torch.Tensor, sub: Subnetwork, kind: str, options: EvalOptions, seed: int,
              teacher: torch.Tensor) -> Dict[str, Any]:
    pruned = baseline(chains, images, sub, kind, allocation=options.allocation, steps=options.baseline_steps,
                      lr=options.baseline_lr, seed=seed, teacher=teacher)
    return {"filters_kept": pruned.counts()["filters_kept"], **pruned.fidelity}


def summary_line(task_id: str, classes: Tuple[str, ...], record: Dict[str, Any]) -> str:
    """One human line per finished task, e.g. ``task 00007 (3, 8): 31/320 filters, KL 0.080, 20/20``."""
    size, fid = record["size"], record["fidelity"]
    line = (f"task {task_id} ({', '.join(classes)}): {size['filters_kept']}/{size['filters_total']} filters, "
            f"KL {fid['kl']:.3f}, {fid['agree']}/{fid['images']} agree")
    if "baselines" in record:
        line += "; KL " + ", ".join(f"{k} {v['kl']:.3f}" for k, v in record["baselines"].items())
    if "faithfulness" in record and record["faithfulness"]["spearman"] is not None:
        line += f"; Spearman {record['faithfulness']['spearman']:.2f}"
    return line
