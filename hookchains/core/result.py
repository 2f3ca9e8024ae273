"""What every fit result shares: :class:`Result`, the base of :class:`~hookchains.core.subnetwork.Subnetwork`
(filter scores and gates) and :class:`~hookchains.tokens.result.TokenSubnetwork` (per-image token scores).

* **Fields** both have: ``tau``, ``fidelity`` (figures of the thresholded network on the fitting inputs,
  :func:`hookchains.core.metrics.fidelity`), ``config`` (fit options and how the fit ended), ``history``
  (per-step figures), ``model_ref`` (how to rebuild the model) and ``task``.
* **Save/load**: one JSON file and one safetensors file per result, each written atomically
  (:mod:`hookchains.core.io`), one :data:`FORMAT_VERSION` for both kinds; a file of another version is
  refused in one line naming both versions. Nothing is unpickled.
* **Summary**: one line; its fidelity part and its "stopped at the step limit" part are written here.
* **Exactness**: :func:`check_exact`, the one check both materialise paths (:func:`hookchains.core.materialize.materialize`,
  :func:`hookchains.tokens.materialize.materialize_tokens`) run: the materialised module's outputs
  equal the thresholded network's within ``TOLERANCE x max|logit|``.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar

import torch

from hookchains.core.io import read_json, read_tensors, write_json, write_tensors
from hookchains.core.recipes import AGREEMENT_SLACK

__all__ = ["Result", "FORMAT_VERSION", "TOLERANCE", "MaterializeError", "check_exact", "exactness_limit"]

# Version of the files Result.save writes (both kinds). Version 1: the formats of hookchains 0.1/0.2
# (subnetwork.json + scores.safetensors; tokens.json + token_scores.safetensors), unchanged.
FORMAT_VERSION = 1
# Relative tolerance of every exactness check: materialised vs thresholded logits, x max|logit|.
TOLERANCE = 1e-4

R = TypeVar("R", bound="Result")


class MaterializeError(RuntimeError):
    """The materialised module does not reproduce the thresholded network."""


def exactness_limit(reference: torch.Tensor, tolerance: float = TOLERANCE) -> float:
    """The largest allowed ``max|materialised - thresholded|``: ``tolerance x max|reference|`` (logits).

    Example:
        >>> exactness_limit(torch.tensor([[2.0, -5.0]]))
        0.0005
    """
    return tolerance * max(float(reference.detach().abs().max()), 1e-12)


def check_exact(got: torch.Tensor, reference: torch.Tensor, tolerance: float = TOLERANCE, *,
                what: str = "materialised module", against: str = "the thresholded network", advice: str = "") -> float:
    """The max abs difference between ``got`` (the materialised module's logits) and ``reference`` (the
    thresholded network's, same shape); raises :class:`MaterializeError` in one line when it exceeds
    :func:`exactness_limit` (``advice``: what to do, appended).

    Example:
        >>> check_exact(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.00001]))
        1.0013580322265625e-05
        >>> check_exact(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0]))
        Traceback (most recent call last):
        hookchains.core.result.MaterializeError: materialised module differs from the thresholded network by 0.1 (> 0.0001 x max|logit| = 0.0002)
    """
    diff, limit = float((got.detach().float() - reference.detach().float()).abs().max()), exactness_limit(reference, tolerance)
    if not diff <= limit:
        raise MaterializeError(f"{what} differs from {against} by {diff:.3g} (> {tolerance:g} x max|logit| = "
                               f"{limit:.3g})" + (f"; {advice}" if advice else ""))
    return diff


class Result:
    """Base of the fit results (module doc): save/load, the summary's shared parts, ``_repr_html_``.

    A subclass is a dataclass with the fields below and says what differs: ``files`` (its JSON and
    safetensors names), ``tensor_format`` (the safetensors metadata tag), ``unit`` (what its kept count
    counts), :meth:`counts`, :meth:`summary`, :meth:`tensors_to_save` / :meth:`meta_to_save` and
    :meth:`from_saved`.
    """

    files: ClassVar[Tuple[str, str]]
    tensor_format: ClassVar[str]
    unit: ClassVar[str] = "filters"

    tau: float
    fidelity: Dict[str, Any]
    config: Dict[str, Any]
    history: Dict[str, List[float]]
    model_ref: Optional[Dict[str, Any]]
    task: Dict[str, Any]

    # ------------------------------------------------------------------ what a subclass says
    def counts(self) -> Dict[str, Any]:
        """Kept and total units."""
        raise NotImplementedError

    def summary(self) -> str:
        """One line: what is kept, :meth:`fidelity_text`, :meth:`ending_text`."""
        raise NotImplementedError

    def tensors_to_save(self) -> Dict[str, torch.Tensor]:
        """The tensors :meth:`save` writes."""
        raise NotImplementedError

    def meta_to_save(self) -> Dict[str, Any]:
        """What :meth:`save` writes into the JSON file besides the shared fields."""
        raise NotImplementedError

    @classmethod
    def from_saved(cls: Type[R], directory: Path, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> R:
        """The result from what :meth:`save` wrote (``meta``: the JSON; ``tensors``); raises
        ``ValueError`` when the two files do not belong together."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def _repr_html_(self) -> str:
        """Jupyter shows the summary line."""
        return f"<p><strong>{type(self).__name__}</strong>: {html.escape(self.summary())}</p>"

    def fidelity_text(self) -> str:
        """'; top-1 agreement a/n; KL k; Q mean q' ('a/P pixels' for a dense prediction), or '' unmeasured."""
        f = self.fidelity
        if not f:
            return ""
        per_pixel = f.get("positions", f["images"]) != f["images"]
        agree = f"{f['agree']}/{f['positions']} pixels" if per_pixel else f"{f['agree']}/{f['images']}"
        return f"; top-1 agreement {agree}; KL {f['kl']:.3f}; Q mean {f['quotient_mean']:.2f}"

    def ending_text(self) -> str:
        """'; stopped at the step limit, ...' when the step limit, not convergence, ended the fit."""
        if self.config.get("ended") != "step_limit":
            return ""
        change = self.config.get("kept_change_per_10_steps", 0.0)
        trend = (f"kept {self.unit} still {'falling' if change < 0 else 'rising'} {abs(change):.1f} % per 10 steps"
                 if abs(change) >= 0.05 else f"kept {self.unit} steady")
        kl, target = self.fidelity.get("kl"), self.config.get("kl_tol")
        missed = f", KL {kl:.3f} above kl_tol {target:g}" if kl is not None and target is not None and kl > target else ""
        missed += self._agreement_missed()
        step = self.config.get("returned_step")
        agreement = self.config.get("min_agreement", 0.0)
        returned = (f"; returned the network of step {step}, the sparsest with KL within kl_tol {target:g}"
                    + (f" and top-1 agreement >= {100 * agreement:g} %" if agreement else "") if step is not None else "")
        return f"; stopped at the step limit, {trend}{missed}{returned}"

    def _agreement_missed(self) -> str:
        """', top-1 agreement N % below min_agreement M %' when the returned network keeps fewer images
        (positions, for a dense prediction) than the fit's constraint asked (:func:`hookchains.core.recipes.feasible`)."""
        f, wanted = self.fidelity, self.config.get("min_agreement")
        if not f or wanted is None or "agree" not in f:
            return ""
        share = f["agree"] / max(f.get("positions", f["images"]), 1)
        below = share < wanted - AGREEMENT_SLACK
        return f", top-1 agreement {100 * share:.0f} % below min_agreement {100 * wanted:g} %" if below else ""

    def save(self, directory) -> Path:
        """Write the result's two files (``files``) into ``directory``, each atomically; returns ``directory``.

        Example: ``result.save("run/")``; ``type(result).load("run/")``."""
        directory = Path(directory)
        meta_file, tensor_file = self.files
        write_tensors(directory / tensor_file, self.tensors_to_save(), metadata={"format": self.tensor_format})
        write_json(directory / meta_file, {
            "format_version": FORMAT_VERSION, "summary": self.summary(), "counts": self.counts(), "tau": self.tau,
            "fidelity": self.fidelity, "config": self.config, "history": self.history, "model_ref": self.model_ref,
            "task": self.task, **self.meta_to_save()})
        return directory

    @classmethod
    def load(cls: Type[R], directory) -> R:
        """Read what :meth:`save` wrote; a missing, truncated or mismatched file, or another format
        version, is a one-line error.

        Example: ``result = hookchains.Subnetwork.load("run/")``."""
        directory = Path(directory)
        meta_file, tensor_file = cls.files
        for name in cls.files:
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: {directory} is not a hookchains result folder "
                                        f"of a {cls.__name__} (it needs {meta_file} and {tensor_file})")
        meta, tensors = read_json(directory / meta_file), read_tensors(directory / tensor_file)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory / meta_file} has format version {meta.get('format_version')}, this "
                             f"hookchains reads version {FORMAT_VERSION}: load it with the hookchains that wrote it")
        return cls.from_saved(directory, meta, tensors)
