"""One extraction from model to run folder: fit, threshold, materialise, save, draw.

This is what ``hookchains extract`` and ``hookchains demo`` run; it is public so a notebook can run
the same pipeline. Two methods, picked by ``sites`` (called ``mode`` before 0.3):

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
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from hookchains.adapters import get_adapter
from hookchains.core.attach import attach
from hookchains.core.deprecation import renamed_keyword
from hookchains.core.fit import FitConfig, fit, preset_for
from hookchains.core.materialize import materialize
from hookchains.core.progress import Progress
from hookchains.core.state import eval_mode
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.data import ImageSet
from hookchains.inputs.degenerate import check_predictions, task_warnings
from hookchains.inputs.forward import OutputSpec, Selector, class_scores
from hookchains.inputs.models import ModelRef
from hookchains.tokens.fit import TOKEN_DEFAULTS, fit_tokens
from hookchains.tokens.hooks import check_token_model, is_token_model
from hookchains.tokens.materialize import materialize_tokens
from hookchains.tokens.result import TokenSubnetwork
from hookchains.viz.graph import render_graph
from hookchains.viz.report import write_report
from hookchains.viz.token_report import write_token_report
from hookchains.workflow.runs import Result, discard_staging, finish_run_dir, prepare_run_dir, save_run

__all__ = ["extract", "resolve_sites", "extraction_mode", "fit_config", "resolve_device", "write_run_report",
           "EXTRACT_SITES", "EXTRACT_MODES"]

EXTRACT_SITES = ("auto", "filters", "tokens")  # what a run scores
EXTRACT_MODES = EXTRACT_SITES  # the name before 0.3


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
    """Deprecated since 0.3: :func:`resolve_sites`."""
    warnings.warn("extraction_mode(model, mode) is deprecated: use resolve_sites(model, sites)", DeprecationWarning,
                  stacklevel=2)
    return resolve_sites(model, mode)


def resolve_sites(model: nn.Module, sites: str = "auto") -> str:
    """Resolve ``sites`` (one of :data:`EXTRACT_SITES`) to ``"filters"`` or ``"tokens"`` for ``model``.

    ``tokens`` on a model that cannot drop tokens raises :func:`~hookchains.tokens.check_token_model`'s
    error, so the user learns why (e.g. average pooling) instead of silently getting filters.

    Example:
        >>> import timm
        >>> resnet18 = timm.create_model("resnet18")
        >>> resolve_sites(timm.create_model("deit_tiny_patch16_224")), resolve_sites(resnet18)
        ('tokens', 'filters')
    """
    if sites not in EXTRACT_SITES:
        raise ValueError(f"unknown sites {sites!r}; choose one of {EXTRACT_SITES}")
    if sites == "tokens":
        check_token_model(model)
        return sites
    if sites == "filters":
        return sites
    return "tokens" if is_token_model(model) else "filters"


@renamed_keyword(mode="sites")
def fit_config(model: nn.Module, sites: str, **overrides) -> FitConfig:
    """Default fit options of ``sites`` for ``model`` with the ``overrides`` that are not ``None``.

    ``filters``: the adapter family's preset (:func:`hookchains.core.fit.preset_for`); ``tokens``:
    :data:`hookchains.tokens.TOKEN_DEFAULTS`.

    Example:
        >>> import timm
        >>> deit = timm.create_model("test_vit")
        >>> fit_config(deit, "tokens", steps=20).steps
        20
    """
    if resolve_sites(model, sites) == "tokens":
        return dataclasses.replace(TOKEN_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None})
    return preset_for(get_adapter(model).name, **overrides)


def _filter_run(model: nn.Module, model_ref: ModelRef, task: ImageSet, images: torch.Tensor, staging: Path,
                config: FitConfig, tau: float, temperature: float, graph_format: Optional[str],
                checked: Dict[str, object], progress: Progress, output: Selector = None) -> Subnetwork:
    """Eq. 8 on filters and gates; saves the pruned module (with ``checked`` in ``sub.task``) and, when
    asked, the graph."""
    with attach(model, example=images[:1], tau=tau, temperature=temperature, output=output) as hooks:
        with progress.stage("fit", f"up to {config.steps} steps on {len(task)} images"):
            sub = fit(hooks, images, config)
    sub.task.update(checked)
    with progress.stage("materialise"):
        pruned, report = materialize(sub, model, images)
    with progress.stage("save"):
        save_run(staging, sub, model_ref, task, pruned=pruned, physical=dataclasses.asdict(report))
    if graph_format:
        with progress.stage("graph"):
            render_graph(sub, model, staging / f"subnetwork.{graph_format}", format=graph_format, images=images)
    return sub


def _token_run(model: nn.Module, model_ref: ModelRef, task: ImageSet, images: torch.Tensor, staging: Path,
               config: FitConfig, tau: float, checked: Dict[str, object], progress: Progress) -> TokenSubnetwork:
    """Per-image token scores; the token-dropping module must equal the masked network (else
    :class:`~hookchains.core.materialize.MaterializeError`), and its logits are saved for :func:`load`
    (``checked`` goes into ``tsub.task``)."""
    with progress.stage("fit", f"token scores, up to {config.steps} steps on {len(task)} images"):
        tsub = fit_tokens(model, images, tau=tau, config=config)
    tsub.task.update(checked)
    with progress.stage("materialise"):
        dropped = materialize_tokens(tsub, model, images, check=True)
        with torch.no_grad(), eval_mode(model):
            logits = dropped(images).float().cpu()
    with progress.stage("save"):
        save_run(staging, tsub, model_ref, task, logits=logits)
    return tsub


def _check_task(model: nn.Module, model_ref: ModelRef, task: ImageSet, images: torch.Tensor,
                progress: Progress, output: Selector = None) -> Dict[str, object]:
    """Warn now, before the fit, when the task has nothing to explain (:mod:`hookchains.inputs.degenerate`);
    returns what the result records (``task.warnings``, ``task.predictions``; a dense prediction is
    checked per position)."""
    if len(task.class_names) < 2:
        raise ValueError(f"a task needs at least 2 classes, got {len(task.class_names)} "
                         f"({', '.join(task.class_names)}): the sub-network explains how the model tells them apart")
    with torch.no_grad(), eval_mode(model):
        scores = torch.cat([class_scores(model(chunk), OutputSpec(select=output)) for chunk in images.split(32)])
    logits = scores.flatten(0, -2)  # N x P x C (dense) -> N*P x C
    check = check_predictions(logits, len(task.class_names))
    warnings = task_warnings(model_ref, check)
    for line in warnings:
        progress.warn(line)
    return {"warnings": warnings, "predictions": check.to_json()}


def write_run_report(run_dir, sub: Result, model: nn.Module, task: ImageSet, progress: Optional[Progress] = None,
                     **options) -> Path:
    """Write ``run_dir/report.html`` for a filter run (:func:`hookchains.viz.report.write_report`) or a
    token run (:func:`hookchains.viz.token_report.write_token_report`: token-by-layer cells, Fig. 7 per image);
    both are the explorer page (:mod:`hookchains.viz.explorer`).

    ``options`` go to the page writer (e.g. ``out=``, ``class_indices=``); ``progress`` times the
    stages (:class:`~hookchains.core.progress.Progress`).

    Example:
        >>> import torch
        >>> from PIL import Image
        >>> from torch import nn
        >>> from hookchains.core.testing import random_subnetwork
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        >>> task = ImageSet(torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1]), ["cat", "espresso"],
        ...                 ["c.png"] * 2 + ["e.png"] * 2, [Image.new("RGB", (32, 32))] * 4)
        >>> sub = random_subnetwork(model, task.images[:1], keep=0.5)      # or extract(...)
        >>> write_run_report("runs/cat-espresso", sub, model, task, featvis_steps=2)
        PosixPath('runs/cat-espresso/report.html')
    """
    progress = progress or Progress(enabled=False)
    if isinstance(sub, TokenSubnetwork):
        with progress.stage("report", "Fig. 7 per image"):
            return write_token_report(run_dir, sub, model, task, **options)
    return write_report(run_dir, sub, model, task, progress=progress, **options)


def _extract_into(staging: Path, model: nn.Module, model_ref: ModelRef, task: ImageSet, images: torch.Tensor,
                  resolved: str, config: FitConfig, tau: float, temperature: float, graph_format: Optional[str],
                  report: bool, progress: Progress, output: Selector) -> Result:
    """The run's files, written into ``staging`` (the model is on the images' device, in eval mode)."""
    checked = _check_task(model, model_ref, task, images, progress, output)
    sub: Result
    if resolved == "tokens":
        sub = _token_run(model, model_ref, task, images, staging, config, tau, checked, progress)
    else:
        sub = _filter_run(model, model_ref, task, images, staging, config, tau, temperature, graph_format,
                          checked, progress, output)
    if report:
        write_run_report(staging, sub, model, task, progress=progress)
    return sub


@renamed_keyword(mode="sites")
def extract(model: nn.Module, model_ref: ModelRef, task: ImageSet, out, *, config: Optional[FitConfig] = None,
            tau: float = 0.1, temperature: float = 0.2, device: Optional[str] = None, overwrite: bool = False,
            graph_format: Optional[str] = "pdf", report: bool = True, sites: str = "auto", output: Selector = None,
            progress: Optional[Progress] = None) -> Result:
    """Fit a sub-network of ``model`` on ``task`` and write the run folder ``out``.

    Writes (atomically, see :mod:`hookchains.workflow.runs`) the result files, then for filter runs the pruned
    module's weights and, when asked, the graph (``subnetwork.<graph_format>``), for token runs the
    token-dropping module's logits; and the HTML report when ``report``.

    The model runs on ``device`` in eval mode meanwhile; afterwards it is back on its own device with each
    submodule in its own train/eval mode.

    Before the fit, the original model's predictions on the task are checked
    (:mod:`hookchains.inputs.degenerate`): random weights, and constant or near-uniform predictions, are
    warned about at once and recorded in the result (``sub.task["warnings"]``, ``summary.txt``, the
    report).

    Args:
        config: fit options (default: :func:`fit_config` for the resolved sites).
        tau: score threshold; temperature: gate temperature (filters only).
        sites: ``auto``, ``filters`` or ``tokens`` (see the module docstring; keyword ``mode`` before 0.3).
        output: where the class scores are in a dict/tuple/list output (a key, an index or a callable;
            :class:`~hookchains.inputs.forward.OutputSpec`); recorded in the result, so loading and
            exporting the run need it no more. Filter runs only.
        progress: status lines, bars and stage timings (:class:`~hookchains.core.progress.Progress`;
            default: silent, but still timed).

    Returns:
        a :class:`~hookchains.core.subnetwork.Subnetwork` (filters) or a
        :class:`~hookchains.tokens.TokenSubnetwork` (tokens).

    Raises:
        ValueError: the task has fewer than 2 classes, or a bad option; FileExistsError: see
            :func:`~hookchains.workflow.runs.prepare_run_dir`.

    Example:
        >>> from hookchains.workflow.demo import demo_task
        >>> model, ref, task = demo_task(image_size=64, per_class=2)     # embedded MobileNetV2, 4 photos
        >>> quick = preset_for("mobilenet", steps=2, progress=False)     # a real run: preset_for("mobilenet")
        >>> sub = extract(model, ref, task, "runs/demo", config=quick, graph_format=None, report=False)
        >>> from hookchains.inputs.models import create_model
        >>> deit, ref = create_model("deit_small_patch16_224", pretrained=True)   # doctest: +SKIP
        >>> tsub = extract(deit, ref, task, "runs/deit")          # doctest: +SKIP
    """
    progress = progress or Progress(enabled=False)
    resolved = resolve_sites(model, sites)
    if resolved == "tokens" and output is not None:
        raise ValueError(f"output={output!r} selects class scores for filter runs only; a token run needs a ViT "
                         "returning one logits tensor (use sites='filters' to score this model's filters)")
    config = config or fit_config(model, resolved)
    dev = resolve_device(device)
    staging = prepare_run_dir(Path(out), overwrite)
    home = next(model.parameters()).device
    images = task.images.to(dev)
    try:
        with eval_mode(model.to(dev)):
            sub = _extract_into(staging, model, model_ref, task, images, resolved, config, tau, temperature,
                                graph_format, report, progress, output)
    except BaseException:  # an error or Ctrl-C: leave no half-written folder behind
        discard_staging(staging)
        raise
    finally:
        model.to(home)  # the user's model goes back where it was, each submodule in its own mode
    finish_run_dir(staging, Path(out))
    return sub
