"""How hookchains calls a user's model: what goes in and what comes out.

**Inputs.** A model takes one tensor, or several (``forward(image, metadata)``). Everywhere hookchains
takes an ``example`` or a task's images, it also takes a tuple (positional inputs) or a dict (keyword
inputs) of tensors; every tensor holds the same ``N`` examples along dim 0, and the *first* one is the
part that varies between tasks (the images, signals or volumes; it is what is validated and named in
errors).

**Outputs.** The objective (Eq. 5, 8) compares the original and sub-network *output distributions*.
:func:`class_scores` turns whatever the model returns into tensors whose ``log_softmax`` over the last
dimension is the model's log-probabilities:

* a dict / list / tuple output is reduced to one tensor by ``OutputSpec.select`` (a key, an index, or a
  callable); when it is needed and missing, a one-line error lists the keys;
* ``kind="probabilities"`` (a model ending in ``nn.Softmax``) becomes ``log p``, ``"log_probabilities"``
  (``nn.LogSoftmax``) stays as is, ``"logits"`` stays as is; :func:`detect_kind` recognises the first two
  from the values (every row a distribution over the classes);
* a dense prediction ``N x C x ...`` (segmentation: ``N x C x H x W``) becomes ``N x P x C`` with the
  ``P`` positions (pixels) in the middle, so that the KL is taken per position over the ``C`` classes.

Example:
    >>> spec = OutputSpec(select="out", kind="logits")
    >>> class_scores({"out": torch.zeros(2, 5, 4, 4), "aux": torch.zeros(2, 5, 4, 4)}, spec).shape
    torch.Size([2, 16, 5])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

__all__ = ["OutputSpec", "KINDS", "call", "map_tensors", "primary", "count", "select", "detect_kind",
           "class_scores", "modality", "stack", "validate_inputs"]

KINDS = ("auto", "logits", "probabilities", "log_probabilities")
Selector = Union[None, str, int, Callable[[Any], torch.Tensor]]


@dataclass(frozen=True)
class OutputSpec:
    """Which part of a model's output holds the class scores, and what they are.

    Attributes:
        select: ``None`` (the output is one tensor), a dict key, a tuple/list index, or a callable
            mapping the raw output to one tensor.
        kind: ``"logits"``, ``"probabilities"`` or ``"log_probabilities"`` (``"auto"`` before detection).
    """

    select: Selector = None
    kind: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown output kind {self.kind!r}; choose one of {KINDS}")

    def to_json(self) -> Dict[str, Any]:
        """Plain JSON (a callable selector is stored as its name and cannot be reloaded)."""
        if callable(self.select):
            return {"select": None, "callable": getattr(self.select, "__name__", "callable"), "kind": self.kind}
        return {"select": self.select, "kind": self.kind}

    @classmethod
    def from_json(cls, data: Optional[Dict[str, Any]]) -> OutputSpec:
        """Inverse of :meth:`to_json` (results saved before output specs existed: plain logits)."""
        data = data or {}
        return cls(select=data.get("select"), kind=data.get("kind", "logits"))


def map_tensors(fn: Callable[[torch.Tensor], Any], inputs):
    """``fn`` applied to every tensor of ``inputs`` (a tensor, a tuple/list or a dict of them)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(fn, x) for x in inputs)
    if isinstance(inputs, dict):
        return {k: map_tensors(fn, v) for k, v in inputs.items()}
    return inputs


def primary(inputs) -> torch.Tensor:
    """The part of ``inputs`` that varies per task: the tensor itself, or the first of a tuple/dict.

    Raises:
        ValueError: when ``inputs`` holds no tensor.
    """
    parts = list(inputs.values()) if isinstance(inputs, dict) else inputs
    if isinstance(parts, (tuple, list)) and parts:
        parts = parts[0]
    if not isinstance(parts, torch.Tensor):
        raise ValueError(f"inputs must be a tensor, or a tuple or dict of tensors whose first is the images; "
                         f"got {type(inputs).__name__}")
    return parts


def count(inputs) -> int:
    """Number of examples (dim 0 of the primary input)."""
    return primary(inputs).shape[0]


def call(model: Callable[..., Any], inputs):
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict (``model``:
    a module or any callable)."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _describe(raw) -> str:
    if isinstance(raw, dict):
        return f"a dict with keys {list(raw)}: pass output=<key>, e.g. output={next(iter(raw), '')!r} (CLI --output)"
    if isinstance(raw, (tuple, list)):
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in raw]
        return (f"a {type(raw).__name__} of {len(raw)} items {shapes}: pass output=<index>, e.g. output=0 "
                "(CLI --output 0)")
    return f"a {type(raw).__name__}: pass output=<callable returning the class scores tensor>"


def select(raw, selector: Selector = None) -> torch.Tensor:
    """The class-score tensor inside a model's raw output.

    Raises:
        ValueError: one line naming the output's keys/items when ``selector`` is missing or wrong.
    """
    if callable(selector):
        out = selector(raw)
    elif selector is None:
        out = raw
    elif isinstance(raw, dict):
        if selector not in raw:
            raise ValueError(f"output={selector!r} is not a key of the model's output; it has keys {list(raw)}")
        out = raw[selector]
    elif isinstance(raw, (tuple, list)):
        if not isinstance(selector, int) or not -len(raw) <= selector < len(raw):
            raise ValueError(f"output={selector!r} does not index the model's output, "
                             f"{_describe(raw).split(':')[0]}")
        out = raw[selector]
    else:
        raise ValueError(f"output={selector!r} given but the model returns one {type(raw).__name__}; drop output=")
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"hookchains needs the model's class scores as one tensor, but the model returns "
                         f"{_describe(out)}")
    if out.ndim < 2:
        raise ValueError(f"the model's output has shape {tuple(out.shape)}; hookchains needs N x classes "
                         "(or N x classes x positions for dense predictions)")
    return out


def detect_kind(scores: torch.Tensor) -> str:
    """``"probabilities"`` when every row over dim 1 is a distribution (values in [0, 1] summing to 1),
    ``"log_probabilities"`` when ``exp`` of it is, else ``"logits"`` (also for a meta tensor, which
    has no values)."""
    if scores.is_meta:  # shapes only (structure checks on the meta device): no values to recognise
        return "logits"
    s = scores.detach().double()
    tol = 1e-3 if scores.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if s.shape[1] < 2:
        return "logits"
    if s.min() >= 0 and s.max() <= 1 and torch.allclose(s.sum(1), torch.ones(()).double(), atol=tol):
        return "probabilities"
    if s.max() <= 0 and torch.allclose(s.exp().sum(1), torch.ones(()).double(), atol=tol):
        return "log_probabilities"
    return "logits"


def class_scores(raw, spec: OutputSpec) -> torch.Tensor:
    """Float32 scores whose ``log_softmax(-1)`` is the model's log-probabilities: ``N x C`` for a
    classifier, ``N x P x C`` for a dense ``N x C x ...`` prediction (P positions)."""
    out = select(raw, spec.select).float()
    kind = detect_kind(out) if spec.kind == "auto" else spec.kind
    if kind == "probabilities":
        out = out.clamp_min(torch.finfo(out.dtype).tiny).log()
    if out.ndim > 2:
        out = out.flatten(2).transpose(1, 2)
    return out


def stack(tasks: Sequence):
    """One batch per task (each a tensor or the same tuple/dict structure) stacked into tasks x N x ..."""
    first = tasks[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(list(tasks))
    if isinstance(first, (tuple, list)):
        return type(first)(stack([t[i] for t in tasks]) for i in range(len(first)))
    return {k: stack([t[k] for t in tasks]) for k in first}


def validate_inputs(inputs, ndim: Optional[int] = None) -> None:
    """Raise ``ValueError`` (one line, naming the modality) unless the primary input is a non-empty
    batch of integer token ids ``N x L`` (text), or a non-empty, finite, floating-point batch --
    ``N x C x L``, ``N x C x H x W`` or ``N x C x D x H x W``, or exactly ``ndim`` dims when given
    (what the model was attached with) -- and every input tensor holds the same ``N`` examples.

    Example:
        >>> validate_inputs(torch.zeros(2, 1, 100))
        >>> validate_inputs(torch.zeros(1, 100), ndim=3)
        Traceback (most recent call last):
        ValueError: the model takes 1-D signals (N, C, L) (audio, ECG, time series), got shape (1, 100): add a batch dimension with x.unsqueeze(0)
    """
    x = primary(inputs)
    if x.ndim == 2 and not x.is_floating_point() and ndim in (None, 2):  # text: token ids
        if x.numel() == 0:
            raise ValueError(f"the token ids are an empty batch (shape {tuple(x.shape)})")
        _same_count(inputs)
        return
    if ndim is not None and x.ndim != ndim:
        hint = ": add a batch dimension with x.unsqueeze(0)" if x.ndim == ndim - 1 else ""
        raise ValueError(f"the model takes {modality(ndim)}, got shape {tuple(x.shape)}{hint}")
    if x.ndim not in (3, 4, 5):
        raise ValueError(f"inputs must be a batch of {modality(3)}, {modality(4)} or {modality(5)}; "
                         f"got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"the {modality(x.ndim).split(' (')[0]} are an empty batch (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"the {modality(x.ndim).split(' (')[0]} must be floating point, got {x.dtype}: "
                         "normalise them as the model expects")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"the {modality(x.ndim).split(' (')[0]} contain {bad} NaN or infinite values")
    _same_count(inputs)


def _same_count(inputs) -> None:
    sizes = set()
    map_tensors(lambda t: sizes.add(t.shape[0] if t.ndim else None), inputs)
    if len(sizes) > 1:
        raise ValueError(f"every input needs the same number of examples along dim 0, got {sorted(map(str, sizes))}")


def modality(ndim: int) -> str:
    """Name of the data a batch with ``ndim`` dims holds (for error messages)."""
    return {2: "token ids (N, L)", 3: "1-D signals (N, C, L) (audio, ECG, time series)", 4: "images (N, C, H, W)",
            5: "volumes or video (N, C, D, H, W)"}.get(ndim, f"{ndim}-D tensors")
