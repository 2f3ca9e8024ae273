"""Everything the paper measures about one extracted sub-network, as one JSON-able record.

For a fitted :class:`~hookchains.core.subnetwork.Subnetwork` and its task's images this collects:

* size -- kept filters, layers and gated blocks (Table 1 style counts);
* fidelity on the fitting images -- KL, probability drop, quotient Q of Eq. 9 per image, agreement;
* generalisation (A.3, Fig. 9) -- the same on held-out images of the task's classes, plus ground-truth
  accuracy of the original and the sub-network when the class folders name model outputs;
* faithfulness (Fig. 2, 11) -- the degradation from removing each kept filter vs its score;
* baselines (Fig. 3) -- magnitude and random pruning to the same budget, scores fine-tuned, by default
  the paper's way (budget spread over layers by width, gates open, as many steps as the fit);
* robustness (Fig. 12) -- ground-truth probability, accuracy and attack success under FGSM / PGD,
  original vs sub-network;
* the random-weights control (Adebayo et al., 2018) -- the same fit on the model with re-initialised
  weights, its size, KL and overlap with the real sub-network.

Fidelity and baselines keep each image's KL (``kls``), so shares can be counted per image as the paper
does, and per task.

:func:`evaluate` is what ``hookchains sweep`` writes as one line per task.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from hookchains.core.attach import ScoreHooks
from hookchains.core.fit import logits_of
from hookchains.core.metrics import accuracy, fidelity, kl_per_image, quotient
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.baselines import baseline
from hookchains.evaluation.controls import random_weights_control
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
        baseline_steps / baseline_lr: fine-tuning of the baselines' scores (``None``: as many steps,
            at the same rate, as the NeuroChains fit ran).
        allocation: ``proportional`` (the paper's: a total budget spread over layers by width, gates
            open) or ``matched`` (each layer keeps as many filters as the sub-network, its gates);
            see :mod:`hookchains.evaluation.baselines`.
        baseline_budget: total filters of a ``proportional`` baseline (``None``: the sub-network's
            kept count; the paper used 180 against NeuroChains' 157 on average).
        random_control: also fit the model with re-initialised weights
            (:func:`hookchains.evaluation.controls.random_weights_control`; one more fit per task).
        robustness: FGSM and PGD attacks (Fig. 12); off by default (``2 + 2 * pgd_steps`` backward passes).
        eps: attack radius in the model's input units (the normalised tensor).
        pgd_steps: PGD iterations.
        seed: seeds the random baseline and PGD's start (offset by the task index).
    """

    faithfulness: bool = True
    baselines: bool = True
    baseline_steps: Optional[int] = None
    baseline_lr: Optional[float] = None
    allocation: str = "proportional"
    baseline_budget: Optional[int] = None
    robustness: bool = False
    eps: float = 0.1
    pgd_steps: int = 10
    random_control: bool = False
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
    device = next(chains.model.parameters()).device
    images = data.images.to(device)
    teacher = logits_of(chains, images, "off")
    record: Dict[str, Any] = {"size": sub.counts(), "fidelity": _fidelity(chains, sub, images, teacher)}
    seed = options.seed + seed_offset
    if data.held_images.shape[0]:
        record["held_out"] = _held_out(chains, data, output_index, device)
    if options.faithfulness:
        record["faithfulness"] = faithfulness(chains, sub, images, teacher=teacher).to_json()
    if options.baselines:
        record["baselines"] = {kind: _baseline(chains, images, sub, kind, options, seed, teacher)
                               for kind in BASELINES}
    if options.robustness:
        labels = _labels(data.labels, output_index, teacher.cpu())
        record["robustness"] = robustness(chains, sub, images, labels.to(device), eps=options.eps,
                                          pgd_steps=options.pgd_steps, seed=seed)
    if options.random_control:
        record["random_weights"] = random_weights_control(chains.model, images, sub, seed=seed,
                                                          score_max=chains.score_max, teacher=teacher)
    chains.load_state(sub.scores, sub.gate_logits)
    return record


def _fidelity(chains: ScoreHooks, sub: Subnetwork, images: torch.Tensor, teacher: torch.Tensor) -> Dict[str, Any]:
    """Fidelity of ``sub``'s thresholded network, with each image's quotient and KL and the output count."""
    chains.load_state(sub.scores, sub.gate_logits)
    teacher, student = teacher.cpu(), logits_of(chains, images, "hard").cpu()
    return {**fidelity(teacher, student), "outputs": int(teacher.shape[-1]),
            "quotients": quotient(teacher, student).tolist(), "kls": kl_per_image(teacher, student).tolist()}


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
    """One baseline's kept count, fidelity with per-image KL, and protocol (its ``config``); a budget the
    allocation cannot spread (fewer filters than layers) is recorded as ``{"error": why}``, not raised,
    so one tiny sub-network does not stop a sweep."""
    if options.allocation == "proportional" and options.baseline_budget is None and \
            sub.counts()["filters_kept"] < len(sub.sites.filters):
        return {"error": f"the sub-network keeps {sub.counts()['filters_kept']} filters, fewer than the "
                         f"{len(sub.sites.filters)} layers a proportional baseline needs one each: "
                         "pass a baseline budget or allocation 'matched'"}
    pruned = baseline(chains, images, sub, kind, allocation=options.allocation, budget=options.baseline_budget,
                      steps=options.baseline_steps, lr=options.baseline_lr, seed=seed, teacher=teacher)
    measured = _fidelity(chains, pruned, images, teacher)
    return {"filters_kept": pruned.counts()["filters_kept"], "kls": measured["kls"], **pruned.fidelity,
            "protocol": pruned.config}


def summary_line(task_id: str, classes: Tuple[str, ...], record: Dict[str, Any]) -> str:
    """One human line per finished task, e.g. ``task 00007 (3, 8): 31/320 filters, KL 0.080, 20/20``."""
    size, fid = record["size"], record["fidelity"]
    line = (f"task {task_id} ({', '.join(classes)}): {size['filters_kept']}/{size['filters_total']} filters, "
            f"KL {fid['kl']:.3f}, {fid['agree']}/{fid['images']} agree")
    if "baselines" in record:
        line += "; KL " + ", ".join(f"{k} {v['kl']:.3f}" if "kl" in v else f"{k} skipped ({v['error']})"
                                    for k, v in record["baselines"].items())
    if "faithfulness" in record and record["faithfulness"]["spearman"] is not None:
        line += f"; Spearman {record['faithfulness']['spearman']:.2f}"
    return line
