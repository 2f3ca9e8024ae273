"""Fidelity of a sub-network to the original model (paper section 4.2 and Eq. 5, 9).

All functions take *logits* of the original model (``teacher``) and of the sub-network (``student``)
for the same images, shape ``N x classes`` (or scores whose softmax is the model's output distribution:
log-probabilities, see :func:`hookchains.inputs.forward.class_scores`).

Dense predictions (segmentation) arrive as ``N x P x classes`` (``P`` positions, e.g. pixels):
:func:`fidelity` then treats every position as one prediction -- KL, probability drop and Q per
pixel over the classes, averaged over all ``N * P`` pixels; ``agree`` counts agreeing pixels, out of
``positions`` (``images`` stays ``N``).

Besides: :func:`accuracy` scores logits against ground-truth labels (robustness, Fig. 12), and
:func:`spearman` is the rank correlation that summarises faithfulness (score of a removed filter vs
the damage its removal does, Fig. 2 and Fig. 11 right).
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["kl_per_image", "prob_drop", "quotient", "top1_agreement", "fidelity", "accuracy", "spearman"]

Numbers = Union[Sequence[float], np.ndarray, torch.Tensor]


def kl_per_image(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` per image (Eq. 5), in nats."""
    log_p, log_q = F.log_softmax(teacher.float(), -1), F.log_softmax(student.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def prob_drop(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Decrease of the probability of the original predicted class (paper Fig. 1 bottom, Fig. 2)."""
    p, q = F.softmax(teacher.float(), -1), F.softmax(student.float(), -1)
    y = p.argmax(-1, keepdim=True)
    return (p.gather(-1, y) - q.gather(-1, y)).squeeze(-1)


def _margin(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``probs[y] - max_{z != y} probs[z]`` per row."""
    top = probs.gather(-1, y)
    others = probs.scatter(-1, y, float("-inf")).max(-1, keepdim=True).values
    return (top - others).squeeze(-1)


def quotient(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Quotient Q(p, q) of Eq. 9 per image: the student's margin of the teacher's class over the
    best other class, divided by the teacher's margin. ``Q < 0`` means the prediction changed."""
    p, q = F.softmax(teacher.float(), -1), F.softmax(student.float(), -1)
    y = p.argmax(-1, keepdim=True)
    return _margin(q, y) / _margin(p, y).clamp_min(1e-12)


def top1_agreement(teacher: torch.Tensor, student: torch.Tensor) -> int:
    """Number of images whose top-1 class is the same under both networks."""
    return int((teacher.argmax(-1) == student.argmax(-1)).sum())


def fidelity(teacher: torch.Tensor, student: torch.Tensor) -> Dict[str, float]:
    """Summary used everywhere (mean KL, mean probability drop, mean/min Q, agreement).

    Example:
        >>> fidelity(torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]))["kl"]
        0.0
        >>> fidelity(torch.zeros(2, 16, 3), torch.zeros(2, 16, 3))["positions"]   # dense: 2 x 16 pixels
        32
    """
    images = int(teacher.shape[0])
    if teacher.ndim == 3:
        teacher, student = teacher.flatten(0, 1), student.flatten(0, 1)
    kl, drop, q = kl_per_image(teacher, student), prob_drop(teacher, student), quotient(teacher, student)
    return {
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "prob_drop": float(drop.mean()),
        "quotient_mean": float(q.mean()),
        "quotient_min": float(q.min()),
        "negative_quotients": int((q < 0).sum()),
        "agree": top1_agreement(teacher, student),
        "images": images,
        "positions": int(teacher.shape[0]),
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose top-1 class equals the ground-truth label (robustness checks, Fig. 12).

    Example:
        >>> accuracy(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        0.5
    """
    if logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need as many labels as logits rows (> 0), got {logits.shape[0]} and {labels.shape[0]}")
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks; tied values share the mean of the ranks they occupy."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts - 1) / 2.0, counts)
    return ranks


def spearman(x: Numbers, y: Numbers) -> float:
    """Spearman rank correlation of ``x`` and ``y`` (Pearson correlation of their average ranks).

    The paper reports that a filter's score and the degradation caused by removing it are "strongly
    and positively correlated" (section 4.2, Fig. 2; A.5, Fig. 11 right); this is the number that
    summarises such a plot for one sub-network. Ties get average ranks. Returns ``nan`` when there are
    fewer than 2 points, when either side is constant (the correlation is undefined) or holds a NaN.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 20, 40])
        0.9486832980505138
    """
    a = np.asarray(torch.as_tensor(x, dtype=torch.float64).flatten())
    b = np.asarray(torch.as_tensor(y, dtype=torch.float64).flatten())
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two sequences of the same length, got {a.size} and {b.size}")
    if a.size < 2 or np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / norm) if norm > 0 else float("nan")
