"""Tasks of a case study: which classes each sub-network explains, and its images (paper 4.2, A.2, A.3).

The paper's quantitative results are averages over hundreds of *tasks*, each "20 samples uniformly
drawn from two classes". :func:`plan_tasks` draws such tasks reproducibly from a dataset's classes:

* ``classes_per_task=k`` -- tasks of ``k`` classes (pairs, or multi-class as in Fig. 17); when ``n``
  is at least the number of ``k``-subsets, every subset is a task (e.g. all 45 pairs of 10 digits);
* ``one_vs_rest=True`` -- one class against images drawn from all the others (Fig. 10, A.2).

:func:`load_task` reads a task's fitting images and, for the generalisation check of A.3 (Fig. 9),
disjoint held-out images of the same classes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from hookchains.inputs.data import load_image_folder
from hookchains.inputs.models import Preprocess

__all__ = ["SweepTask", "TaskImages", "plan_tasks", "load_task", "class_indices", "REST"]

REST = "rest"
"""Class name of the 'all other classes' side of a one-vs-rest task."""

_ENUMERATE_LIMIT = 200_000  # up to this many class subsets are listed and shuffled; beyond, sampled


@dataclasses.dataclass(frozen=True)
class SweepTask:
    """One case study: its position in the plan and the classes it explains.

    Attributes:
        index: position in the plan (stable for a seed: tasks ``0..n-1`` of a longer plan are the same).
        classes: the task's classes; for one-vs-rest, the one positive class.
        one_vs_rest: whether the second side is images of every other class.
    """

    index: int
    classes: Tuple[str, ...]
    one_vs_rest: bool = False

    @property
    def id(self) -> str:
        """Zero-padded index, the key of the task's line in the results."""
        return f"{self.index:05d}"

    @property
    def kind(self) -> str:
        """``pairs``, ``multi`` (more than two classes) or ``one-vs-rest``."""
        if self.one_vs_rest:
            return "one-vs-rest"
        return "pairs" if len(self.classes) == 2 else "multi"

    @property
    def class_names(self) -> List[str]:
        """The label names of the task's images, in label order."""
        return [*self.classes, REST] if self.one_vs_rest else list(self.classes)


def plan_tasks(class_names: Sequence[str], n: int, classes_per_task: int = 2, *, one_vs_rest: bool = False,
               seed: int = 0) -> List[SweepTask]:
    """Draw ``n`` distinct tasks from ``class_names``, reproducibly for ``seed``.

    The plan is a seeded shuffle of all candidate tasks, so asking for more tasks later extends the
    same plan (a resumed or enlarged sweep keeps its finished tasks). Asking for more tasks than
    exist returns all of them.

    Example:
        >>> [t.classes for t in plan_tasks(list("abc"), 5)]  # all 3 pairs, shuffled
        [('a', 'b'), ('b', 'c'), ('a', 'c')]
        >>> plan_tasks(list("abc"), 2, one_vs_rest=True)[0].class_names
        ['a', 'rest']
    """
    names = sorted(dict.fromkeys(class_names))
    if n < 1:
        raise ValueError(f"the number of tasks must be at least 1, got {n}")
    if one_vs_rest:
        if len(names) < 2:
            raise ValueError(f"one-vs-rest tasks need at least 2 classes, found {len(names)}")
        order = names[:]
        random.Random(seed).shuffle(order)
        return [SweepTask(i, (c,), True) for i, c in enumerate(order[:n])]
    if not 2 <= classes_per_task <= len(names):
        raise ValueError(f"classes per task must be between 2 and the {len(names)} classes found, "
                         f"got {classes_per_task}")
    return [SweepTask(i, c) for i, c in enumerate(_class_subsets(names, n, classes_per_task, seed))]


def _class_subsets(names: List[str], n: int, k: int, seed: int) -> List[Tuple[str, ...]]:
    """``n`` distinct sorted ``k``-subsets of ``names`` in seeded order (all of them when ``n`` >= their count)."""
    rng = random.Random(seed)
    if math.comb(len(names), k) <= _ENUMERATE_LIMIT:
        subsets = list(itertools.combinations(names, k))
        rng.shuffle(subsets)
        return subsets[:n]
    chosen: Dict[Tuple[str, ...], None] = {}
    while len(chosen) < n:
        chosen[tuple(sorted(rng.sample(names, k)))] = None
    return list(chosen)


@dataclasses.dataclass
class TaskImages:
    """A task's images, ready for the model.

    Attributes:
        images, labels: fitting images (N x C x H x W) and their label index into ``class_names``.
        held_images, held_labels: disjoint held-out images of the same classes (may be empty).
        class_names: label names (``task.class_names``).
        true_classes, held_true_classes: each image's own class folder (differs from the label name
            on the 'rest' side of one-vs-rest tasks).
        skipped: unreadable files left out (``skip_bad_images``), each as ``"path (reason)"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    held_images: torch.Tensor
    held_labels: torch.Tensor
    class_names: List[str]
    true_classes: List[str]
    held_true_classes: List[str]
    skipped: List[str] = dataclasses.field(default_factory=list)


def load_task(root: str | Path, task: SweepTask, per_class: int, held_out: int, transform: Preprocess, *,
              all_classes: Sequence[str], seed: int = 0, skip_bad_images: bool = False) -> TaskImages:
    """Read ``per_class`` fitting and ``held_out`` held-out images per label of ``task``.

    Images are picked by a seeded shuffle per class folder (:func:`hookchains.inputs.data.load_image_folder`)
    and split, so fitting and held-out images never overlap. The 'rest' side of a one-vs-rest task
    takes its images from classes drawn uniformly (seeded) among the other classes.

    Example:
        >>> task = plan_tasks(["3", "8", "5"], 1)[0]
        >>> data = load_task("digits/images", task, 10, 10, prep, all_classes=["3", "5", "8"])  # doctest: +SKIP
        >>> data.images.shape[0], data.held_images.shape[0]  # doctest: +SKIP
        (20, 20)
    """
    if per_class < 1 or held_out < 0:
        raise ValueError(f"need per_class >= 1 and held_out >= 0, got {per_class} and {held_out}")
    sides = [[(c, per_class, held_out)] for c in task.classes]
    if task.one_vs_rest:
        sides.append(_rest_draw(task.classes[0], all_classes, per_class, held_out, seed + task.index))
    parts: Dict[str, Tuple[List, List, List]] = {"fit": ([], [], []), "held": ([], [], [])}
    skipped: List[str] = []
    for label, side in enumerate(sides):
        for name, n_fit, n_held in side:
            loaded = load_image_folder(root, [name], n_fit + n_held, transform, seed=seed + task.index,
                                       skip_bad_images=skip_bad_images)
            skipped += loaded.skipped
            for key, rows in (("fit", slice(0, n_fit)), ("held", slice(n_fit, n_fit + n_held))):
                images, labels, names = parts[key]
                images.append(loaded.images[rows])
                labels += [label] * images[-1].shape[0]
                names += [name] * images[-1].shape[0]
    (fit_x, fit_y, fit_names), (held_x, held_y, held_names) = parts["fit"], parts["held"]
    return TaskImages(torch.cat(fit_x), torch.tensor(fit_y), torch.cat(held_x), torch.tensor(held_y, dtype=torch.int64),
                      task.class_names, fit_names, held_names, skipped)


def _rest_draw(positive: str, all_classes: Sequence[str], per_class: int, held_out: int,
               seed: int) -> List[Tuple[str, int, int]]:
    """(class, fitting count, held-out count) for the 'rest' side: each image from a class drawn
    uniformly among the classes other than ``positive``."""
    others = sorted(c for c in all_classes if c != positive)
    rng = random.Random(seed)
    fit, held = Counter(rng.choice(others) for _ in range(per_class)), Counter(rng.choice(others) for _ in range(held_out))
    return [(c, fit[c], held[c]) for c in others if fit[c] + held[c]]


def class_indices(class_names: Sequence[str], outputs: int) -> Optional[List[int]]:
    """Model output index of each class folder when the folders are named by index (``0``, ``1``, ...,
    as for a model trained on those folders), else ``None`` (ground truth then cannot be scored)."""
    if all(n.isdigit() and int(n) < outputs for n in class_names):
        return [int(n) for n in class_names]
    return None
