"""The state hookchains touches on a user's model, behind context managers that put it back.

Running a model for an explanation needs it in eval mode, with frozen weights, sometimes with
denormal flushing or a seeded RNG, sometimes with a module swapped for a pass-through. A user's model
may be in *mixed* modes (``model.train()`` with every BatchNorm frozen in ``eval()``; an
``nn.DataParallel`` wrapper in train mode around a model in eval mode), so restoring means each
submodule's own ``training`` flag, each parameter's own ``requires_grad``, the caller's
``torch.set_flush_denormal`` value and the caller's global RNG state -- never one flag for all.

Example:
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    >>> _ = net[1].eval()
    >>> with explaining(net):
    ...     net[0].training, net[0].weight.requires_grad
    (False, False)
    >>> net.training, net[0].training, net[1].training, net[0].weight.requires_grad
    (True, True, False, True)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["flush_denormal_enabled", "kept_state", "explaining", "seeded", "swapped", "PassThrough"]


def flush_denormal_enabled() -> bool:
    """Whether ``torch.set_flush_denormal(True)`` is in effect (torch has no getter: a denormal
    float32 times one is zero exactly when denormals are flushed)."""
    return float(torch.tensor([1e-40]).mul(1.0)[0]) == 0.0


@contextlib.contextmanager
def kept_state(model: nn.Module) -> Iterator[nn.Module]:
    """Record every submodule's ``training`` flag, every parameter's ``requires_grad`` and the
    denormal-flush flag; put each back on exit (also on an error)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    flush = flush_denormal_enabled()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for param, flag in grads:
            param.requires_grad_(flag)
        torch.set_flush_denormal(flush)


@contextlib.contextmanager
def explaining(model: nn.Module, flush_denormal: bool = False) -> Iterator[nn.Module]:
    """Eval mode and frozen weights (no weight gradient is ever formed), optionally denormals
    flushed (nearly closed soft gates, ``G ~ 1e-40``, make CPU steps crawl); all restored on exit."""
    with kept_state(model):
        model.eval().requires_grad_(False)
        if flush_denormal:
            torch.set_flush_denormal(True)
        yield model


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG (and ``device``'s, for CUDA) for the block, then restore the caller's
    RNG state, so an explanation is reproducible without reseeding the caller's program."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def swapped(model: nn.Module, paths: Sequence[str], make: Callable[[int], nn.Module]) -> Iterator[nn.Module]:
    """Temporarily replace the submodules at ``paths`` by ``make(i)`` (``i``: position in ``paths``);
    the originals are put back on exit."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()
