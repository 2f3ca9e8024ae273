"""Learn filter scores and gates on a handful of images: the optimisation of Eq. 8.

Two recipes share one loop:

``recipe="paper"`` -- exactly section 3.2/4.1: the soft network (``S`` in [0, 1], ``G`` in (0, 1)),
loss ``mean KL + lam * ||S||_1 + lam_gate * sum(alpha)``, Adam, stop when the loss changes by less
than ``0.05`` between steps; thresholding happens only afterwards.

``recipe="hookchains"`` (default) -- the same objective made well-posed (docs/design.md measured why the
paper's is not): (1) the forward pass is the *thresholded* network (``S * [S >= tau]``, ``G`` rounded)
with straight-through gradients, so what is optimised is what is extracted and there is no soft/hard
gap; (2) the gate penalty is ``lam_gate * sum(G)``, which is bounded below (``sum(alpha)`` is not, so
with ``lam_gate >= 1`` every gate closed and the loss went negative); (3) Eq. 8 is the penalty form of the constrained Eq. 2, and a fixed ``lam`` trades size for
fidelity differently on every model; with ``kl_target`` the KL weight adapts by dual ascent so the
sparsest network within that KL is sought; (4) gate logits stay within ``|alpha/T| <= 4`` so a closed gate keeps a gradient and can reopen
(with ``T = 0.2`` the paper's gates saturated and stayed shut); (5) convergence means the kept
set has not changed for ``patience`` steps, the loss moved by less than ``loss_tol`` over them, and the
KL is at most ``kl_tol`` (the paper's step-to-step ``|dloss| < 0.05`` fired at step 9 or never).

Model weights are frozen for the duration (``requires_grad_(False)``; restored afterwards): no weight
gradient is ever computed. Teacher logits are computed once.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hookchains.core.attach import ScoreHooks
from hookchains.core.dataflow import DataflowError, find_dead_filters
from hookchains.core.metrics import fidelity
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.data import validate_images

# recipe "hookchains" keeps |alpha / T| <= GATE_BOUND: the forward pass uses the rounded gate, and a
# saturated sigmoid would make a closed gate's gradient vanish so it could never reopen.
GATE_BOUND = 4.0

__all__ = ["FitConfig", "PRESETS", "fit", "fit_tasks", "preset_for", "logits_of", "chunks", "kl_backward",
           "next_kl_weight", "stopped"]


@dataclass(frozen=True)
class FitConfig:
    """Options of :func:`fit` (paper defaults where the paper gives one).

    Attributes:
        steps: maximum optimisation steps (paper: 300).
        lr: Adam learning rate for scores and gate logits (paper: 0.005).
        lam: weight of ``||S||_1`` (paper: 0.005 for ResNet-50 and VGG-19).
        lam_gate: weight of the gate penalty (paper: 1 for ResNet-50, 2 for VGG-19).
        recipe: ``"hookchains"`` (default, see module doc) or ``"paper"``.
        kl_target: recipe ``hookchains``: the KL the sub-network should stay within; the KL term's
            weight adapts (dual ascent) so sparsity is bought only up to this fidelity. ``None``: the
            fixed weighting of Eq. 8.
        kl_rate: how fast that weight adapts (log-space step per step).
        gate_init: initial gate logit ``alpha``; default 0 for recipe ``paper`` (``G = 0.5``), and
            ``2 T`` (``G = 0.88``) for ``hookchains``, whose rounded gates would otherwise sit on the
            threshold and all close at the first step.
        patience: steps the kept set must stay unchanged to stop (recipe ``hookchains``).
        min_steps: no stop before this step.
        kl_tol: the KL the thresholded network must be within to stop (recipe ``hookchains``).
        loss_tol: recipe ``paper``: stop when ``|loss_t - loss_{t-1}| < loss_tol``; recipe
            ``hookchains``: the loss must move less than this over the last ``patience`` steps.
        batch_size: images per forward pass (gradients are accumulated; default: all at once).
        seed: seeds torch before fitting.
        progress: show a tqdm bar.
    """

    steps: int = 300
    lr: float = 0.005
    lam: float = 0.005
    lam_gate: float = 1.0
    recipe: str = "hookchains"
    kl_target: Optional[float] = 0.1
    kl_rate: float = 0.05
    gate_init: Optional[float] = None
    patience: int = 30
    min_steps: int = 50
    kl_tol: float = 0.1
    loss_tol: float = 0.05
    batch_size: Optional[int] = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        problems = [f"{n} must be > 0 (got {v})" for n, v in
                    (("steps", self.steps), ("lr", self.lr), ("patience", self.patience)) if v <= 0]
        problems += [f"{n} must be >= 0 (got {v})" for n, v in
                     (("lam", self.lam), ("lam_gate", self.lam_gate), ("kl_tol", self.kl_tol)) if v < 0]
        if self.recipe not in ("hookchains", "paper"):
            problems.append(f"recipe must be 'hookchains' or 'paper' (got {self.recipe!r})")
        if self.batch_size is not None and self.batch_size <= 0:
            problems.append(f"batch_size must be > 0 (got {self.batch_size})")
        if problems:
            raise ValueError("; ".join(problems))


# Per-family defaults. resnet/vgg: the paper's lam/lam_gate (section 4.1). mobilenet: measured on the
# embedded MobileNetV2 (see CHANGELOG); the others inherit the ResNet values.
PRESETS: Dict[str, Dict[str, float]] = {
    "resnet": {"lam": 0.005, "lam_gate": 1.0},
    "vgg": {"lam": 0.005, "lam_gate": 2.0},
    "mobilenet": {"lam": 0.005, "lam_gate": 1.0},
    "vit": {"lam": 0.005, "lam_gate": 1.0},
    "generic": {"lam": 0.005, "lam_gate": 1.0},
}


def preset_for(adapter: str, **overrides) -> FitConfig:
    """The :class:`FitConfig` for an adapter family, with explicit ``overrides`` winning."""
    values = dict(PRESETS.get(adapter, PRESETS["generic"]))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return FitConfig(**values)


def _penalties(chains: ScoreHooks, cfg: FitConfig) -> torch.Tensor:
    """Per task: ``lam * ||S||_1 + lam_gate * sum(alpha)`` (paper) or, recipe ``hookchains``, the same
    with each score's L1 weighted by its gate's hard value (the filters of a removed block cost nothing
    and are not counted, so they keep their values and the block can come back) and ``sum(G)`` for
    the gates. Returns one value per task (the tasks' penalties are independent)."""
    per, zero = chains.per_task, torch.zeros(chains.task_count, device=_device_of(chains))
    if cfg.recipe == "paper":
        l1 = sum((per(s).abs().sum(-1) for s in chains.scores.values()), zero)
        return cfg.lam * l1 + cfg.lam_gate * sum((per(a) for a in chains.gate_logits.values()), zero)
    gate_of = {f: g.name for g in chains.sites.gates for f in g.filter_sites}
    l1 = sum((per(s).abs().sum(-1) * (per(chains.gate_values(gate_of[n], "ste")) if n in gate_of else 1.0)
              for n, s in chains.scores.items()), zero)
    gates = sum((per(chains.gate_values(n, "soft")) for n in chains.gate_logits), zero)
    return cfg.lam * l1 + cfg.lam_gate * gates


def _device_of(chains: ScoreHooks) -> torch.device:
    return next(chains.model.parameters()).device


def _batch(images: torch.Tensor, part: slice, layout: torch.memory_format) -> torch.Tensor:
    """Images ``part`` of every task (tasks x N x ...) as one batch in memory ``layout``."""
    batch = images[:, part].flatten(0, 1)
    return batch.contiguous(memory_format=layout) if batch.ndim == 4 else batch


def _input_layout(chains: ScoreHooks, images: torch.Tensor, batch_size: Optional[int]):
    """Channels-last on CPU when the model accepts it (oneDNN's convolutions ran 1.23x faster per
    step on the demo's MobileNetV2, 1.07x on ResNet-18, weights untouched), else the usual layout
    (e.g. a forward that calls ``.view`` on a featuremap). Returns (layout, teacher logits)."""
    if images.device.type == "cpu" and images.ndim == 5:
        try:
            return torch.channels_last, _tasks_logits(chains, images, "off", batch_size, torch.channels_last)
        except RuntimeError:
            pass
    return torch.contiguous_format, _tasks_logits(chains, images, "off", batch_size)


def _tasks_kl_backward(model, images: torch.Tensor, teacher_logp: torch.Tensor, parts: Sequence[slice],
                       weights: torch.Tensor, layout: torch.memory_format = torch.contiguous_format) -> List[float]:
    """Mean KL per task (``images``: tasks x N x ...; ``teacher_logp``: tasks x N x classes);
    backpropagates ``sum_t weights[t] * KL_t`` chunk by chunk (a chunk takes the same images of every task)."""
    tasks, count = images.shape[:2]
    totals = torch.zeros(tasks, dtype=torch.float64)
    for part in parts:
        logq = F.log_softmax(model(_batch(images, part, layout)).float(), -1)
        kl = F.kl_div(logq.view(tasks, -1, logq.shape[-1]), teacher_logp[:, part], log_target=True,
                      reduction="none").sum((1, 2)) / count
        (weights.to(kl.device) * kl).sum().backward()
        totals += kl.detach().cpu().double()
    return totals.tolist()


def kl_backward(model, images, teacher_logp, parts: Sequence[slice], weight: float) -> float:
    """Mean KL over the images of one task; backpropagates ``weight * KL`` part by part (see :func:`chunks`).

    ``images``: N x ...; ``teacher_logp``: N x classes log-probabilities; returns the KL in nats."""
    return _tasks_kl_backward(model, images[None], teacher_logp[None], parts, torch.tensor([weight]))[0]


def next_kl_weight(weight: float, kl: float, cfg: FitConfig) -> float:
    """Dual ascent on the KL multiplier of the constrained problem ``min ||S||_1 s.t. KL <= kl_target``
    (Eq. 2 with a tolerance): the weight grows while the KL is above target and shrinks below it."""
    if cfg.kl_target is None or cfg.recipe == "paper":
        return weight
    step = max(-1.0, min(1.0, kl / cfg.kl_target - 1.0))
    return float(min(1e4, max(1.0, weight * math.exp(cfg.kl_rate * step))))


def stopped(cfg: FitConfig, history: Dict[str, List[float]], stable_for: int) -> bool:
    """Whether a fit with ``history`` (per-step ``loss``, ``kl``) has converged under ``cfg``'s recipe:
    ``paper``: |loss change| < ``loss_tol``; otherwise the kept set stable for ``patience`` steps with the
    loss settled and the KL within ``kl_tol``."""
    step = len(history["loss"])
    if cfg.recipe == "paper":
        return step >= 2 and abs(history["loss"][-1] - history["loss"][-2]) < cfg.loss_tol
    if step < max(cfg.min_steps, cfg.patience + 1) or stable_for < cfg.patience:
        return False
    settled = abs(history["loss"][-1] - history["loss"][-1 - cfg.patience]) < cfg.loss_tol
    return settled and history["kl"][-1] <= cfg.kl_tol


def _initialise(chains: ScoreHooks, cfg: FitConfig) -> None:
    """Every fit starts from the original network: ``S = 1`` (section 3.2) and gates at ``gate_init``."""
    default = 0.0 if cfg.recipe == "paper" else 2.0 * chains.temperature
    alpha = default if cfg.gate_init is None else cfg.gate_init
    with torch.no_grad():
        for s in chains.scores.values():
            s.fill_(1.0)
        for a in chains.gate_logits.values():
            a.fill_(alpha)


@dataclass
class _Track:
    """One task's bookkeeping during the optimisation: its history, KL weight and stop rule."""

    history: Dict[str, List[float]] = dataclasses.field(
        default_factory=lambda: {k: [] for k in ("loss", "kl", "filters", "gates", "kl_weight")})
    kl_weight: float = 1.0
    stable_for: int = 0
    last_kept: Optional[int] = None
    stopped: bool = False
    layers: int = 0

    def record(self, cfg: FitConfig, kl: float, penalty: float, kept: Dict[str, int], key: int) -> None:
        """Log one step, adapt the KL weight, and decide whether this task has converged."""
        for name, value in (("loss", kl + penalty), ("kl", kl), ("filters", kept["filters"]),
                            ("gates", kept["gates"]), ("kl_weight", self.kl_weight)):
            self.history[name].append(value)
        self.layers = kept["layers"]
        self.kl_weight = next_kl_weight(self.kl_weight, kl, cfg)
        self.stable_for = self.stable_for + 1 if key == self.last_kept else 0
        self.last_kept = key
        self.stopped = stopped(cfg, self.history, self.stable_for)


def _step(chains: ScoreHooks, optimiser, images, teacher_logp, parts, tracks: List[_Track], cfg: FitConfig, layout):
    """One Adam step for every task; a converged task's values are put back, so it ends exactly
    where it would have ended alone. Returns the per-task KL and penalty."""
    frozen = [i for i, t in enumerate(tracks) if t.stopped]
    saved = [chains.per_task(p).detach()[frozen].clone() for p in chains.parameters()] if frozen else []
    optimiser.zero_grad(set_to_none=True)
    kls = _tasks_kl_backward(chains.model, images, teacher_logp, parts,
                             torch.tensor([t.kl_weight for t in tracks]), layout)
    penalty = _penalties(chains, cfg)
    penalty.sum().backward()
    optimiser.step()
    chains.clamp_(None if cfg.recipe == "paper" else GATE_BOUND * chains.temperature)
    with torch.no_grad():
        for p, values in zip(chains.parameters(), saved):
            chains.per_task(p)[frozen] = values
    return kls, penalty.detach().cpu().tolist()


def _optimise(chains: ScoreHooks, images: torch.Tensor, teacher_logp: torch.Tensor, cfg: FitConfig,
              layout: torch.memory_format) -> List[_Track]:
    """Adam on Eq. 8 for every task at once until each has converged (or ``cfg.steps``)."""
    _initialise(chains, cfg)
    parts = chunks(images.shape[1], cfg.batch_size)
    optimiser = torch.optim.Adam(list(chains.parameters()), lr=cfg.lr)
    tracks = [_Track() for _ in range(chains.task_count)]
    bar = tqdm(range(cfg.steps), desc="fit", disable=not cfg.progress, leave=False)
    with chains.using("soft" if cfg.recipe == "paper" else "ste"):
        for _ in bar:
            kls, penalties = _step(chains, optimiser, images, teacher_logp, parts, tracks, cfg, layout)
            keys = _kept_keys(chains)
            for i, track in enumerate(tracks):
                if not track.stopped:
                    track.record(cfg, kls[i], penalties[i], chains.kept_counts(i), keys[i])
            bar.set_postfix(_progress(tracks))
            if all(t.stopped for t in tracks):
                break
    bar.close()
    return tracks


def _progress(tracks: List[_Track]) -> Dict[str, str]:
    """Progress-bar figures: the task's own for one task, means and the number running for several."""
    means = {key: sum(t.history[key][-1] for t in tracks) / len(tracks) for key in ("loss", "kl", "filters")}
    figures = {"loss": f"{means['loss']:.3f}", "kl": f"{means['kl']:.3f}", "filters": f"{means['filters']:.0f}"}
    if len(tracks) == 1:
        figures.update(layers=str(tracks[0].layers), gates=str(tracks[0].history["gates"][-1]))
    else:
        figures["running"] = str(sum(not t.stopped for t in tracks))
    return figures


def _kept_keys(chains: ScoreHooks) -> List[int]:
    """Per task, a hash of which filters and gates are kept right now."""
    with torch.no_grad():
        bits = [chains.per_task(s) >= chains.tau for s in chains.scores.values()]
        bits += [chains.per_task(a).reshape(-1, 1) >= 0 for a in chains.gate_logits.values()]
        if not bits:
            return [0] * chains.task_count
        return [hash(row.tobytes()) for row in torch.cat(bits, 1).cpu().numpy()]


def chunks(n: int, batch_size: Optional[int]) -> List[slice]:
    """Slices cutting ``n`` rows into batches of at most ``batch_size`` (``None``: one batch).

    Example:
        >>> chunks(5, 2)
        [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    size = batch_size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def _tasks_logits(chains: ScoreHooks, images: torch.Tensor, mode: str, batch_size: Optional[int],
                  layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Logits (tasks x N x classes) of the hooked model on ``images`` (tasks x N x ...) in ``mode``."""
    with chains.using(mode):
        parts = [chains.model(_batch(images, p, layout)).float() for p in chunks(images.shape[1], batch_size)]
    return torch.cat([part.view(images.shape[0], -1, part.shape[-1]) for part in parts], 1)


def logits_of(chains: ScoreHooks, images: torch.Tensor, mode: str, batch_size: Optional[int] = None) -> torch.Tensor:
    """Logits of the hooked model on ``images`` with the hooks in ``mode`` (no gradients)."""
    return _tasks_logits(chains, images[None], mode, batch_size)[0]


def fit(chains: ScoreHooks, images: torch.Tensor, config: Optional[FitConfig] = None, **options) -> Subnetwork:
    """Learn filter scores and gates so the thresholded network keeps the model's outputs (Eq. 8).

    Args:
        chains: hooks from :func:`hookchains.core.attach`.
        images: the task's images, N x C x H x W, preprocessed like the model's training data.
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
    if len({tuple(t.shape) for t in tasks}) != 1:
        raise ValueError(f"every task needs images of the same shape and count, got {[tuple(t.shape) for t in tasks]}")
    return _fit(chains, list(tasks), config, options)


def _fit(chains: ScoreHooks, tasks: List[torch.Tensor], config: Optional[FitConfig], options: Dict) -> List[Subnetwork]:
    for images in tasks:
        validate_images(images)
    if not chains.attached:
        raise RuntimeError("these chains were detached; call hookchains.attach(model) again")
    cfg = dataclasses.replace(config or preset_for(chains.sites.adapter), **options)
    model = chains.model
    images = torch.stack(tasks).to(_device_of(chains))
    torch.manual_seed(cfg.seed)
    flags, was_training = [p.requires_grad for p in model.parameters()], model.training
    model.eval().requires_grad_(False)
    torch.set_flush_denormal(True)  # nearly closed soft gates (G ~ 1e-40) would make CPU steps crawl
    try:
        layout, teacher = _input_layout(chains, images, cfg.batch_size)
        tracks = _optimise(chains, images, F.log_softmax(teacher, -1), cfg, layout)
        student = _tasks_logits(chains, images, "hard", cfg.batch_size, layout)
    finally:
        torch.set_flush_denormal(False)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if any(math.isnan(v) for t in tracks for v in t.history["loss"]):
        raise FloatingPointError("the loss became NaN during fitting; lower lr or check the images")
    return [_result(chains, i, track, teacher[i], student[i], cfg) for i, track in enumerate(tracks)]


def _result(chains: ScoreHooks, task: int, track: _Track, teacher: torch.Tensor, student: torch.Tensor,
            cfg: FitConfig) -> Subnetwork:
    scores, gates = chains.task_state(task)
    sub = Subnetwork(chains.sites, scores, gates, chains.tau, chains.temperature,
                     fidelity(teacher.cpu(), student.cpu()),
                     {**dataclasses.asdict(cfg), "steps_run": len(track.history["loss"])}, track.history)
    with chains.using("off"):  # the fit's own hooks must not act twice
        try:
            sub.dead_filters = find_dead_filters(sub, chains.model)
        except DataflowError:
            pass  # connections unknown: dead_filters stays None ("not determined")
    return sub
