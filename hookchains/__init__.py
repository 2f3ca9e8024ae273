"""hookchains: NeuroChains (*Extracting Local Reasoning Chains of Deep Neural Networks*) for any
PyTorch model, through hooks only.

The package is laid out in the order data flows; each sub-package imports only from those before it
(``docs/design.md`` has the whole picture):

=================  ==========================================================================
``inputs``         models from a spec string, image sets, the tasks of a case study
``core``           sites, model state, the score hooks (``attach``), ``fit`` (Eq. 8), the
                   ``Subnetwork`` result, ``materialize``, fidelity metrics
``tokens``         the same path for a ViT's per-image token scores (section 4.5)
``analysis``       chains through a sub-network, feature visualisation
``evaluation``     faithfulness, baselines, robustness, held-out, random-weights control
``viz``            heatmaps, the graph (graphviz), the HTML pages
``workflow``       run folders, ``extract``, sweeps, export, the offline demo
=================  ==========================================================================

Example (the embedded MobileNetV2 and a few of its photos, small and quick):

    >>> import hookchains
    >>> from hookchains.workflow.demo import demo_task
    >>> model, _, task = demo_task(image_size=64, per_class=2)
    >>> with hookchains.attach(model, example=task.images[:1]) as hooks:   # hooks only
    ...     result = hookchains.fit(hooks, task.images, steps=3, progress=False)   # Eq. 8
    >>> result.summary().startswith("retains ")
    True
    >>> small, report = hookchains.materialize(result, model, task.images)   # a real, smaller module
    >>> report.max_abs_diff <= report.tolerance
    True
"""
import warnings

from hookchains.analysis.chains import extract_chains
from hookchains.core.allocator import keep_freed_memory
from hookchains.core.attach import ScoreHooks, attach
from hookchains.core.fit import FitConfig, fit, fit_tasks
from hookchains.core.materialize import MaterializeReport, materialize
from hookchains.core.sites import FilterSite, GateSite, SiteMap, TokenSite
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.evaluate import EvalOptions, evaluate
from hookchains.tokens.attribution import (
    class_token_heatmaps,
    kept_patches_figure,
    patch_token_heatmaps,
    token_attribution,
)
from hookchains.tokens.fit import fit_tokens
from hookchains.tokens.materialize import materialize_tokens
from hookchains.tokens.result import TokenSubnetwork
from hookchains.viz.graph import render_graph
from hookchains.workflow.extract import write_run_report as write_report
from hookchains.workflow.runs import load
from hookchains.workflow.sweep import SweepConfig, run_sweep

__version__ = "0.2.0"
__all__ = ["keep_freed_memory", "attach", "ScoreHooks", "fit", "fit_tasks", "FitConfig", "materialize", "MaterializeReport",
           "Subnetwork", "load", "evaluate", "EvalOptions", "run_sweep", "SweepConfig", "render_graph",
           "extract_chains", "write_report", "SiteMap", "FilterSite", "GateSite", "TokenSite", "fit_tokens",
           "TokenSubnetwork", "materialize_tokens", "token_attribution", "class_token_heatmaps",
           "patch_token_heatmaps", "kept_patches_figure", "__version__"]

_MOVED = {"Chains": ("ScoreHooks", ScoreHooks)}


def __getattr__(name: str):
    """Names that moved in 0.2 keep working for one release, with a DeprecationWarning."""
    if name in _MOVED:
        new, value = _MOVED[name]
        warnings.warn(f"hookchains.{name} is now hookchains.{new}", DeprecationWarning, stacklevel=2)
        return value
    raise AttributeError(f"module 'hookchains' has no attribute {name!r}")
