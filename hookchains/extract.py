"""One extraction from model to run folder: fit, threshold, materialise, save, draw.

This is what ``hookchains extract`` and ``hookchains demo`` run; it is public so a notebook can run
the same pipeline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hookchains.attach import attach
from hookchains.data import ImageSet
from hookchains.fit import FitConfig
from hookchains.models import ModelRef
from hookchains.run import finish_run_dir, prepare_run_dir, save_run
from hookchains.subnetwork import Subnetwork

__all__ = ["extract", "resolve_device"]


def resolve_device(device: Optional[str]) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as torch understands it."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    return dev


def extract(model: nn.Module, model_ref: ModelRef, task: ImageSet, out, *, config: FitConfig,
            tau: float = 0.1, temperature: float = 0.2, device: Optional[str] = None, overwrite: bool = False,
            graph_format: Optional[str] = "pdf", report: bool = True) -> Subnetwork:
    """Fit a sub-network of ``model`` on ``task`` and write the run folder ``out``.

    Writes (atomically, see :mod:`hookchains.run`) the result files, the pruned module's weights and,
    when asked, the graph (``subnetwork.<graph_format>``) and the HTML report.

    Example:
        >>> model, ref = create_model("hookchains:mobilenet_v2")
        >>> sub = extract(model, ref, task, "runs/demo", config=preset_for("mobilenet"))
    """
    staging = prepare_run_dir(Path(out), overwrite)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    images = task.images.to(dev)
    with attach(model, example=images[:1], tau=tau, temperature=temperature) as chains:
        sub = chains.fit(images, config)
    pruned = sub.materialize(model, images)
    save_run(staging, sub, model_ref, task, pruned)
    if graph_format:
        from hookchains.render import render_graph
        render_graph(sub, model, staging / f"subnetwork.{graph_format}", format=graph_format, images=images)
    if report:
        from hookchains.report import write_report
        write_report(staging, sub, model, task)
    finish_run_dir(staging, Path(out))
    return sub
