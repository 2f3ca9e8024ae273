"""Fidelity of a sub-network to the original model (paper section 4.2 and Eq. 5, 9).

All functions take *logits* of the original model (``teacher``) and of the sub-network (``student``)
for the same images, shape ``N x classes``.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

__all__ = ["kl_per_image", "prob_drop", "quotient", "top1_agreement", "fidelity"]


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
    """
    kl, drop, q = kl_per_image(teacher, student), prob_drop(teacher, student), quotient(teacher, student)
    return {
        "kl": float(kl.mean()),
        "kl_max": float(kl.max()),
        "prob_drop": float(drop.mean()),
        "quotient_mean": float(q.mean()),
        "quotient_min": float(q.min()),
        "negative_quotients": int((q < 0).sum()),
        "agree": top1_agreement(teacher, student),
        "images": int(teacher.shape[0]),
    }
