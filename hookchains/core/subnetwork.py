"""``Subnetwork``: the thresholded result of a fit, as plain data (section 3.2).

It holds the learned filter scores and gate logits, the threshold ``tau`` and temperature ``T``, the
site map, and fidelity figures measured on the *thresholded* network. Everything that is not a tensor
is JSON; tensors are safetensors -- saved results load back without unpickling anything. Save/load,
the summary's shared parts and the format version are those of :class:`hookchains.core.result.Result`,
shared with the token result.

Thresholding (section 3.2, 4.1): a filter is kept when ``S >= tau``; a gated layer/block is removed
when ``G < 0.5`` (its filters are not counted); a layer whose scores are all below ``tau`` is removed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from hookchains.core.result import FORMAT_VERSION, Result
from hookchains.core.sites import SiteMap

__all__ = ["Subnetwork", "FORMAT_VERSION"]

_SCORE, _GATE, _IMPORTANCE, _MEAN = "score/", "gate/", "importance/", "mean/"


@dataclass
class Subnetwork(Result):
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

    files = ("subnetwork.json", "scores.safetensors")  # what save writes
    tensor_format = "hookchains"

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

    def counts(self) -> Dict[str, Any]:
        """The counts of kept units: every scored unit, and the paper-comparable conv-only counts.

        ``filters_*`` / ``layers_*`` count every filter site, conv and fully-connected alike;
        ``conv_filters_*`` / ``conv_layers_*`` count conv filters and conv layers only, as the paper
        does (section 4.2: "filters"), and ``linear_units_*`` / ``linear_layers_*`` the
        fully-connected units separately. E.g. VGG-19 has 5,504 conv filters in 16 conv layers plus
        8,192 fully-connected units in 2 layers; ResNet-50 has 26,560 conv filters in 53 conv layers.
        (The paper's own "4,480" VGG-19 filters and "/67" ResNet-50 layers do not follow from the
        architectures.) ``gates_*``: gated layers/blocks kept / total. ``dead_filters``: kept filters with
        no live input (included in ``filters_kept``; None when not determined); ``filters_live``: the
        kept filters that are not dead, the count the summary leads with (issue 12: a dead filter is an
        input-independent constant, folded into a bias when materialised where that is exact, and in
        no chain), equal to ``filters_kept`` when dead filters were not determined.

        Example:
            >>> sub.counts()["conv_filters_total"]      # doctest: +SKIP
            5504
        """
        kept = self.kept_filters()
        totals = self.sites.totals()
        dead = None if self.dead_filters is None else sum(len(v) for v in self.dead_filters.values())
        kept_count = sum(len(v) for v in kept.values())
        counts = {
            "filters_kept": kept_count,
            "filters_total": totals["scorable_filters"],
            "layers_kept": len(kept),
            "layers_total": len(self.sites.filters),
            "gates_kept": len(self.sites.gates) - len(self.removed_gates),
            "gates_total": len(self.sites.gates),
            "dead_filters": dead,
            "filters_live": kept_count - (dead or 0),
        }
        for kind, unit in (("conv", "filters"), ("linear", "units")):
            sites = [s for s in self.sites.filters if s.kind == kind]
            counts.update({f"{kind}_{unit}_kept": sum(len(kept.get(s.name, ())) for s in sites),
                           f"{kind}_{unit}_total": sum(s.channels for s in sites),
                           f"{kind}_layers_kept": sum(s.name in kept for s in sites),
                           f"{kind}_layers_total": len(sites)})
        return counts

    def summary(self) -> str:
        """One line like the paper's: 'retains 13/53 layers and 77/26560 filters; ...' (the live
        filters, when some kept filters are dead: ``counts()``)."""
        c = self.counts()
        line = (f"retains {c['layers_kept']}/{c['layers_total']} layers and "
                f"{c['filters_live']}/{c['filters_total']} filters "
                f"({100.0 * c['filters_live'] / max(c['filters_total'], 1):.2f} %{self._dead_note(c)})")
        if c["gates_total"]:
            line += f", {c['gates_kept']}/{c['gates_total']} gated blocks"
        return line + self.fidelity_text() + f"; {self.ablation} ablation" + self.ending_text()

    @staticmethod
    def _dead_note(counts: Dict[str, Any]) -> str:
        """'; plus N dead (...)' when kept filters have no live input (:func:`hookchains.core.dataflow.find_dead_filters`)."""
        dead = counts["dead_filters"]
        return (f"; not counted: {dead} more kept filters that are dead, constant whatever the input, "
                f"in no chain" if dead else "")

    def materialize(self, model, images=None, **options):
        """Deprecated since 0.2: ``module, report = hookchains.materialize(sub, model, images)`` (this method
        returns the module only and, unlike before, stores nothing on the result)."""
        warnings.warn("Subnetwork.materialize is deprecated; call hookchains.materialize(sub, model, images), which "
                      "returns (module, report)", DeprecationWarning, stacklevel=2)
        import hookchains  # the public facade, at call time: the result does not depend on materialize
        return hookchains.materialize(self, model, images, **options)[0]

    # ------------------------------------------------------------------ persistence (Result.save / load)
    def tensors_to_save(self) -> Dict[str, torch.Tensor]:
        """``scores.safetensors``: ``score/<site>``, ``gate/<site>`` (0-D), ``importance/<site>``, ``mean/<site>``."""
        tensors = {_SCORE + k: v for k, v in self.scores.items()}
        tensors.update({_GATE + k: v.reshape(()) for k, v in self.gate_logits.items()})
        tensors.update({_IMPORTANCE + k: v for k, v in self.importance.items()})
        tensors.update({_MEAN + k: v for k, v in self.means.items()})
        return tensors

    def meta_to_save(self) -> Dict[str, Any]:
        """``subnetwork.json`` besides the shared fields (the kept filters and removed gates for readers of the JSON)."""
        return {"temperature": self.temperature, "removed_gates": self.removed_gates, "kept_filters": self.kept_filters(),
                "ablation": self.ablation, "dead_filters": self.dead_filters, "sites": self.sites.to_json()}

    @classmethod
    def from_saved(cls, directory: Path, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Subnetwork:
        sites = SiteMap.from_json(meta["sites"])
        part = {prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                for prefix in (_SCORE, _GATE, _IMPORTANCE, _MEAN)}
        scores, gates = part[_SCORE], part[_GATE]
        missing = [s.name for s in sites.filters if s.name not in scores] + \
                  [g.name for g in sites.gates if g.name not in gates]
        wrong = [s.name for s in sites.filters if s.name in scores and scores[s.name].numel() != s.channels]
        if missing or wrong:
            raise ValueError(f"{directory}/{cls.files[1]} does not match its {cls.files[0]} "
                             f"(missing {missing[:3]}, wrong size {wrong[:3]}): the files were mixed up")
        return cls(sites, scores, gates, meta["tau"], meta["temperature"], meta["fidelity"], meta["config"],
                   meta["history"], meta["model_ref"], meta.get("task", {}), part[_IMPORTANCE],
                   meta.get("ablation", "zero"), part[_MEAN], meta.get("dead_filters"))
