"""Sites: the one vocabulary the whole package shares.

A *site* is a place in a model where hookchains attaches a learnable quantity of the NeuroChains
objective (paper Eq. 8):

* :class:`FilterSite` -- the output channels of a conv or linear unit. Its score vector ``S`` (Eq. 3)
  multiplies the output of the normalisation layer that follows the conv (or the conv itself when no
  norm follows), because a zeroed conv output would otherwise become ``beta - mu*gamma/sigma`` after an
  eval-mode BatchNorm (docs/design.md, measured).
* :class:`GateSite` -- a layer or block whose output shape equals its input shape. Its gate
  ``G = sigmoid(alpha / T)`` (Eq. 6) mixes ``G * F(H) + (1 - G) * H`` (Eq. 7).
* :class:`TokenSite` -- the token sequence leaving one transformer block (paper section 4.5).

Sites are plain, frozen data with stable module paths (``model.get_submodule(path)``) and a human
label in the paper's scheme (VGG ``L{index}``, ResNet ``L{stage}B{block}C{conv}`` / ``SC``, ViT
``B{block}``). Adapters (``hookchains.adapters``) find them; nothing here touches a model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from hookchains.inputs.forward import OutputSpec

__all__ = ["FilterSite", "GateSite", "TokenSite", "SiteMap"]


@dataclass(frozen=True)
class FilterSite:
    """Output channels of one conv/linear unit, scored after the norm that follows it.

    Attributes:
        name: module path of the conv/linear producing the channels (stable id).
        label: paper-style label, e.g. ``"L3B1C2"``; a filter is ``f"{label}_{index}"``.
        hook_module: module path whose output the score multiplies.
        fold_module: module path whose affine parameters absorb the score when materialising
            (the BatchNorm/LayerNorm after the conv, or the conv/linear itself).
        channels: number of output channels (= scores).
        channel_dim: dimension of ``hook_module``'s output that indexes channels (1 for NCHW, -1 for
            token/linear outputs).
        kind: ``"conv"`` or ``"linear"``.
        groups: conv groups (``groups == channels`` means depthwise).
        params: number of weight + bias parameters of the unit.
        width: consecutive elements along ``channel_dim`` that one score multiplies (1 for a filter;
            an attention head's ``head_dim`` for a transformer head site).
        on_input: the score multiplies the *input* of ``hook_module`` (its first positional argument)
            instead of its output: an attention head's context vector before the output projection.
    """

    name: str
    label: str
    hook_module: str
    fold_module: str
    channels: int
    channel_dim: int = 1
    kind: str = "conv"
    groups: int = 1
    params: int = 0
    width: int = 1
    on_input: bool = False

    @property
    def depthwise(self) -> bool:
        """True for a depthwise conv (one filter per input channel)."""
        return self.kind == "conv" and self.groups > 1 and self.groups == self.channels


@dataclass(frozen=True)
class GateSite:
    """A shape-preserving layer or block that a gate may remove as a whole (Eq. 6-7).

    Attributes:
        name: stable id (the block's module path, or the first module of a layer span).
        label: paper-style label (``"L3B2"`` for a ResNet block, ``"L21"`` for a VGG layer).
        first: module whose *input* is the gate's ``H``.
        last: module whose *output* is ``F(H)``; the gate mixes here.
        members: module paths that make up ``F`` (replaced by ``nn.Identity`` when removed).
        filter_sites: names of the filter sites inside ``F`` (not counted when the gate closes).
    """

    name: str
    label: str
    first: str
    last: str
    members: Tuple[str, ...]
    filter_sites: Tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenSite:
    """The token sequence leaving one transformer block.

    Attributes:
        name: module path of the block.
        label: ``"B{block}"``; a token slot is ``f"{label}_T{token}"``.
        tokens: sequence length (e.g. 197 for a 224 px, patch-16 ViT).
        prefix_tokens: leading class/register tokens that are never pruned.
    """

    name: str
    label: str
    tokens: int
    prefix_tokens: int = 1


@dataclass
class SiteMap:
    """Every site of one model, plus how they were found.

    ``discovery`` says which mechanism produced the graph facts (``"fx"`` when ``torch.fx`` traced the
    model, ``"probe"`` when one hooked forward pass was used instead) and ``adapter`` which family
    adapter labelled them. ``classifier`` is the final layer, never scored.
    """

    filters: List[FilterSite]
    gates: List[GateSite]
    tokens: List[TokenSite]
    adapter: str
    discovery: str
    classifier: Optional[str]
    input_shape: Tuple[int, ...]
    notes: List[str] = field(default_factory=list)
    output: OutputSpec = field(default_factory=OutputSpec)
    refused: Dict[str, Dict[str, str]] = field(default_factory=dict)

    def without(self, refused: Dict[str, Dict[str, str]]) -> SiteMap:
        """A copy without the sites in ``refused`` (``{"filters": {name: why}, "gates": {name: why}}``),
        which are recorded in ``refused`` and in ``notes``."""
        filters, gates = refused.get("filters", {}), refused.get("gates", {})
        kept_gates = [dataclasses.replace(g, filter_sites=tuple(f for f in g.filter_sites if f not in filters))
                      for g in self.gates if g.name not in gates]
        notes = self.notes + [f"{kind[:-1]} site {name!r} refused: {why}"
                              for kind, reasons in (("filters", filters), ("gates", gates)) for name, why in reasons.items()]
        merged = {kind: {**self.refused.get(kind, {}), **reasons} for kind, reasons in (("filters", filters), ("gates", gates))}
        return dataclasses.replace(self, filters=[f for f in self.filters if f.name not in filters], gates=kept_gates,
                                   notes=notes, refused=merged)

    def filter(self, name: str) -> FilterSite:
        """The filter site called ``name`` (KeyError naming close sites otherwise)."""
        for site in self.filters:
            if site.name == name:
                return site
        raise KeyError(f"no filter site {name!r}")

    def totals(self) -> Dict[str, int]:
        """Counts shown by ``hookchains inspect`` (conv filters, linear units, gates, token slots)."""
        conv = [s for s in self.filters if s.kind == "conv"]
        linear = [s for s in self.filters if s.kind == "linear"]
        return {
            "filter_sites": len(self.filters),
            "conv_filters": sum(s.channels for s in conv),
            "linear_units": sum(s.channels for s in linear),
            "scorable_filters": sum(s.channels for s in self.filters),
            "depthwise_filters": sum(s.channels for s in conv if s.depthwise),
            "gate_sites": len(self.gates),
            "token_sites": len(self.tokens),
            "token_slots": sum(s.tokens for s in self.tokens),
            "conv_params": sum(s.params for s in conv),
            "linear_params": sum(s.params for s in linear),
        }

    def to_json(self) -> Dict[str, Any]:
        """Plain-JSON form (used by ``inspect --json`` and saved results)."""
        return {
            "adapter": self.adapter,
            "discovery": self.discovery,
            "classifier": self.classifier,
            "input_shape": list(self.input_shape),
            "notes": list(self.notes),
            "output": self.output.to_json(),
            "refused": dict(self.refused),
            "filters": [dataclasses.asdict(s) for s in self.filters],
            "gates": [dataclasses.asdict(s) for s in self.gates],
            "tokens": [dataclasses.asdict(s) for s in self.tokens],
            "totals": self.totals(),
        }

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> SiteMap:
        """Inverse of :meth:`to_json`."""
        gates = [GateSite(**{**g, "members": tuple(g["members"]), "filter_sites": tuple(g["filter_sites"])})
                 for g in data["gates"]]
        return cls(
            filters=[FilterSite(**f) for f in data["filters"]],
            gates=gates,
            tokens=[TokenSite(**t) for t in data["tokens"]],
            adapter=data["adapter"],
            discovery=data["discovery"],
            classifier=data["classifier"],
            input_shape=tuple(data["input_shape"]),
            notes=list(data.get("notes", [])),
            output=OutputSpec.from_json(data.get("output")),
            refused=dict(data.get("refused", {})),
        )
