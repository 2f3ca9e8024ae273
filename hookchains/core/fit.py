"""Learn filter scores and gates on a handful of images: the optimisation of Eq. 8.

One loop serves every recipe (:mod:`hookchains.core.recipes`: ``ste`` (default: unbounded scale), ``mask``,
``l0``, ``paper``): a recipe says how scores enter the forward pass, what the cost is, how values are
projected after each Adam step and when the fit has converged. The loop adapts the KL weight by dual
ascent toward ``kl_target`` (Eq. 8 is the penalty form of the constrained Eq. 2; a fixed ``lam``
trades size for fidelity differently on every model) and records how the fit ended.

Stop rule (all recipes but ``paper``): after ``min_steps``, the fit has *converged* when the kept
filter count moved by at most ``size_tol`` (relative) over the last ``patience`` steps and the
thresholded network is *feasible*: its KL is within ``kl_tol`` and it keeps the top-1 class of at least
``min_agreement`` of the images (default 0.95: 19 of 20; :func:`feasible`). Otherwise it runs to ``steps`` and the result says so:
``config["ended"]`` is ``"converged"`` or ``"step_limit"`` and ``config["kept_change_per_10_steps"]``
the kept count's change (percent per 10 steps) over the last ``patience`` steps;
:meth:`Subnetwork.summary` names a step-limit ending. (The paper's ``|dloss| < 0.05`` fired at step 9
or never; docs/design.md.)

A fit that reaches the step limit returns the sparsest feasible network it met after ``min_steps``
(every step's KL and agreement are those of the thresholded network the step started from, so that
network's fidelity is known exactly), not the last one, which dual ascent leaves hovering around
``kl_target`` and can end just above it; ``config["returned_step"]`` names the step (``None``: the last
network). Networks before ``min_steps`` do not count: they are the start, before the fit has pruned,
and returning one gave back the unpruned network on 3 of the 45 digits pairs whose KL stayed just
above ``kl_tol`` after step 7 (the last network is returned instead, and its summary says its KL is
above ``kl_tol``). This is the
"best feasible iterate" of constrained optimisation; recipes whose recorded KL is not the extracted
network's (``paper``'s soft network, ``l0``'s sampled masks) return the last network as before.

Model weights are frozen and the model is in eval mode for the duration (each module's own flag and
each parameter's ``requires_grad`` restored afterwards, :mod:`hookchains.core.state`): no weight gradient is
ever computed; the seed applies to a forked RNG, so the caller's global RNG state is untouched.
Teacher logits are computed once. Outputs that are not one ``N x classes`` logits tensor (dicts,
probabilities, dense ``N x C x H x W`` predictions) go through :func:`hookchains.inputs.forward.class_scores`:
a dense prediction's KL is taken per position (pixel) over the classes and averaged over positions.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hookchains.core.ablation import ABLATIONS, use_ablation
from hookchains.core.attach import ScoreHooks
from hookchains.core.dataflow import DataflowError, find_dead_filters
from hookchains.core.deprecation import renamed_keyword
from hookchains.core.metrics import fidelity
from hookchains.core.recipes import GATE_BOUND, RECIPES, Recipe, feasible, recipe_named
from hookchains.core.state import explaining, seeded
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.forward import class_scores, map_tensors, primary, stack, validate_inputs

__all__ = ["FitConfig", "PRESETS", "GATE_BOUND", "fit", "fit_tasks", "preset_for", "logits_of", "chunks", "kl_backward",
           "kl_per_task", "fidelity_per_task", "feasible", "Fidelities", "Scored", "KLTerm", "Track", "optimise"]


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`fit` (paper defaults where the paper gives one).

    Attributes:
        steps: maximum optimisation steps (paper: 300).
        lr: Adam learning rate for scores and gate logits (paper: 0.005, the default of a bare
            ``FitConfig()``; :func:`preset_for`, which :func:`fit` uses when no config is given, sets 0.02
            for every recipe but ``paper``).
        lam: weight of ``||S||_1`` (paper: 0.005 for ResNet-50 and VGG-19).
        lam_gate: weight of the gate penalty (paper: 1 for ResNet-50, 2 for VGG-19).
        recipe: a :class:`hookchains.core.recipes.Recipe` or its name (``"mask"``, ``"l0"``, ``"ste"``,
            ``"paper"``; ``"hookchains"`` is a deprecated alias of ``"ste"``); ``None``: the default,
            :func:`hookchains.core.recipes.default_recipe`.
        kl_target: all recipes but ``paper`` (and a ``keep_target``): the KL the sub-network should stay within; the KL term's
            weight adapts (dual ascent) so sparsity is bought only up to this fidelity. ``None``: the
            fixed weighting of Eq. 8.
        kl_rate: how fast that weight adapts (log-space step per step).
        gate_init: initial gate logit ``alpha``; default 0 for recipe ``paper`` (``G = 0.5``), and
            ``2 T`` (``G = 0.88``) for the others, whose rounded gates would otherwise sit on the
            threshold and all close at the first step.
        patience: steps over which the kept count must be settled to stop (module doc).
        size_tol: the relative change of the kept count allowed over ``patience`` steps.
        min_steps: no stop before this step.
        kl_tol: the KL the thresholded network must be within to stop (or to be returned, module doc).
        min_agreement: the share of the images (0-1) whose top-1 class the thresholded network must
            keep to stop or to be returned; while it keeps fewer, the KL weight rises
            (:meth:`~hookchains.core.recipes.Recipe.next_kl_weight`). Default 0.95: 19 of 20 images, since
            1.0 held a digits fit at 19/20 with a steady size until the step limit (one near-tied
            image); 0 gives the KL-only rule.
        loss_tol: recipe ``paper``: stop when ``|loss_t - loss_{t-1}| < loss_tol``.
        batch_size: images per forward pass (gradients are accumulated; default: all at once).
        seed: seeds torch before fitting.
        progress: show a tqdm bar.
        ablation: what a removed filter outputs: ``"zero"`` (the paper) or ``"mean"`` (its mean
            activation on the task images; see :mod:`hookchains.core.ablation`).
    """

    steps: int = 300
    lr: float = 0.005
    lam: float = 0.005
    lam_gate: float = 1.0
    recipe: Union[str, Recipe, None] = None
    kl_target: Optional[float] = 0.1
    kl_rate: float = 0.05
    gate_init: Optional[float] = None
    patience: int = 30
    size_tol: float = 0.01
    min_steps: int = 50
    kl_tol: float = 0.1
    min_agreement: float = 0.95
    loss_tol: float = 0.05
    batch_size: Optional[int] = None
    seed: int = 0
    progress: bool = True
    ablation: str = "zero"

    def __post_init__(self) -> None:
        problems = [f"{n} must be > 0 (got {v})" for n, v in
                    (("steps", self.steps), ("lr", self.lr), ("patience", self.patience)) if v <= 0]
        problems += [f"{n} must be >= 0 (got {v})" for n, v in
                     (("lam", self.lam), ("lam_gate", self.lam_gate), ("kl_tol", self.kl_tol),
                      ("size_tol", self.size_tol)) if v < 0]
        if not 0 <= self.min_agreement <= 1:
            problems.append(f"min_agreement must be a share between 0 and 1 (got {self.min_agreement})")
        if not (self.recipe is None or isinstance(self.recipe, Recipe) or self.recipe in (*RECIPES, "hookchains")):
            problems.append(f"recipe must be one of {sorted(RECIPES)} or a hookchains.core.recipes.Recipe "
                            f"(got {self.recipe!r})")
        if self.batch_size is not None and self.batch_size <= 0:
            problems.append(f"batch_size must be > 0 (got {self.batch_size})")
        if self.ablation not in ABLATIONS:
            problems.append(f"ablation must be one of {ABLATIONS} (got {self.ablation!r})")
        if problems:
            raise ValueError("; ".join(problems))


# Per-family defaults. resnet/vgg: the paper's lam/lam_gate (section 4.1). mobilenet: measured on the
# embedded MobileNetV2 (see CHANGELOG); the others inherit the ResNet values. lr 0.02 for every recipe
# but ``paper`` (which keeps the paper's 0.005, :data:`PAPER_LR`): every recipe figure in
# :mod:`hookchains.core.recipes` was measured at 0.02; at 0.005 a score needs >= 180 of the 300 steps to
# fall from 1 below tau, and the demo pair at 224 px ends at the step limit far above 5 % of the filters.
PRESETS: Dict[str, Dict[str, float]] = {
    "resnet": {"lam": 0.005, "lam_gate": 1.0, "lr": 0.02},
    "vgg": {"lam": 0.005, "lam_gate": 2.0, "lr": 0.02},
    "mobilenet": {"lam": 0.005, "lam_gate": 1.0, "lr": 0.02},
    "vit": {"lam": 0.005, "lam_gate": 1.0, "lr": 0.02},
    "generic": {"lam": 0.005, "lam_gate": 1.0, "lr": 0.02},
    "transformers": {"lam": 0.005, "lam_gate": 0.05, "lr": 0.02},  # measured on all-MiniLM-L6-v2 (issue 14)
}
PAPER_LR = 0.005  # section 4.1


def preset_for(adapter: str, **overrides) -> FitConfig:
    """The :class:`FitConfig` for an adapter family (:data:`PRESETS`), with explicit ``overrides``
    winning; recipe ``paper`` gets the paper's lr 0.005 unless ``lr`` is given.

    Example:
        >>> preset_for("resnet").lr, preset_for("resnet", recipe="paper").lr, preset_for("vgg", lr=0.1).lr
        (0.02, 0.005, 0.1)
    """
    values = dict(PRESETS.get(adapter, PRESETS["generic"]))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if recipe_named(values.get("recipe")).name == "paper" and overrides.get("lr") is None:
        values["lr"] = PAPER_LR
    return FitConfig(**values)


def _device_of(chains: ScoreHooks) -> torch.device:
    return next(chains.model.parameters()).device


def _batch(images, part: slice, layout: torch.memory_format):
    """Examples ``part`` of every task (each input tasks x N x ...) as one batch, images in memory ``layout``."""
    def one(t: torch.Tensor) -> torch.Tensor:
        batch = t[:, part].flatten(0, 1)
        return batch.contiguous(memory_format=layout) if batch.ndim == 4 else batch
    return map_tensors(one, images)


def _input_layout(chains: ScoreHooks, images: torch.Tensor, batch_size: Optional[int]):
    """Channels-last on CPU when the model accepts it (oneDNN's convolutions ran 1.23x faster per
    step on the demo's MobileNetV2, 1.07x on ResNet-18, weights untouched), else the usual layout
    (e.g. a forward that calls ``.view`` on a featuremap). Returns (layout, teacher logits)."""
    if primary(images).device.type == "cpu" and primary(images).ndim == 5:
        try:
            return torch.channels_last, _tasks_logits(chains, images, "off", batch_size, torch.channels_last)
        except RuntimeError:
            pass
    return torch.contiguous_format, _tasks_logits(chains, images, "off", batch_size)


def _tasks_kl_backward(chains: ScoreHooks, images, teacher_logp: torch.Tensor, parts: Sequence[slice],
                       weights: torch.Tensor, layout: torch.memory_format = torch.contiguous_format) -> Fidelities:
    """Mean KL and top-1 agreement per task (``images``: tasks x N x ...; ``teacher_logp``: tasks x N x
    classes, or tasks x N x P x classes for a dense prediction, whose figures are averaged over the P
    positions); backpropagates ``sum_t weights[t] * KL_t`` chunk by chunk (a chunk takes the same
    images of every task)."""
    tasks, n = primary(images).shape[:2]
    totals = torch.zeros(2, tasks, dtype=torch.float64)
    for part in parts:
        target = teacher_logp[:, part]
        scores = class_scores(chains.forward(_batch(images, part, layout)), chains.sites.output)
        logq = F.log_softmax(scores, -1).reshape(target.shape)
        kl = F.kl_div(logq, target, log_target=True, reduction="none").sum(-1)
        kl = kl.reshape(tasks, kl.shape[1], -1).mean(-1).sum(1) / n
        (weights.to(kl.device) * kl).sum().backward()
        totals[0] += kl.detach().cpu().double()
        totals[1] += _agreeing(logq.detach(), target).sum(1).cpu().double() / n
    return totals[0].tolist(), totals[1].tolist()


def _agreeing(logq: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """tasks x N: the share of each image's positions (1 for a classifier) whose top-1 class is the teacher's."""
    same = logq.argmax(-1) == teacher_logp.argmax(-1)
    return same.reshape(*same.shape[:2], -1).double().mean(-1)


def kl_backward(chains: ScoreHooks, images, teacher_logp, parts: Sequence[slice], weight: float) -> float:
    """Mean KL over the images of one task; backpropagates ``weight * KL`` part by part (see :func:`chunks`).

    ``images``: N x ... (or a tuple/dict of inputs); ``teacher_logp``: N x classes (N x P x classes
    for a dense prediction) log-probabilities; returns the KL in nats."""
    return _tasks_kl_backward(chains, map_tensors(lambda t: t[None], images), teacher_logp[None], parts,
                              torch.tensor([weight]))[0][0]


class Scored(Protocol):
    """What :func:`optimise` needs of the hooks that hold the scores: :class:`ScoreHooks` (filters),
    :class:`hookchains.tokens.fit.TokenScores` (tokens). The recipe reads and writes the scores themselves."""

    tau: float

    @property
    def task_count(self) -> int: ...

    def using(self, masking: str, /) -> ContextManager[Any]: ...

    def per_task(self, values: torch.Tensor) -> torch.Tensor: ...

    def kept_counts(self, task: int = 0) -> Mapping[str, float]: ...


Fidelities = Tuple[List[float], List[float]]
"""Per task: the mean KL (nats) and the top-1 agreement (share of images, 0-1) with the original model."""


@dataclass(frozen=True)
class KLTerm:
    """The KL part of the objective, for :func:`optimise`.

    Attributes:
        backward: ``weights`` (one per task) -> every task's mean KL (nats) and top-1 agreement
            (:data:`Fidelities`), after backpropagating ``sum_t weights[t] * KL_t`` (Eq. 8's first term, weighted).
        hard: the same figures of the thresholded (``hard``) network, without gradients
            (:func:`fidelity_per_task`).
    """

    backward: Callable[[torch.Tensor], Fidelities]
    hard: Callable[[], Fidelities]


@dataclass
class Track:
    """One task's bookkeeping during the optimisation: its history, KL weight and stop rule."""

    history: Dict[str, List[float]] = dataclasses.field(
        default_factory=lambda: {k: [] for k in ("loss", "kl", "agreement", "kl_weight")})
    kl_weight: float = 1.0
    stopped: bool = False
    counted: List[str] = dataclasses.field(default_factory=list)
    sparsest: Optional[Tuple[float, int, List[torch.Tensor]]] = None  # kept count, step, values
    returned_step: Optional[int] = None  # the step whose network the fit returns (None: the last)

    def remember(self, kept: float, fidelities: Tuple[float, float], values: List[torch.Tensor], cfg: FitConfig) -> None:
        """Keep ``values`` (this task's fitted tensors before the step) if that network, whose (KL, top-1
        agreement) were ``fidelities``, was :func:`feasible`, came after ``min_steps`` and is the sparsest
        so far (ties: the later)."""
        step = len(self.history["kl"])
        sparser = self.sparsest is None or kept <= self.sparsest[0]
        if step >= cfg.min_steps and feasible(*fidelities, cfg) and sparser:
            self.sparsest = (kept, step, values)

    def record(self, recipe: Recipe, cfg: FitConfig, fidelities: Tuple[float, float], penalty: float,
               kept: Mapping[str, float]) -> None:
        """Log one step (loss, KL, top-1 agreement, KL weight and every kept count), adapt the KL weight,
        and decide whether this task has converged."""
        self.counted = list(kept)
        kl, agreement = fidelities
        for name, value in (("loss", kl + penalty), ("kl", kl), ("agreement", agreement),
                            ("kl_weight", self.kl_weight), *kept.items()):
            self.history.setdefault(name, []).append(value)
        self.kl_weight = recipe.next_kl_weight(self.kl_weight, kl, cfg, agreement)
        self.stopped = recipe.converged(cfg, self.history)

    def ending(self, cfg: FitConfig, counted: str = "filters") -> Dict[str, object]:
        """How the fit ended: ``converged`` or ``step_limit``, and the kept count's relative change
        per 10 steps (percent) over the last ``patience`` steps."""
        kept = self.history[counted]
        span = min(cfg.patience, len(kept) - 1)
        change = 100.0 * (kept[-1] - kept[-1 - span]) / max(kept[-1 - span], 1) * 10 / span if span else 0.0
        return {"ended": "converged" if self.stopped else "step_limit", "kept_change_per_10_steps": round(change, 3),
                "returned_step": self.returned_step}



def _step(hooks: Scored, recipe: Recipe, optimiser, kl: KLTerm, tracks: List[Track], cfg: FitConfig):
    """One Adam step for every task; a converged task's values are put back, so it ends exactly
    where it would have ended alone. Returns the per-task (KL, top-1 agreement) and penalty."""
    params = [p for group in optimiser.param_groups for p in group["params"]]
    frozen = [i for i, t in enumerate(tracks) if t.stopped]
    saved = [hooks.per_task(p).detach()[frozen].clone() for p in params] if frozen else []
    optimiser.zero_grad(set_to_none=True)
    kls = kl.backward(torch.tensor([t.kl_weight for t in tracks]))
    penalty = recipe.penalty(hooks, cfg)
    penalty.sum().backward()
    optimiser.step()
    with torch.no_grad():
        for p, values in zip(params, saved):
            hooks.per_task(p)[frozen] = values
    recipe.project(hooks, cfg)
    if recipe.stochastic:  # record the KL of the network that will be extracted
        kls = kl.hard()
    return list(zip(*kls)), penalty.detach().cpu().tolist()


def kl_per_task(scores: torch.Tensor, teacher_logp: torch.Tensor) -> List[float]:
    """Mean KL(teacher || student) per task, in nats (``scores``: tasks x N x classes class scores,
    ``teacher_logp`` the teacher's log-probabilities of the same shape; tasks x N x P x classes for a
    dense prediction, averaged over the P positions as in :func:`kl_backward`).

    Example:
        >>> kl_per_task(torch.zeros(1, 2, 3), torch.log_softmax(torch.zeros(1, 2, 3), -1))
        [0.0]
    """
    kl = F.kl_div(F.log_softmax(scores, -1), teacher_logp, log_target=True, reduction="none").sum(-1)
    return kl.reshape(*kl.shape[:2], -1).mean(-1).mean(-1).double().cpu().tolist()


def fidelity_per_task(scores: torch.Tensor, teacher_logp: torch.Tensor) -> Fidelities:
    """Per task, the mean KL (:func:`kl_per_task`) and the top-1 agreement: the share of images (of
    positions, averaged per image, for a dense prediction) whose top-1 class is the teacher's.

    Example:
        >>> fidelity_per_task(torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]), torch.log_softmax(torch.eye(2)[None], -1))[1]
        [1.0]
    """
    return kl_per_task(scores, teacher_logp), _agreeing(scores, teacher_logp).mean(-1).cpu().tolist()


def _confirm(recipe: Recipe, kl: KLTerm, tracks: Dict[int, Track], cfg: FitConfig) -> None:
    """A task about to stop is checked on the network it ends with (the KL recorded in a step is that
    of the network before the step's update): it keeps running unless that network is :func:`feasible`."""
    if recipe.confirms and any(t.stopped for t in tracks.values()):
        final, agreement = kl.hard()
        for index, track in tracks.items():
            track.stopped = track.stopped and feasible(final[index], agreement[index], cfg)


def optimise(hooks: Scored, recipe: Recipe, kl: KLTerm, cfg: FitConfig, desc: str = "fit") -> List[Track]:
    """Adam on the recipe's objective (``KL`` weighted per task + the recipe's penalty) for every task
    at once until each has converged by the recipe's stop rule (or ``cfg.steps``): the one loop of the
    filter fit (:func:`fit`) and the token fit (:func:`hookchains.tokens.fit.fit_tokens`). The KL weight
    follows :meth:`Recipe.next_kl_weight`; a tqdm bar named ``desc`` shows the loss, KL and kept counts.

    Returns one :class:`Track` per task (``history``: per-step loss, KL in nats, KL weight, kept counts).

    Example (what :func:`fit` does around it: eval mode, frozen weights, a seed):
        >>> import hookchains, timm, torch
        >>> from hookchains.core.recipes import Ste
        >>> model, x = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(2, 3, 32, 32)
        >>> hooks = hookchains.attach(model)
        >>> teacher = torch.log_softmax(logits_of(hooks, x, "off"), -1)
        >>> kl = KLTerm(lambda w: ([kl_backward(hooks, x, teacher, chunks(2, None), float(w[0]))], [1.0]),
        ...             lambda: fidelity_per_task(logits_of(hooks, x, "hard")[None], teacher[None]))
        >>> track = optimise(hooks, Ste(), kl, FitConfig(steps=3, progress=False))[0]
        >>> len(track.history["kl"]), sorted(track.counted)
        (3, ['filters', 'gates', 'layers'])
    """
    optimiser = torch.optim.Adam(recipe.start(hooks, cfg), lr=cfg.lr)
    params = [p for group in optimiser.param_groups for p in group["params"]]
    tracks = [Track() for _ in range(hooks.task_count)]
    bar = tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress, leave=False)
    try:
        with hooks.using(recipe.masking):
            for _ in bar:
                running = [i for i, t in enumerate(tracks) if not t.stopped]
                before = _starting_points(hooks, recipe, params, running)
                kls, penalties = _step(hooks, recipe, optimiser, kl, tracks, cfg)
                for i in running:
                    if i in before:
                        tracks[i].remember(before[i][0], kls[i], before[i][1], cfg)
                    tracks[i].record(recipe, cfg, kls[i], penalties[i], hooks.kept_counts(i))
                _confirm(recipe, kl, {i: tracks[i] for i in running}, cfg)
                bar.set_postfix(_progress(tracks, recipe.counted))
                if all(t.stopped for t in tracks):
                    break
            _return_sparsest(hooks, recipe, kl, params, tracks, cfg)
    finally:
        bar.close()
        recipe.finish(hooks)
    return tracks


def _starting_points(hooks: Scored, recipe: Recipe, params: List[torch.Tensor],
                     running: List[int]) -> Dict[int, Tuple[float, List[torch.Tensor]]]:
    """Per running task, the kept count and a copy of the fitted values the coming step starts from
    (whose KL that step measures); empty for recipes whose recorded KL is not the extracted network's."""
    if not recipe.confirms or recipe.stochastic:
        return {}
    with torch.no_grad():
        return {i: (hooks.kept_counts(i)[recipe.counted], [hooks.per_task(p)[i].detach().clone() for p in params])
                for i in running}


def _return_sparsest(hooks: Scored, recipe: Recipe, kl: KLTerm, params: List[torch.Tensor], tracks: List[Track],
                     cfg: FitConfig) -> None:
    """A task that ran to the step limit gets its sparsest :func:`feasible` network back (module doc)
    unless its last network is feasible and at least as sparse."""
    ended = {i: t.sparsest for i, t in enumerate(tracks) if not t.stopped and t.sparsest is not None}
    if not ended:
        return
    final, agreement = kl.hard()
    with torch.no_grad():
        for i, (kept, step, values) in ended.items():
            if feasible(final[i], agreement[i], cfg) and hooks.kept_counts(i)[recipe.counted] <= kept:
                continue
            for p, value in zip(params, values):
                hooks.per_task(p)[i] = value
            tracks[i].returned_step = step
    recipe.project(hooks, cfg)


def _progress(tracks: List[Track], counted: str) -> Dict[str, str]:
    """Progress-bar figures: the task's own for one task, means and the number running for several."""
    means = {key: sum(t.history[key][-1] for t in tracks) / len(tracks) for key in ("loss", "kl", counted)}
    figures = {"loss": f"{means['loss']:.3f}", "kl": f"{means['kl']:.3f}", counted: f"{means[counted]:.0f}"}
    if len(tracks) == 1:
        figures.update({k: f"{tracks[0].history[k][-1]:.0f}" for k in tracks[0].counted if k != counted})
    else:
        figures["running"] = str(sum(not t.stopped for t in tracks))
    return figures


def chunks(n: int, batch_size: Optional[int]) -> List[slice]:
    """Slices cutting ``n`` rows into batches of at most ``batch_size`` (``None``: one batch).

    Example:
        >>> chunks(5, 2)
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    size = batch_size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def _tasks_logits(chains: ScoreHooks, images, masking: str, batch_size: Optional[int],
                  layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Class scores (tasks x N x classes, or tasks x N x P x classes for a dense prediction;
    :func:`hookchains.inputs.forward.class_scores`) of the hooked model on ``images`` (tasks x N x ...) in ``masking``."""
    tasks, n = primary(images).shape[:2]
    with chains.using(masking):
        parts = [class_scores(chains.forward(_batch(images, p, layout)), chains.sites.output)
                 for p in chunks(n, batch_size)]
    return torch.cat([part.view(tasks, -1, *part.shape[1:]) for part in parts], 1)


@renamed_keyword(mode="masking")
def logits_of(chains: ScoreHooks, images, masking: str, batch_size: Optional[int] = None) -> torch.Tensor:
    """Class scores of the hooked model on ``images`` with the hooks in ``masking`` (no gradients)."""
    return _tasks_logits(chains, map_tensors(lambda t: t[None], images), masking, batch_size)[0]


def fit(chains: ScoreHooks, images: torch.Tensor, config: Optional[FitConfig] = None, **options) -> Subnetwork:
    """Learn filter scores and gates so the thresholded network keeps the model's outputs (Eq. 8).

    Args:
        chains: hooks from :func:`hookchains.core.attach`.
        images: the task's images, N x C x H x W (or N x C x L signals, N x C x D x H x W volumes),
            preprocessed like the model's training data; a tuple/dict of inputs for a model with
            several (:mod:`hookchains.inputs.forward`), the same N in each.
        config: a :class:`FitConfig`; default: the preset of the chains' adapter family.
        **options: any :class:`FitConfig` field, overriding ``config`` (e.g. ``steps=100``).

    Returns:
        the :class:`Subnetwork` after thresholding, with fidelity measured on the thresholded network.

    Example:
        >>> import hookchains, timm, torch
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> chains = hookchains.attach(model)
        >>> result = fit(chains, images, steps=3, lam=0.01, progress=False)   # real fits: ~300 steps
        >>> print(result.summary())
        retains .../15 layers and .../1040 filters (...), .../2 gated blocks; top-1 agreement .../4; KL ...
    """
    if chains.tasks is not None:
        raise ValueError(f"these chains hold {chains.tasks} tasks: use hookchains.core.fit.fit_tasks(chains, [images, ...])")
    return _fit(chains, [images], config, options)[0]


def fit_tasks(chains: ScoreHooks, tasks: Sequence[torch.Tensor], config: Optional[FitConfig] = None,
              **options) -> List[Subnetwork]:
    """Fit several tasks in one forward pass per step: each task has its own scores and gates,
    applied to its own images by task index (``attach(model, tasks=len(tasks))``).

    Each task's optimisation is independent of the others' (its own KL term, KL weight, Adam
    moments and stop rule; a converged task is frozen where it stopped), so the results equal
    :func:`fit` run task by task, up to floating-point reassociation in the batched convolutions.
    The point is throughput: on a GPU one forward over ``T x N`` images costs far less than ``T``
    forwards over ``N``.

    Args:
        chains: ``hookchains.attach(model, tasks=T)``.
        tasks: ``T`` image tensors, each ``N x C x H x W`` (the same ``N`` for all).
        config, **options: as for :func:`fit` (shared by all tasks).

    Example:
        >>> import hookchains, timm, torch
        >>> model = timm.create_model("test_resnet", num_classes=2).eval()
        >>> images_a, images_b, images_c = torch.randn(3, 4, 3, 32, 32)
        >>> chains = hookchains.attach(model, tasks=3)
        >>> subs = fit_tasks(chains, [images_a, images_b, images_c], steps=3, progress=False)
        >>> [s.counts()["filters_total"] for s in subs]
        [1040, 1040, 1040]
    """
    if len(tasks) != chains.task_count or chains.tasks is None:
        raise ValueError(f"these chains hold {chains.tasks or 1} task(s) but {len(tasks)} image sets were given: "
                         f"attach with hookchains.attach(model, tasks={len(tasks)})")
    shapes = [str(map_tensors(lambda t: tuple(t.shape), t)) for t in tasks]
    if len(set(shapes)) != 1:
        raise ValueError(f"every task needs images of the same shape and count, got {shapes}")
    return _fit(chains, list(tasks), config, options)


def _fit(chains: ScoreHooks, tasks: List[torch.Tensor], config: Optional[FitConfig], options: Dict) -> List[Subnetwork]:
    for images in tasks:
        validate_inputs(images, len(chains.sites.input_shape))
    if not chains.attached:
        raise RuntimeError("these chains were detached; call hookchains.attach(model) again")
    preset = preset_for(chains.sites.adapter, recipe=options.get("recipe"), lr=options.get("lr"))
    cfg = dataclasses.replace(config or preset, **options)
    device = _device_of(chains)
    images = map_tensors(lambda t: t.to(device), stack(tasks))
    recipe = recipe_named(cfg.recipe)
    if cfg.ablation != "zero" and recipe.masking == "recipe":
        raise ValueError(f"{cfg.ablation} ablation works with the recipes that threshold the scores (ste, paper), "
                         f"not {recipe.name!r}: use ablation='zero' or recipe='ste'")
    # nearly closed soft gates (G ~ 1e-40) would make CPU steps crawl: denormals flushed meanwhile
    with seeded(cfg.seed, device), explaining(chains.model, flush_denormal=True):
        use_ablation(chains, cfg.ablation, [map_tensors(lambda t: t.to(device), task) for task in tasks])
        layout, teacher = _input_layout(chains, images, cfg.batch_size)
        teacher_logp, parts = F.log_softmax(teacher, -1), chunks(primary(images).shape[1], cfg.batch_size)
        kl = KLTerm(lambda weights: _tasks_kl_backward(chains, images, teacher_logp, parts, weights, layout),
                    lambda: fidelity_per_task(_tasks_logits(chains, images, "hard", cfg.batch_size, layout), teacher_logp))
        tracks = optimise(chains, recipe, kl, cfg)
        student = _tasks_logits(chains, images, "hard", cfg.batch_size, layout)
    if any(math.isnan(v) for t in tracks for v in t.history["loss"]):
        raise FloatingPointError("the loss became NaN during fitting; lower lr or check the images")
    return [_result(chains, recipe, i, track, teacher[i], student[i], cfg) for i, track in enumerate(tracks)]


def _result(chains: ScoreHooks, recipe: Recipe, task: int, track: Track, teacher: torch.Tensor,
            student: torch.Tensor, cfg: FitConfig) -> Subnetwork:
    scores, gates = chains.task_state(task)
    options = recipe.to_json()
    config = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, "recipe": options.pop("name"),
              "recipe_options": options, "steps_run": len(track.history["loss"]), **track.ending(cfg, recipe.counted)}
    sub = Subnetwork(chains.sites, scores, gates, chains.tau, chains.temperature,
                     fidelity(teacher.cpu(), student.cpu()), config, track.history,
                     importance=recipe.importance(chains, task), ablation=cfg.ablation,
                     means={k: v.clone() for k, v in chains.means.items()})
    with chains.using("off"):  # the fit's own hooks must not act twice
        try:
            sub.dead_filters = find_dead_filters(sub, chains.model)
        except DataflowError:
            pass  # connections unknown: dead_filters stays None ("not determined")
    return sub
