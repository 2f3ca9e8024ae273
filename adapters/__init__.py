"""Adapters find sites (filters, gates, tokens) in a model; they never run the optimisation.

``discover(model)`` picks the first registered family adapter that recognises the model (ResNet,
VGG, MobileNet/EfficientNet, ViT/DeiT, Hugging Face transformers, then any added with :func:`register_adapter`) and falls back
to the generic adapter, which works on any model through torch.fx or, when the model does not trace,
one probe forward pass.

Example:
    >>> import timm, hookchains.adapters as ad
    >>> sites = ad.discover(timm.create_model("resnet50"))
    >>> sites.totals()["conv_filters"]
    26560
"""
from __future__ import annotations

import difflib
from typing import Dict, Sequence, Type

import torch
from torch import nn

from hookchains.core.sites import SiteMap
from hookchains.core.state import explaining
from hookchains.inputs.forward import OutputSpec, Selector, call, detect_kind, map_tensors, select

from .base import Adapter
from .families import MobileNetAdapter, ResNetAdapter, VGGAdapter, ViTAdapter
from .transformers import TransformersAdapter

__all__ = ["Adapter", "ADAPTERS", "discover", "get_adapter", "register_adapter", "probe_output", "default_example",
           "default_input_shape"]

ADAPTERS: Dict[str, Type[Adapter]] = {
    cls.name: cls for cls in (ResNetAdapter, VGGAdapter, MobileNetAdapter, ViTAdapter, Adapter)
}  # tried in this order by "auto"; the generic adapter (it matches everything) stays last


def register_adapter(cls: Type[Adapter]) -> Type[Adapter]:
    """Register a family adapter (usable as a class decorator), as ``timm.models.register_model`` does.

    ``auto`` tries it after the built-in families and before the generic fallback; ``--adapter NAME``
    selects it by its ``name``.

    Raises:
        TypeError: ``cls`` is not an :class:`Adapter` subclass.
        ValueError: its ``name`` is already registered.

    Example:
        >>> @register_adapter
        ... class TinyAdapter(Adapter):
        ...     name = "tiny"
        ...     @classmethod
        ...     def matches(cls, model):
        ...         return type(model).__name__ == "Tiny"
        >>> list(ADAPTERS)[-3:]
        ['transformers', 'tiny', 'generic']
        >>> del ADAPTERS["tiny"]
    """
    if not (isinstance(cls, type) and issubclass(cls, Adapter)) or cls is Adapter:
        raise TypeError(f"register_adapter needs a subclass of hookchains.adapters.Adapter, got {cls!r}")
    if cls.name in ADAPTERS:
        raise ValueError(f"an adapter named {cls.name!r} is already registered; give yours another `name`")
    generic = ADAPTERS.pop(Adapter.name)
    ADAPTERS[cls.name] = cls
    ADAPTERS[Adapter.name] = generic
    return cls


register_adapter(TransformersAdapter)  # Hugging Face layers, by module structure (no transformers import)


def get_adapter(model: nn.Module, adapter: str = "auto") -> Adapter:
    """The adapter called ``adapter``, or with ``"auto"`` the first family adapter matching ``model``."""
    if adapter == "auto":
        return next(cls() for cls in ADAPTERS.values() if cls.matches(model))
    if adapter not in ADAPTERS:
        close = difflib.get_close_matches(adapter, list(ADAPTERS), n=3)
        raise ValueError(f"unknown adapter {adapter!r}; choose one of {sorted(ADAPTERS)}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ADAPTERS[adapter]()


def default_input_shape(model: nn.Module) -> Sequence[int]:
    """(1, C, H, W) from timm's pretrained config where present, else (1, 3, 224, 224)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return (1, *cfg.get("input_size", (3, 224, 224)))


def default_example(model: nn.Module) -> torch.Tensor:
    """Zeros of :func:`default_input_shape` on the model's device (a probe input, not data)."""
    param = next(model.parameters(), None)
    return torch.zeros(*default_input_shape(model), device=param.device if param is not None else "cpu")


def _describe_inputs(example) -> str:
    if isinstance(example, torch.Tensor):
        return f"an input of shape {tuple(example.shape)}"
    return f"inputs {map_tensors(lambda t: tuple(t.shape), example)}"


def probe_output(model: nn.Module, example, output: Selector = None, output_kind: str = "auto") -> OutputSpec:
    """Run ``model`` once on ``example`` and say where its class scores are and what they are.

    Raises:
        ValueError: one line when the forward fails on ``example`` (e.g. a model with several inputs
            given one tensor), or when the output needs ``output=`` (the line lists its keys).
    """
    try:
        with torch.no_grad():
            raw = call(model, example)
    except Exception as exc:  # the user's own forward: any error means the example does not fit it
        raise ValueError(f"{type(model).__name__}.forward failed on {_describe_inputs(example)} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); pass "
                         "example=<one batch the model takes>, a tuple or dict for several inputs, "
                         "e.g. attach(model, example=(images[:1], metadata[:1]))") from None
    scores = select(raw, output)
    return OutputSpec(output, detect_kind(scores) if output_kind == "auto" else output_kind)


def discover(model: nn.Module, adapter: str = "auto", example=None, use_fx: bool = True,
             output: Selector = None, output_kind: str = "auto") -> SiteMap:
    """Find the sites of ``model`` (in eval mode) with one probe pass on ``example``.

    Args:
        model: any ``nn.Module`` that maps a batch to class scores (logits, probabilities or
            log-probabilities; N x classes, or N x classes x ... for dense predictions).
        adapter: ``"auto"`` or one of :data:`ADAPTERS`.
        example: a batch of the input shape the model will see (default: zeros of timm's
            ``input_size`` or 1x3x224x224), or a tuple/dict of inputs for a model with several
            (:mod:`hookchains.inputs.forward`). Sequence lengths of token sites depend on it.
        use_fx: try ``torch.fx`` for graph facts first (fallback: probe pass).
        output: where the class scores are in a dict/tuple/list output (key, index or callable).
        output_kind: ``"auto"`` (detected from the values), ``"logits"``, ``"probabilities"`` or
            ``"log_probabilities"``.

    Raises:
        ValueError: when the model has no conv or linear layer to score, its forward fails on
            ``example``, or its output needs ``output=``.
    """
    example = default_example(model) if example is None else example
    with explaining(model):
        spec = probe_output(model, example, output, output_kind)
        sites = get_adapter(model, adapter).discover(model, example, use_fx=use_fx, output=spec)
    if spec.kind != "logits":
        sites.notes.append(f"the model outputs {spec.kind.replace('_', '-')} (detected or declared): the KL is "
                           "taken between these output distributions")
    if not sites.filters and not sites.tokens:
        raise ValueError(f"{type(model).__name__} has no conv or linear layer besides the classifier: "
                         "nothing to score; hookchains explains conv/linear/ViT models")
    return sites
