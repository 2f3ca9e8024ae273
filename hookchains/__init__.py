"""hookchains: NeuroChains (Extracting Local Reasoning Chains of Deep Neural Networks) for any
PyTorch model, through hooks only.

Example:
    >>> import hookchains
    >>> with hookchains.attach(model) as chains:          # hooks only; weights and code untouched
    ...     result = chains.fit(images)                   # Eq. 8: filter scores, layer gates
    >>> print(result.summary())                           # 'retains 9/52 layers and 130/17056 filters ...'
    >>> small = result.materialize(model)                 # a real, smaller nn.Module, same outputs

    ViT/DeiT (section 4.5): per-image token scores instead of filters.

    >>> tokens = hookchains.fit_tokens(deit, images)      # 'keeps .../2364 token slots per image ...'
    >>> dropped = hookchains.materialize_tokens(tokens, deit, images)   # drops the pruned tokens, same outputs
    >>> hookchains.kept_patches_figure(raw_image_0, tokens.masks[0]).save("kept.png")   # Fig. 7, top row

    Many case studies (section 4.2, A.2-A.5): fidelity, held-out generalisation, faithfulness,
    magnitude/random baselines and robustness per task, resumable and shardable with torchrun.

    >>> records = hookchains.run_sweep(hookchains.SweepConfig("resnet50", "imagenet/val", tasks=100), "sweep/")
"""
from hookchains.attach import Chains, attach
from hookchains.attribution import class_token_heatmaps, kept_patches_figure, patch_token_heatmaps, token_attribution
from hookchains.chains import extract_chains
from hookchains.evaluate import EvalOptions, evaluate
from hookchains.fit import FitConfig, fit, fit_tasks
from hookchains.render import render_graph
from hookchains.report import write_report
from hookchains.run import load
from hookchains.sites import FilterSite, GateSite, SiteMap, TokenSite
from hookchains.subnetwork import Subnetwork
from hookchains.sweep import SweepConfig, run_sweep
from hookchains.tokens import TokenSubnetwork, fit_tokens, materialize_tokens

__version__ = "0.1.0"
__all__ = ["attach", "Chains", "fit", "fit_tasks", "FitConfig", "evaluate", "EvalOptions", "run_sweep", "SweepConfig", "Subnetwork", "load", "render_graph",
           "extract_chains", "write_report", "SiteMap", "FilterSite", "GateSite", "TokenSite",
           "fit_tokens", "TokenSubnetwork", "materialize_tokens", "token_attribution", "class_token_heatmaps",
           "patch_token_heatmaps", "kept_patches_figure", "__version__"]
