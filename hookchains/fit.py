"""Learn filter scores and gates on a handful of images: the optimisation of Eq. 8.

Two recipes share one loop:

``recipe="paper"`` -- exactly section 3.2/4.1: the soft network (``S`` in [0, 1], ``G`` in (0, 1)),
loss ``mean KL + lam * ||S||_1 + lam_gate * sum(alpha)``, Adam, stop when the loss changes by less
than ``0.05`` between steps; thresholding happens only afterwards.

``recipe="hookchains"`` (default) -- the same objective made well-posed (DESIGN.md measured why the
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

from hookchains.attach import Chains
from hookchains.data import validate_images
from hookchains.metrics import fidelity
from hookchains.subnetwork import Subnetwork

# recipe "hookchains" keeps |alpha / T| <= GATE_BOUND: the forward pass uses the rounded gate, and a
# saturated sigmoid would make a closed gate's gradient vanish so it could never reopen.
GATE_BOUND = 4.0

__all__ = ["FitConfig", "PRESETS", "fit", "preset_for", "logits_of"]


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


def _penalties(chains: Chains, cfg: FitConfig) -> torch.Tensor:
    """``lam * ||S||_1 + lam_gate * sum(alpha)`` (paper) or, recipe ``hookchains``, the same with each
    score's L1 weighted by its gate's hard value (the filters of a removed block cost nothing and are
    not counted, so they keep their values and the block can come back) and ``sum(G)`` for the gates."""
    if cfg.recipe == "paper":
        l1 = sum(s.abs().sum() for s in chains.scores.values())
        return cfg.lam * l1 + cfg.lam_gate * sum(chains.gate_logits.values(), torch.zeros(()))
    gate_of = {f: g.name for g in chains.sites.gates for f in g.filter_sites}
    l1 = sum(s.abs().sum() * (chains.gate_values(gate_of[n], "ste") if n in gate_of else 1.0)
             for n, s in chains.scores.items())
    gates = sum((chains.gate_values(n, "soft") for n in chains.gate_logits), torch.zeros(()))
    return cfg.lam * l1 + cfg.lam_gate * gates


def _kl_backward(model, images, teacher_logp, chunks: Sequence[slice], weight: float) -> float:
    """Mean KL over the images; backpropagates ``weight * KL`` chunk by chunk."""
    total = 0.0
    for part in chunks:
        logq = F.log_softmax(model(images[part]).float(), -1)
        kl = F.kl_div(logq, teacher_logp[part], log_target=True, reduction="sum") / images.shape[0]
        (weight * kl).backward()
        total += float(kl.detach())
    return total


def _next_kl_weight(weight: float, kl: float, cfg: FitConfig) -> float:
    """Dual ascent on the KL multiplier of the constrained problem ``min ||S||_1 s.t. KL <= kl_target``
    (Eq. 2 with a tolerance): the weight grows while the KL is above target and shrinks below it."""
    if cfg.kl_target is None or cfg.recipe == "paper":
        return weight
    step = max(-1.0, min(1.0, kl / cfg.kl_target - 1.0))
    return float(min(1e4, max(1.0, weight * math.exp(cfg.kl_rate * step))))


def _stopped(cfg: FitConfig, history: Dict[str, List[float]], stable_for: int) -> bool:
    step = len(history["loss"])
    if cfg.recipe == "paper":
        return step >= 2 and abs(history["loss"][-1] - history["loss"][-2]) < cfg.loss_tol
    if step < max(cfg.min_steps, cfg.patience + 1) or stable_for < cfg.patience:
        return False
    settled = abs(history["loss"][-1] - history["loss"][-1 - cfg.patience]) < cfg.loss_tol
    return settled and history["kl"][-1] <= cfg.kl_tol


def _initialise(chains: Chains, cfg: FitConfig) -> None:
    """Every fit starts from the original network: ``S = 1`` (section 3.2) and gates at ``gate_init``."""
    default = 0.0 if cfg.recipe == "paper" else 2.0 * chains.temperature
    alpha = default if cfg.gate_init is None else cfg.gate_init
    with torch.no_grad():
        for s in chains.scores.values():
            s.fill_(1.0)
        for a in chains.gate_logits.values():
            a.fill_(alpha)


def _optimise(chains: Chains, images: torch.Tensor, teacher_logp: torch.Tensor, cfg: FitConfig):
    _initialise(chains, cfg)
    model, chunks = chains.model, _chunks(images.shape[0], cfg.batch_size)
    optimiser = torch.optim.Adam(list(chains.parameters()), lr=cfg.lr)
    history: Dict[str, List[float]] = {"loss": [], "kl": [], "filters": [], "gates": [], "kl_weight": []}
    stable_for, last_kept, kl_weight = 0, None, 1.0
    bar = tqdm(range(cfg.steps), desc="fit", disable=not cfg.progress, leave=False)
    with chains.using("soft" if cfg.recipe == "paper" else "ste"):
        for _ in bar:
            optimiser.zero_grad(set_to_none=True)
            kl = _kl_backward(model, images, teacher_logp, chunks, kl_weight)
            penalty = _penalties(chains, cfg)
            penalty.backward()
            optimiser.step()
            chains.clamp_(None if cfg.recipe == "paper" else GATE_BOUND * chains.temperature)
            kept = chains.kept_counts()
            history["loss"].append(kl + float(penalty.detach()))
            history["kl"].append(kl)
            history["filters"].append(kept["filters"])
            history["gates"].append(kept["gates"])
            history["kl_weight"].append(kl_weight)
            kl_weight = _next_kl_weight(kl_weight, kl, cfg)
            key = _kept_key(chains)
            stable_for = stable_for + 1 if key == last_kept else 0
            last_kept = key
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", kl=f"{kl:.3f}",
                            filters=kept["filters"], layers=kept["layers"], gates=kept["gates"])
            if _stopped(cfg, history, stable_for):
                break
    bar.close()
    return history


def _kept_key(chains: Chains) -> int:
    with torch.no_grad():
        bits = [(s >= chains.tau) for s in chains.scores.values()]
        bits += [(a >= 0).reshape(1) for a in chains.gate_logits.values()]
        return hash(torch.cat(bits).cpu().numpy().tobytes()) if bits else 0


def _chunks(n: int, batch_size: Optional[int]) -> List[slice]:
    size = batch_size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def logits_of(chains: Chains, images: torch.Tensor, mode: str, batch_size: Optional[int] = None) -> torch.Tensor:
    """Logits of the hooked model on ``images`` with the hooks in ``mode`` (no gradients)."""
    with chains.using(mode):
        return torch.cat([chains.model(images[p]) for p in _chunks(images.shape[0], batch_size)]).float()


def fit(chains: Chains, images: torch.Tensor, config: Optional[FitConfig] = None, **options) -> Subnetwork:
    """Learn filter scores and gates so the thresholded network keeps the model's outputs (Eq. 8).

    Args:
        chains: hooks from :func:`hookchains.attach`.
        images: the task's images, N x C x H x W, preprocessed like the model's training data.
        config: a :class:`FitConfig`; default: the preset of the chains' adapter family.
        **options: any :class:`FitConfig` field, overriding ``config`` (e.g. ``steps=100``).

    Returns:
        the :class:`Subnetwork` after thresholding, with fidelity measured on the thresholded network.

    Example:
        >>> chains = hookchains.attach(model)
        >>> result = chains.fit(images, steps=200, lam=0.01)
        >>> print(result.summary())
    """
    validate_images(images)
    if not chains.attached:
        raise RuntimeError("these chains were detached; call hookchains.attach(model) again")
    cfg = dataclasses.replace(config or preset_for(chains.sites.adapter), **options)
    model = chains.model
    device = next(model.parameters()).device
    images = images.to(device)
    torch.manual_seed(cfg.seed)
    flags, was_training = [p.requires_grad for p in model.parameters()], model.training
    model.eval().requires_grad_(False)
    torch.set_flush_denormal(True)  # nearly closed soft gates (G ~ 1e-40) would make CPU steps crawl
    try:
        teacher = logits_of(chains, images, "off", cfg.batch_size)
        history = _optimise(chains, images, F.log_softmax(teacher, -1), cfg)
        student = logits_of(chains, images, "hard", cfg.batch_size)
    finally:
        torch.set_flush_denormal(False)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        scores = {k: v.detach().cpu().clone() for k, v in chains.scores.items()}
        gates = {k: v.detach().cpu().clone() for k, v in chains.gate_logits.items()}
    result = Subnetwork(chains.sites, scores, gates, chains.tau, chains.temperature,
                        fidelity(teacher, student), {**dataclasses.asdict(cfg), "steps_run": len(history["loss"])},
                        history)
    if any(math.isnan(v) for v in history["loss"]):
        raise FloatingPointError("the loss became NaN during fitting; lower lr or check the images")
    return result
