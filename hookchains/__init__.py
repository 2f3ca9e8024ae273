"""hookchains: NeuroChains (Extracting Local Reasoning Chains of Deep Neural Networks) for any
PyTorch model, through hooks only.

Example:
    >>> import hookchains
    >>> with hookchains.attach(model) as chains:          # hooks only; weights and code untouched
    ...     result = chains.fit(images)                   # Eq. 8: filter scores, layer gates
    >>> print(result.summary())                           # 'retains 9/52 layers and 130/17056 filters ...'
    >>> small = result.materialize(model)                 # a real, smaller nn.Module, same outputs
"""
from hookchains.attach import Chains, attach
from hookchains.chains import extract_chains
from hookchains.fit import FitConfig, fit
from hookchains.render import render_graph
from hookchains.report import write_report
from hookchains.run import load
from hookchains.sites import FilterSite, GateSite, SiteMap, TokenSite
from hookchains.subnetwork import Subnetwork

__version__ = "0.1.0"
__all__ = ["attach", "Chains", "fit", "FitConfig", "Subnetwork", "load", "render_graph",
           "extract_chains", "write_report", "SiteMap", "FilterSite", "GateSite", "TokenSite", "__version__"]
