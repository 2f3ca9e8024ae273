"""One home for the state hookchains touches on a user's model, as context managers that restore it.

Every place that runs the user's model for an explanation (discovery, fit, evaluation, materialise,
heatmaps, feature visualisation) goes through these, so that afterwards each submodule's own
train/eval flag, each parameter's own ``requires_grad`` and the model's hooks are exactly as before.
A user's model may be in *mixed* modes (``model.train()`` with every BatchNorm frozen in ``eval()``;
an ``nn.DataParallel`` wrapper in train mode around a model in eval mode), so restoring means each
flag on its own, never one flag for all; the caller's ``torch.set_flush_denormal`` value and global
RNG state are put back too (:func:`explaining`, :func:`seeded`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from hookchains.inputs.forward import call

__all__ = ["get_module", "tensor_of", "eval_mode", "frozen_weights", "capture_featuremaps", "flush_denormal_enabled",
           "explaining", "seeded", "swapped", "PassThrough"]


def get_module(model: nn.Module, module_path: str) -> nn.Module:
    """Return the submodule at dotted ``module_path`` ("" is the model itself).

    Raises a ``ValueError`` naming the path instead of the bare
    ``AttributeError`` of :meth:`torch.nn.Module.get_submodule`.

    Example: ``get_module(mobilenet, "features.4.conv.0")``.
    """
    try:
        return model.get_submodule(module_path)
    except AttributeError as err:
        raise ValueError(f"no module at path {module_path!r}: {err}") from err


def tensor_of(module: nn.Module, name: str = "weight") -> Tensor:
    """``module.<name>`` (a parameter or buffer, e.g. ``weight``) as the tensor it is; ``TypeError``
    naming the module when it is not a tensor.

    Example:
        >>> tensor_of(nn.Linear(2, 3)).shape
        torch.Size([3, 2])
    """
    value = getattr(module, name, None)
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(module).__name__}.{name} is {type(value).__name__}, not a tensor")
    return value


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put every submodule in eval mode; restore each flag after.

    Explanations must see the network as it predicts (BatchNorm running
    statistics, no dropout) and must not update BatchNorm statistics.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> net[0].eval()
        Linear(in_features=2, out_features=2, bias=True)
        >>> with eval_mode(net):
        ...     net[1].training
        False
        >>> net.training, net[0].training, net[1].training
        (True, False, True)
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def capture_featuremaps(
    model: nn.Module, images, module_paths: list[str]
) -> dict[str, Tensor]:
    """Run one no-grad, eval-mode forward and return each module's output.

    Temporary forward hooks record the (detached) output of every module in
    ``module_paths``; they are removed again even when the forward fails, so
    the model is left exactly as it was.  If a module runs several times in
    one forward, its last output is returned.

    Example::

        maps = capture_featuremaps(model, x, ["features.2", "features.4"])
        maps["features.4"].shape   # (N, C, h, w)
    """
    modules = {path: get_module(model, path) for path in module_paths}
    outputs: dict[str, Tensor] = {}

    def make_hook(path: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"output of {path!r} is {type(output).__name__}, not a Tensor")
            outputs[path] = output.detach()
        return hook

    handles = [m.register_forward_hook(make_hook(p)) for p, m in modules.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            call(model, images)
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in module_paths if p not in outputs]
    if missing:
        raise ValueError(f"modules never ran during the forward: {missing}")
    return {path: outputs[path] for path in module_paths}


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Temporarily disable ``requires_grad`` on every parameter; restore each one's own flag afterwards.

    Only the learned scores need gradients (weights frozen cut a resnet50 step from 5.1 s to 3.5 s).

    Example:
        >>> net = nn.Linear(2, 2); net.bias.requires_grad_(False)
        Parameter containing:
        ...
        >>> with frozen_weights(net):
        ...     net.weight.requires_grad
        False
        >>> net.weight.requires_grad, net.bias.requires_grad
        (True, False)
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def flush_denormal_enabled() -> bool:
    """Whether ``torch.set_flush_denormal(True)`` is in effect (torch has no getter: a denormal
    float32 times one is zero exactly when denormals are flushed)."""
    return float(torch.tensor([1e-40]).mul(1.0)[0]) == 0.0


@contextlib.contextmanager
def explaining(model: nn.Module, flush_denormal: bool = False) -> Iterator[nn.Module]:
    """Eval mode and frozen weights (:func:`eval_mode`, :func:`frozen_weights`: no weight gradient is
    ever formed), optionally denormals flushed (nearly closed soft gates, ``G ~ 1e-40``, make CPU
    steps crawl); each module's flag, each parameter's flag and the caller's flush flag restored.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> _ = net[1].eval()
        >>> with explaining(net):
        ...     net[0].training, net[0].weight.requires_grad
        (False, False)
        >>> net.training, net[0].training, net[1].training, net[0].weight.requires_grad
        (True, True, False, True)
    """
    flush = flush_denormal_enabled()
    with eval_mode(model), frozen_weights(model):
        try:
            if flush_denormal:
                torch.set_flush_denormal(True)
            yield model
        finally:
            torch.set_flush_denormal(flush)


@contextlib.contextmanager
def seeded(seed: int, device) -> Iterator[None]:
    """Seed torch's global RNG (and ``device``'s, for CUDA) for the block, then restore the caller's
    RNG state: an explanation is reproducible without reseeding the caller's program.

    Example:
        >>> before = torch.random.get_rng_state()
        >>> with seeded(0, "cpu"):
        ...     _ = torch.rand(1)
        >>> torch.equal(before, torch.random.get_rng_state())
        True
    """
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def swapped(model: nn.Module, paths: Sequence[str], make: Callable[[int], nn.Module]) -> Iterator[nn.Module]:
    """Temporarily replace the submodules at ``paths`` by ``make(i)`` (``i``: position in ``paths``);
    the originals are put back on exit (also on an error)."""
    saved = []
    try:
        for i, path in enumerate(paths):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            saved.append((parent, name, getattr(parent, name)))
            setattr(parent, name, make(i))
        yield model
    finally:
        for parent, name, module in reversed(saved):
            setattr(parent, name, module)


class PassThrough(nn.Module):
    """What a removed layer or block becomes (Eq. 7 with ``G = 0``: its output is its input ``H``).

    Returns a *copy* of ``H``: ``nn.Identity`` would return the input object itself, and a forward
    that accumulates in place (RepVGG/MobileOne ``out = a(x); out += b(x); out += x``) would then
    write into ``x``.
    """

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``H`` itself (copied); further arguments (a transformer layer's attention mask) are ignored."""
        return x.clone()
