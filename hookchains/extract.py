"""One extraction from model to run folder: fit, threshold, materialise, save, draw.

This is what ``hookchains extract`` and ``hookchains demo`` run; it is public so a notebook can run
the same pipeline. Two methods, picked by ``mode``:

* ``filters`` -- Eq. 8 on filter scores and layer gates (sections 3-4.4): the pruned module is saved
  and, when asked, the sub-network graph is drawn;
* ``tokens`` -- per-image token scores on a timm ViT/DeiT (section 4.5, :mod:`hookchains.tokens`):
  the token-dropping module is checked against the masked network and its logits saved; there is no
  filter graph (the report shows Fig. 7 instead).

``auto`` (default) picks ``tokens`` for a timm ViT/DeiT with class-token pooling and ``filters`` for
everything else (an average-pooled ViT included: a pruned token would still reach its output).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from hookchains.adapters import get_adapter
from hookchains.attach import attach
from hookchains.data import ImageSet
from hookchains.degenerate import check_predictions, task_warnings
from hookchains.fit import FitConfig, preset_for
from hookchains.heatmap import eval_mode
from hookchains.models import ModelRef
from hookchains.progress import Progress
from hookchains.run import Result, discard_staging, finish_run_dir, prepare_run_dir, save_run
from hookchains.subnetwork import Subnetwork
from hookchains.tokens import TOKEN_DEFAULTS, TokenSubnetwork, check_token_model, fit_tokens, is_token_model

__all__ = ["extract", "extraction_mode", "fit_config", "resolve_device", "EXTRACT_MODES"]

EXTRACT_MODES = ("auto", "filters", "tokens")


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


def extraction_mode(model: nn.Module, mode: str = "auto") -> str:
    """Resolve ``mode`` (one of :data:`EXTRACT_MODES`) to ``"filters"`` or ``"tokens"`` for ``model``.

    ``tokens`` on a model that cannot drop tokens raises :func:`~hookchains.tokens.check_token_model`'s
    error, so the user learns why (e.g. average pooling) instead of silently getting filters.

    Example:
        >>> extraction_mode(timm.create_model("deit_tiny_patch16_224")), extraction_mode(resnet18)
        ('tokens', 'filters')
    """
    if mode not in EXTRACT_MODES:
        raise ValueError(f"unknown extraction mode {mode!r}; choose one of {EXTRACT_MODES}")
    if mode == "tokens":
        check_token_model(model)
        return mode
    if mode == "filters":
        return mode
    return "tokens" if is_token_model(model) else "filters"


def fit_config(model: nn.Module, mode: str, **overrides) -> FitConfig:
    """Default fit options of ``mode`` for ``model`` with the ``overrides`` that are not ``None``.

    ``filters``: the adapter family's preset (:func:`hookchains.fit.preset_for`); ``tokens``:
    :data:`hookchains.tokens.TOKEN_DEFAULTS`.

    Example:
        >>> fit_config(deit, "tokens", steps=20).steps
        20
    """
    if extraction_mode(model, mode) == "tokens":
        return dataclasses.replace(TOKEN_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None})
    return preset_for(get_adapter(model).name, **overrides)


def _filter_run(model: nn.Module, model_ref: ModelRef, task: ImageSet, images: torch.Tensor, staging: Path,
                config: FitConfig, tau: float, temperature: float, graph_format: Optional[str],
                checked: Dict[str, object], progress: Progress) -> Subnetwork:
    """Eq. 8 on filters and gates; saves the pruned module (with ``checked`` in ``sub.task``) and, when
    asked, the graph."""
    with attach(model, example=images[:1], tau=tau, temperature=temperature) as chains:
        with progress.stage("fit", f"up to {config.steps} steps on {len(task)} images"):
            sub = chains.fit(images, config)
    sub.task.update(checked)
    with progress.stage("materialise"):
        pruned = sub.materialize(model, images)
    with progress.stage("save"):
        save_run(staging, sub, model_ref, task, pruned=pruned)
    if graph_format:
        from hookchains.render import render_graph
        with progress.stage("graph"):
            render_graph(sub, model, staging / f"subnetwork.{graph_format}", format=graph_format, images=images)
    return sub


def _token_run(model: nn.Module, model_ref: ModelRef, task: ImageSet, images: torch.Tensor, staging: Path,
               config: FitConfig, tau: float, checked: Dict[str, object], progress: Progress) -> TokenSubnetwork:
    """Per-image token scores; the token-dropping module must equal the masked network (else
    :class:`~hookchains.materialize.MaterializeError`), and its logits are saved for :func:`load`
    (``checked`` goes into ``tsub.task``)."""
    with progress.stage("fit", f"token scores, up to {config.steps} steps on {len(task)} images"):
        tsub = fit_tokens(model, images, tau=tau, config=config)
    tsub.task.update(checked)
    with progress.stage("materialise"):
        dropped = tsub.materialize(model, images, check=True)
        with torch.no_grad(), eval_mode(model):
            logits = dropped(images).float().cpu()
    with progress.stage("save"):
        save_run(staging, tsub, model_ref, task, logits=logits)
    return tsub


def _check_task(model: nn.Module, model_ref: ModelRef, task: ImageSet, images: torch.Tensor,
                progress: Progress) -> Dict[str, object]:
    """Warn now, before the fit, when the task has nothing to explain (:mod:`hookchains.degenerate`);
    returns what the result records (``task.warnings``, ``task.predictions``)."""
    if len(task.class_names) < 2:
        raise ValueError(f"a task needs at least 2 classes, got {len(task.class_names)} "
                         f"({', '.join(task.class_names)}): the sub-network explains how the model tells them apart")
    with torch.no_grad(), eval_mode(model):
        logits = torch.cat([model(chunk) for chunk in images.split(32)])
    check = check_predictions(logits, len(task.class_names))
    warnings = task_warnings(model_ref, check)
    for line in warnings:
        progress.warn(line)
    return {"warnings": warnings, "predictions": check.to_json()}


def extract(model: nn.Module, model_ref: ModelRef, task: ImageSet, out, *, config: Optional[FitConfig] = None,
            tau: float = 0.1, temperature: float = 0.2, device: Optional[str] = None, overwrite: bool = False,
            graph_format: Optional[str] = "pdf", report: bool = True, mode: str = "auto",
            progress: Optional[Progress] = None) -> Result:
    """Fit a sub-network of ``model`` on ``task`` and write the run folder ``out``.

    Writes (atomically, see :mod:`hookchains.run`) the result files, then for filter runs the pruned
    module's weights and, when asked, the graph (``subnetwork.<graph_format>``), for token runs the
    token-dropping module's logits; and the HTML report when ``report``.

    Before the fit, the original model's predictions on the task are checked
    (:mod:`hookchains.degenerate`): random weights, and constant or near-uniform predictions, are
    warned about at once and recorded in the result (``sub.task["warnings"]``, ``summary.txt``, the
    report).

    Args:
        config: fit options (default: :func:`fit_config` for the resolved mode).
        tau: score threshold; temperature: gate temperature (filters only).
        mode: ``auto``, ``filters`` or ``tokens`` (see the module docstring).
        progress: status lines, bars and stage timings (:class:`~hookchains.progress.Progress`;
            default: silent, but still timed).

    Returns:
        a :class:`~hookchains.subnetwork.Subnetwork` (filters) or a
        :class:`~hookchains.tokens.TokenSubnetwork` (tokens).

    Raises:
        ValueError: the task has fewer than 2 classes, or a bad option; FileExistsError: see
            :func:`~hookchains.run.prepare_run_dir`.

    Example:
        >>> model, ref = create_model("hookchains:mobilenet_v2")
        >>> sub = extract(model, ref, task, "runs/demo", config=preset_for("mobilenet"))
        >>> deit, ref = create_model("deit_small_patch16_224", pretrained=True)
        >>> tsub = extract(deit, ref, task, "runs/deit")          # mode auto -> tokens
    """
    progress = progress or Progress(enabled=False)
    resolved = extraction_mode(model, mode)
    config = config or fit_config(model, resolved)
    dev = resolve_device(device)
    staging = prepare_run_dir(Path(out), overwrite)
    model = model.to(dev).eval()
    images = task.images.to(dev)
    try:
        checked = _check_task(model, model_ref, task, images, progress)
        if resolved == "tokens":
            sub = _token_run(model, model_ref, task, images, staging, config, tau, checked, progress)
        else:
            sub = _filter_run(model, model_ref, task, images, staging, config, tau, temperature, graph_format,
                              checked, progress)
        if report:
            from hookchains.report import write_report
            write_report(staging, sub, model, task, progress=progress)
    except BaseException:  # an error or Ctrl-C: leave no half-written folder behind
        discard_staging(staging)
        raise
    finish_run_dir(staging, Path(out))
    return sub
