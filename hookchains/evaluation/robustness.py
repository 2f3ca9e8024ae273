"""Robustness of the original model vs its sub-network under adversarial attacks (A.5, Fig. 12).

The paper attacks the fitting images with FGSM (Goodfellow et al., 2014) and PGD (Madry et al.,
2018) and plots, for the original network and the extracted sub-network, the histogram of the
probability of the ground-truth class on clean and adversarial images. :func:`robustness` returns
those per-image probabilities for both networks attacked white-box (each with its own input
gradients) and, as a control, for the original's adversarial images fed to the sub-network
("transfer"), which tells gradient masking apart from real robustness. Each image's top-1 correctness
is kept too, so accuracy and attack success rate (the share of images classified correctly when clean
that an attack makes wrong) stand next to the probabilities.

Units: ``images`` are the model's *normalised* inputs and ``eps`` is an L-inf radius in those units
(for ImageNet normalisation, ``eps = (8 / 255) / 0.226`` is 8/255 of the pixel range). Adversarial
images are not clipped to a valid pixel range, because that range depends on the normalisation,
which these functions do not know.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from hookchains.core.attach import ScoreHooks
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.sandbox import sandbox

__all__ = ["fgsm", "pgd", "robustness"]

Forward = Callable[[torch.Tensor], torch.Tensor]


def _input_gradient(forward: Forward, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy w.r.t. the input only (no parameter's ``.grad`` changes)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(forward(x).float(), labels, reduction="sum")
        return torch.autograd.grad(loss, x)[0]


def _check_eps(eps: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def fgsm(forward: Forward, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``x + eps * sign(grad_x CE(forward(x), labels))`` (Goodfellow et al.).

    Args:
        forward: maps an input batch to logits (e.g. ``model``, or a hooked model in some mode).
        images: normalised inputs; ``eps`` is in the same units (see the module doc); no clipping.
        labels: ground-truth classes, shape ``(N,)``.
        eps: L-inf radius.

    Example:
        >>> import hookchains, timm, torch
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> labels = torch.tensor([0, 1, 0, 1])
        >>> adversarial = fgsm(model, images, labels, eps=0.1)
        >>> bool((adversarial - images).abs().max() <= 0.1 + 1e-6)
        True
    """
    _check_eps(eps)
    return (images + eps * _input_gradient(forward, images, labels).sign()).detach()


def pgd(forward: Forward, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 10,
        step_size: Optional[float] = None, seed: int = 0) -> torch.Tensor:
    """Projected gradient descent on the L-inf ball of radius ``eps`` (Madry et al., 2018).

    Starts at a uniformly random point of the ball (seeded: the same call gives the same result), takes
    ``steps`` signed-gradient steps of ``step_size`` (default ``2.5 * eps / steps``) that raise the
    cross-entropy, and projects back onto the ball after each. Units as in :func:`fgsm`; no clipping.

    Example:
        >>> import hookchains, timm, torch
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> labels = torch.tensor([0, 1, 0, 1])
        >>> adversarial = pgd(model, images, labels, eps=0.1, steps=3)
        >>> bool((adversarial - images).abs().max() <= 0.1 + 1e-6)
        True
    """
    _check_eps(eps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(images.shape, generator=generator, dtype=images.dtype)
    delta = ((2 * noise - 1) * eps).to(images.device)
    for _ in range(steps):
        grad = _input_gradient(forward, images + delta, labels)
        delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
    return (images + delta).detach()


def _mode_forward(chains: ScoreHooks, mode: str) -> Forward:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with chains.using(mode):
            return chains.model(x)
    return forward


@torch.no_grad()
def _label_probs(forward: Forward, images: torch.Tensor, labels: torch.Tensor) -> Tuple[List[float], List[bool]]:
    """Each image's probability of its label, and whether its top-1 class is the label."""
    probs = F.softmax(forward(images).float(), -1)
    return probs.gather(-1, labels[:, None]).squeeze(-1).tolist(), (probs.argmax(-1) == labels).tolist()


def robustness(chains: ScoreHooks, sub: Subnetwork, images: torch.Tensor, labels: torch.Tensor, *,
               eps: float, pgd_steps: int = 10, seed: int = 0) -> Dict[str, Any]:
    """Ground-truth probabilities of the original model and of ``sub`` on clean and attacked images.

    Args:
        chains: hooks on the model (``"off"`` = the original; ``sub`` loaded, ``"hard"`` = the
            sub-network); their scores and the model's flags are restored afterwards.
        sub: the sub-network.
        images: normalised inputs; labels: their ground-truth classes.
        eps: L-inf radius in input units (module doc); pgd_steps, seed: see :func:`pgd`.

    Returns:
        ``{"eps", "pgd_steps", "original": {"clean", "fgsm", "pgd"}, "subnetwork": {...},
        "transfer": {"fgsm", "pgd"}, "correct": {network: {attack: ...}}}``: each list holds one
        value per image, the probability of its label (Fig. 12) or, under ``"correct"``, whether
        the network's top-1 class is the label (accuracy; attack success = correct when clean and
        wrong when attacked; the transfer network's clean images are the sub-network's).

    Example:
        >>> import hookchains, timm, torch
        >>> model, images = timm.create_model("test_resnet", num_classes=2).eval(), torch.randn(4, 3, 32, 32)
        >>> labels = torch.tensor([0, 1, 0, 1])
        >>> chains = hookchains.attach(model)
        >>> sub = hookchains.fit(chains, images, steps=3, progress=False)
        >>> r = robustness(chains, sub, images, labels, eps=0.1, pgd_steps=2)
        >>> sum(r["subnetwork"]["pgd"]) / len(images), sum(r["original"]["pgd"]) / len(images)
        (..., ...)
    """
    device = next(chains.model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    measured: Dict[str, Dict[str, Tuple[List[float], List[bool]]]] = {}
    with sandbox(chains, sub):
        nets = {"original": _mode_forward(chains, "off"), "subnetwork": _mode_forward(chains, "hard")}
        attacked = {}
        for name, forward in nets.items():
            attacked[name] = {"clean": images, "fgsm": fgsm(forward, images, labels, eps),
                              "pgd": pgd(forward, images, labels, eps, pgd_steps, seed=seed)}
            measured[name] = {k: _label_probs(forward, x, labels) for k, x in attacked[name].items()}
        measured["transfer"] = {k: _label_probs(nets["subnetwork"], attacked["original"][k], labels)
                                for k in ("fgsm", "pgd")}
    result: Dict[str, Any] = {"eps": float(eps), "pgd_steps": int(pgd_steps)}
    result.update({name: {k: probs for k, (probs, _) in runs.items()} for name, runs in measured.items()})
    result["correct"] = {name: {k: correct for k, (_, correct) in runs.items()} for name, runs in measured.items()}
    return result
