"""``Subnetwork``: the thresholded result of a fit, as plain data (section 3.2).

It holds the learned filter scores and gate logits, the threshold ``tau`` and temperature ``T``, the
site map, and fidelity figures measured on the *thresholded* network. Everything that is not a tensor
is JSON; tensors are safetensors -- saved results load back without unpickling anything.

Thresholding (section 3.2, 4.1): a filter is kept when ``S >= tau``; a gated layer/block is removed
when ``G < 0.5`` (its filters are not counted); a layer whose scores are all below ``tau`` is removed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from hookchains.core.io import read_json, read_tensors, write_json, write_tensors
from hookchains.core.sites import SiteMap

__all__ = ["Subnetwork", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_SCORE, _GATE = "score/", "gate/"


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
        """The paper's counts: filters and layers kept / total, gates kept / total; ``dead_filters``: kept
        filters with no live input (included in ``filters_kept``; None when not determined)."""
        kept = self.kept_filters()
        totals = self.sites.totals()
        return {
            "filters_kept": sum(len(v) for v in kept.values()),
            "filters_total": totals["scorable_filters"],
            "layers_kept": len(kept),
            "layers_total": len(self.sites.filters),
            "gates_kept": len(self.sites.gates) - len(self.removed_gates),
            "gates_total": len(self.sites.gates),
            "dead_filters": None if self.dead_filters is None else sum(len(v) for v in self.dead_filters.values()),
        }

    def summary(self) -> str:
        """One line like the paper's: 'retains 13/67 layers and 77/26560 filters; ...'."""
        c, f = self.counts(), self.fidelity
        line = (f"retains {c['layers_kept']}/{c['layers_total']} layers and "
                f"{c['filters_kept']}/{c['filters_total']} filters "
                f"({100.0 * c['filters_kept'] / max(c['filters_total'], 1):.2f} %)")
        if c["gates_total"]:
            line += f", {c['gates_kept']}/{c['gates_total']} gated blocks"
        if f:
            line += (f"; top-1 agreement {f['agree']}/{f['images']}; KL {f['kl']:.3f}; "
                     f"Q mean {f['quotient_mean']:.2f}")
        return line

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
        write_tensors(directory / "scores.safetensors", tensors, metadata={"format": "hookchains"})
        write_json(directory / "subnetwork.json", {
            "format_version": FORMAT_VERSION, "summary": self.summary(), "counts": self.counts(),
            "tau": self.tau, "temperature": self.temperature, "fidelity": self.fidelity,
            "removed_gates": self.removed_gates, "kept_filters": self.kept_filters(),
            "config": self.config, "history": self.history, "model_ref": self.model_ref,
            "task": self.task, "dead_filters": self.dead_filters, "sites": self.sites.to_json()})
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
        missing = [s.name for s in sites.filters if s.name not in scores] + \
                  [g.name for g in sites.gates if g.name not in gates]
        wrong = [s.name for s in sites.filters if s.name in scores and scores[s.name].numel() != s.channels]
        if missing or wrong:
            raise ValueError(f"{directory}/scores.safetensors does not match its subnetwork.json "
                             f"(missing {missing[:3]}, wrong size {wrong[:3]}): the files were mixed up")
        return cls(sites, scores, gates, meta["tau"], meta["temperature"], meta["fidelity"], meta["config"],
                   meta["history"], meta["model_ref"], meta.get("task", {}), meta.get("dead_filters"))
