"""Shared click options, each declared once: the method's knobs (``extract``, ``demo``, ``sweep``), the
model and data a run loads (``extract``, ``sweep``), ``--output`` and ``--checkpoint``; and the one-line
error handling every command uses."""
from __future__ import annotations

import functools
import sys
from typing import Callable, Dict, Optional

import click

from hookchains.core.fit import FitConfig
from hookchains.viz.graph import GRAPH_FORMATS
from hookchains.workflow.demo import DEMO_FIT, DEMO_IMAGE_SIZE

DEMO_DEFAULTS = {**DEMO_FIT, "image_size": DEMO_IMAGE_SIZE}  # see hookchains.workflow.demo for why
FIT_KEYS = ("steps", "lr", "lam", "lam_gate", "recipe", "kl_target", "kl_tol", "min_agreement", "seed")
"""The :class:`~hookchains.core.fit.FitConfig` fields the method's options set."""


def fit_options(func: Optional[Callable] = None, *, demo: bool = False, outputs: bool = True):
    """Decorate a command with the method's options (``--steps``, ``--lam``, ... ``--quiet``) and,
    with ``outputs``, those of a run folder (``--format``, ``--no-graph``, ``--overwrite``, ``--json``)."""
    if func is None:
        return lambda f: fit_options(f, demo=demo, outputs=outputs)
    d = DEMO_DEFAULTS if demo else {}
    method = [
        click.option("--steps", type=int, default=d.get("steps"), help="max optimisation steps [paper: 300]"),
        click.option("--lr", type=float, default=d.get("lr"),
                     help="Adam learning rate [family preset: 0.02; recipe paper: 0.005, the paper's]"),
        click.option("--lam", type=float, help="L1 weight on filter/token scores [family preset; paper: 0.005]"),
        click.option("--lam-gate", type=float, help="gate penalty weight [family preset; paper: 1 ResNet, 2 VGG]"),
        click.option("--recipe", type=click.Choice(["mask", "l0", "ste", "paper", "hookchains"]),
                     help="[default: ste with unbounded scales] ste: thresholded scores, straight-through, "
                          "scale <= 1; mask: binary mask x scale <= 1, cost on the mask; l0: hard-concrete "
                          "gates; paper: Eq. 8 as written; hookchains: old name of ste"),
        click.option("--kl-target", type=float, help="KL the sub-network should stay within [0.1]"),
        click.option("--kl-tol", type=float, help="KL the returned sub-network must be within: a fit at the step "
                                                  "limit returns its sparsest network within it and "
                                                  "--min-agreement [0.1]"),
        click.option("--min-agreement", type=click.FloatRange(0, 1),
                     help="share of the images whose top-1 class the returned sub-network must keep [0.95]"),
        click.option("--tau", type=float, default=0.1, show_default=True, help="filter/token score threshold"),
        click.option("--temperature", type=float, default=0.2, show_default=True, help="gate sigmoid temperature T"),
        click.option("--image-size", type=int, default=d.get("image_size"), help="input resolution [model default]"),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N"),
        click.option("--quiet", "-q", is_flag=True, help="no progress bars; print only the result's location"),
    ]
    run_folder = [
        click.option("--format", type=click.Choice(GRAPH_FORMATS), default="pdf", show_default=True,
                     help="graph format"),
        click.option("--no-graph", is_flag=True, help="skip the graph"),
        click.option("--no-report", is_flag=True, help="skip the HTML report"),
        click.option("--overwrite", is_flag=True, help="replace an earlier run folder (only one hookchains wrote; replaced once the new run is complete)"),
        click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary"),
    ]
    for option in reversed(method + (run_folder if outputs else [])):
        func = option(func)
    return func


MODEL_SPECS = "timm name, torchvision:NAME, module:factory or hookchains:mobilenet_v2"
OUTPUT = click.option("--output", help="where the class scores are in a dict/tuple/list output: a key or an index "
                                       "(e.g. --output out, --output 0)")
CHECKPOINT = click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
                          help="weights file to load (safetensors or state_dict)")
MOVED_CHECKPOINT = click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
                                help="where the base checkpoint lives now")


def model_options(func: Optional[Callable] = None, *, data_required: bool = True):
    """Decorate a command with the model and data it loads: ``--model``, ``--pretrained``,
    ``--checkpoint``, ``--data`` (passed as ``data_dir``; optional with ``data_required=False``, e.g. when
    ``--text-data`` may take its place) and ``--output``."""
    if func is None:
        return lambda f: model_options(f, data_required=data_required)
    for option in reversed([
        click.option("--model", "model_spec", required=True, help=MODEL_SPECS),
        click.option("--pretrained", is_flag=True, help="load the model's hub weights (needs network or a filled cache)"),
        CHECKPOINT,
        click.option("--data", "data_dir", required=data_required, type=click.Path(),
                     help="ImageFolder-style folder: one sub-folder per class"),
        OUTPUT,
    ]):
        func = option(func)
    return func


def config_from_options(model, opts: Dict) -> FitConfig:
    """The defaults of ``model`` for the sites it scores (``opts["sites"]``, default auto: the family
    preset for filters, ``TOKEN_DEFAULTS`` for a ViT's tokens) with the options the user gave.

    Example: ``config_from_options(deit, {"sites": "auto", "steps": 5, ...}).steps == 5``."""
    from hookchains.workflow.extract import fit_config
    return fit_config(model, opts.get("sites", "auto"), **{k: opts.get(k) for k in FIT_KEYS}, progress=not opts["quiet"])


def output_choice(value: Optional[str]):
    """``--output`` as :func:`hookchains.inputs.forward.select` takes it: an index when it is an integer, else a key."""
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


def check_image_size(model, image_size) -> None:
    """Refuse an ``--image-size`` below an eighth of the model's own resolution (at least 8 px): a
    224-px ImageNet model then sees at least 28 px, enough for its final feature map to be 1 x 1;
    below that the features and so the sub-network mean nothing.

    Example: ``check_image_size(resnet18, 4)`` raises ``ValueError: --image-size 4 is too small ...``."""
    if image_size is None:
        return
    from hookchains.inputs.models import preprocessing
    own = min(preprocessing(model).input_size)
    minimum = max(8, -(-own // 8))
    if image_size < minimum:
        raise ValueError(f"--image-size {image_size} is too small for this model (made for {own} px): use at least "
                         f"{minimum} px, or leave the option out for {own} px")


def run_error(func: Callable) -> Callable:
    """Turn every failure into ``Error: <one line>`` and exit status 1; the traceback only with the
    global ``--debug`` flag (``hookchains --debug inspect ...``)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 -- the CLI promise: one line, whatever failed
            if (click.get_current_context().find_root().obj or {}).get("debug"):
                raise
            text = str(exc).strip()
            message = text.splitlines()[0] if text else "(no message)"
            known = isinstance(exc, (ValueError, OSError, RuntimeError))
            click.echo(f"Error: {message}" if known else f"Error: {type(exc).__name__}: {message} "
                       "(run with --debug for the traceback)", err=True)
            sys.exit(1)
    return wrapper
