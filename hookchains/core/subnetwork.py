"""``Subnetwork``: the thresholded result of a fit, as plain data (section 3.2).

It holds the learned filter scores and gate logits, the threshold ``tau`` and temperature ``T``, the
site map, and fidelity figures measured on the *thresholded* network. Everything that is not a tensor
is JSON; tensors are safetensors -- saved results load back without unpickling anything.

Thresholding (section 3.2, 4.1): a filter is kept when ``S >= tau``; a gated layer/block is removed
when ``G < 0.5`` (its filters are not counted); a layer whose scores are all below ``tau`` is removed.
"""
from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from hookchains.core.io import read_json, read_tensors, write_json, write_tensors
from hookchains.core.sites import SiteMap

__all__ = ["Subnetwork", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_SCORE, _GATE, _IMPORTANCE, _MEAN = "score/", "gate/", "importance/", "mean/"


@dataclass
class Subnetwork:
    """A learned sub-network: scores, gates, threshold, counts and fidelity.

    Attributes:
        sites: the :class:`SiteMap` the scores belong to.
        scores: filter site name -> learned scores ``S`` (1-D, one per channel).
        gate_logits: gate site name -> learned ``alpha`` (0-D).
        tau: filter threshold; temperature: gate temperature ``T``.
        fidelity: figures of the thresholded network on the fitting images (see ``metrics.fidelity``).
        config: the fit options used; history: per-step figures; model_ref: how to rebuild the model;
        task: class names, image paths and labels of the fitting images, when known.
        importance: filter site -> values ranking every filter (kept or not) for
            :mod:`hookchains.evaluation.curve`, when the recipe has such values (e.g. mask logits); else ``scores`` rank.
        ablation: what a removed filter outputs: ``"zero"`` (the paper) or ``"mean"`` (its mean activation
            on the task images, ``means[site]``); see :mod:`hookchains.core.ablation`.
        dead_filters: site -> kept filters with no live input (input-independent constants, found by
            :func:`hookchains.core.dataflow.find_dead_filters` at the end of a fit); None when not determined.
            Recompute it after changing ``scores``.
    """

    sites: SiteMap
    scores: Dict[str, torch.Tensor]
    gate_logits: Dict[str, torch.Tensor]
    tau: float = 0.1
    temperature: float = 0.2
    fidelity: Dict[str, float] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    history: Dict[str, List[float]] = field(default_factory=dict)
    model_ref: Optional[Dict[str, Any]] = None
    task: Dict[str, Any] = field(default_factory=dict)
    importance: Dict[str, torch.Tensor] = field(default_factory=dict)
    ablation: str = "zero"
    means: Dict[str, torch.Tensor] = field(default_factory=dict)
    dead_filters: Optional[Dict[str, List[int]]] = None

    # ------------------------------------------------------------------ thresholding
    def gate_open(self, name: str) -> bool:
        """Whether gate ``name`` keeps its layer/block (``G >= 0.5``, i.e. ``alpha >= 0``)."""
        return bool(torch.sigmoid(self.gate_logits[name].float() / self.temperature) >= 0.5)

    @property
    def removed_gates(self) -> List[str]:
        """Gate sites whose layer/block is removed."""
        return [g.name for g in self.sites.gates if not self.gate_open(g.name)]

    def _inside_removed_gate(self) -> set:
        removed = set(self.removed_gates)
        return {f for g in self.sites.gates if g.name in removed for f in g.filter_sites}

    def kept_filters(self) -> Dict[str, List[int]]:
        """Filter site -> indices of kept filters (``S >= tau``, outside removed gates), in order."""
        hidden = self._inside_removed_gate()
        kept = {}
        for site in self.sites.filters:
            if site.name in hidden:
                continue
            idx = torch.nonzero(self.scores[site.name] >= self.tau).flatten().tolist()
            if idx:
                kept[site.name] = idx
        return kept

    def counts(self) -> Dict[str, int]:
        """The counts of kept units: every scored unit, and the paper-comparable conv-only counts.

        ``filters_*`` / ``layers_*`` count every filter site, conv and fully-connected alike;
        ``conv_filters_*`` / ``conv_layers_*`` count conv filters and conv layers only, as the paper
        does (section 4.2: "filters"), and ``linear_units_*`` / ``linear_layers_*`` the
        fully-connected units separately. E.g. VGG-19 has 5,504 conv filters in 16 conv layers plus
        8,192 fully-connected units in 2 layers; ResNet-50 has 26,560 conv filters in 53 conv layers.
        (The paper's own "4,480" VGG-19 filters and "/67" ResNet-50 layers do not follow from the
        architectures.) ``gates_*``: gated layers/blocks kept / total. ``dead_filters``: kept filters with
        no live input (included in ``filters_kept``; None when not determined).

        Example:
            >>> sub.counts()["conv_filters_total"]      # doctest: +SKIP
            5504
        """
        kept = self.kept_filters()
        totals = self.sites.totals()
        counts = {
            "filters_kept": sum(len(v) for v in kept.values()),
            "filters_total": totals["scorable_filters"],
            "layers_kept": len(kept),
            "layers_total": len(self.sites.filters),
            "gates_kept": len(self.sites.gates) - len(self.removed_gates),
            "gates_total": len(self.sites.gates),
            "dead_filters": None if self.dead_filters is None else sum(len(v) for v in self.dead_filters.values()),
        }
        for kind, unit in (("conv", "filters"), ("linear", "units")):
            sites = [s for s in self.sites.filters if s.kind == kind]
            counts.update({f"{kind}_{unit}_kept": sum(len(kept.get(s.name, ())) for s in sites),
                           f"{kind}_{unit}_total": sum(s.channels for s in sites),
                           f"{kind}_layers_kept": sum(s.name in kept for s in sites),
                           f"{kind}_layers_total": len(sites)})
        return counts

    def _repr_html_(self) -> str:
        """Jupyter shows the summary line (the explorer: ``load_run(folder)`` after ``hookchains report``)."""
        return f"<p><strong>Subnetwork</strong>: {html.escape(self.summary())}</p>"

    def summary(self) -> str:
        """One line like the paper's: 'retains 13/53 layers and 77/26560 filters; ...'."""
        c, f = self.counts(), self.fidelity
        line = (f"retains {c['layers_kept']}/{c['layers_total']} layers and "
                f"{c['filters_kept']}/{c['filters_total']} filters "
                f"({100.0 * c['filters_kept'] / max(c['filters_total'], 1):.2f} %{self._dead_note(c)})")
        if c["gates_total"]:
            line += f", {c['gates_kept']}/{c['gates_total']} gated blocks"
        if f:
            per_pixel = f.get("positions", f["images"]) != f["images"]
            agree = f"{f['agree']}/{f['positions']} pixels" if per_pixel else f"{f['agree']}/{f['images']}"
            line += (f"; top-1 agreement {agree}; KL {f['kl']:.3f}; "
                     f"Q mean {f['quotient_mean']:.2f}")
        return line + f"; {self.ablation} ablation" + self._ending()

    @staticmethod
    def _dead_note(counts: Dict[str, int]) -> str:
        """'; N of them dead (...)' when kept filters have no live input (:func:`hookchains.core.dataflow.find_dead_filters`)."""
        dead = counts["dead_filters"]
        return f"; {dead} of them dead: constant whatever the input, in no chain" if dead else ""

    def _ending(self) -> str:
        """'; stopped at the step limit, ...' when the step limit, not convergence, ended the fit."""
        if self.config.get("ended") != "step_limit":
            return ""
        change = self.config.get("kept_change_per_10_steps", 0.0)
        trend = (f"kept filters still {'falling' if change < 0 else 'rising'} {abs(change):.1f} % per 10 steps"
                 if abs(change) >= 0.05 else "kept filters steady")
        kl, target = self.fidelity.get("kl"), self.config.get("kl_tol")
        missed = f", KL {kl:.3f} above kl_tol {target:g}" if kl is not None and target is not None and kl > target else ""
        return f"; stopped at the step limit, {trend}{missed}"

    def materialize(self, model, images=None, **options):
        """Deprecated since 0.2: ``module, report = hookchains.materialize(sub, model, images)`` (this method
        returns the module only and, unlike before, stores nothing on the result)."""
        warnings.warn("Subnetwork.materialize is deprecated; call hookchains.materialize(sub, model, images), which "
                      "returns (module, report)", DeprecationWarning, stacklevel=2)
        import hookchains  # the public facade, at call time: the result does not depend on materialize
        return hookchains.materialize(self, model, images, **options)[0]

    # ------------------------------------------------------------------ persistence
    def save(self, directory) -> Path:
        """Write ``scores.safetensors`` and ``subnetwork.json`` into ``directory`` (atomically).

        Read it back with :meth:`load` (``hookchains.Subnetwork.load(directory)``); ``hookchains.load``
        reads run folders (``hookchains extract``), which also hold the model reference and images.

        Example: ``result.save("run/")``; ``result = hookchains.Subnetwork.load("run/")``."""
        directory = Path(directory)
        tensors = {_SCORE + k: v for k, v in self.scores.items()}
        tensors.update({_GATE + k: v.reshape(()) for k, v in self.gate_logits.items()})
        tensors.update({_IMPORTANCE + k: v for k, v in self.importance.items()})
        tensors.update({_MEAN + k: v for k, v in self.means.items()})
        write_tensors(directory / "scores.safetensors", tensors, metadata={"format": "hookchains"})
        write_json(directory / "subnetwork.json", {
            "format_version": FORMAT_VERSION, "summary": self.summary(), "counts": self.counts(),
            "tau": self.tau, "temperature": self.temperature, "fidelity": self.fidelity,
            "removed_gates": self.removed_gates, "kept_filters": self.kept_filters(),
            "config": self.config, "history": self.history, "model_ref": self.model_ref,
            "task": self.task, "ablation": self.ablation, "dead_filters": self.dead_filters,
            "sites": self.sites.to_json()})
        return directory

    @classmethod
    def load(cls, directory) -> Subnetwork:
        """Read what :meth:`save` wrote; a missing, truncated or mismatched file is a clear error."""
        directory = Path(directory)
        for name in ("subnetwork.json", "scores.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: {directory} is not a hookchains "
                                        "result folder (it needs subnetwork.json and scores.safetensors)")
        meta, tensors = read_json(directory / "subnetwork.json"), read_tensors(directory / "scores.safetensors")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory} has format version {meta.get('format_version')}, this hookchains "
                             f"reads version {FORMAT_VERSION}")
        sites = SiteMap.from_json(meta["sites"])
        scores = {k[len(_SCORE):]: v for k, v in tensors.items() if k.startswith(_SCORE)}
        gates = {k[len(_GATE):]: v for k, v in tensors.items() if k.startswith(_GATE)}
        importance = {k[len(_IMPORTANCE):]: v for k, v in tensors.items() if k.startswith(_IMPORTANCE)}
        missing = [s.name for s in sites.filters if s.name not in scores] + \
                  [g.name for g in sites.gates if g.name not in gates]
        wrong = [s.name for s in sites.filters if s.name in scores and scores[s.name].numel() != s.channels]
        if missing or wrong:
            raise ValueError(f"{directory}/scores.safetensors does not match its subnetwork.json "
                             f"(missing {missing[:3]}, wrong size {wrong[:3]}): the files were mixed up")
        means = {k[len(_MEAN):]: v for k, v in tensors.items() if k.startswith(_MEAN)}
        return cls(sites, scores, gates, meta["tau"], meta["temperature"], meta["fidelity"], meta["config"],
                   meta["history"], meta["model_ref"], meta.get("task", {}), importance,
                   meta.get("ablation", "zero"), means, meta.get("dead_filters"))
