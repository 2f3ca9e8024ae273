"""The adapter contract and the generic adapter every family adapter builds on.

An adapter *finds sites*; it never runs the optimisation. The generic adapter works on any model:

* **filter sites**: every ``Conv1d``/``Conv2d``/``Conv3d``/``Linear`` that ran, except the final
  classifier (the output layer, or the last conv/linear unit when the model ends in parameter-free
  modules such as ``nn.Softmax`` or pool + ``nn.Flatten``); the
  score sits on the affine norm that is the conv's only consumer (timm ``BatchNormAct2d``: between its
  norm and its activation), else on the conv itself;
* **gate sites**: (a) *blocks* -- modules with their own ``forward`` (not plain containers) that contain
  a conv/linear, run once per forward and return one tensor of their input's shape; the outermost such module is chosen,
  except that a module holding two or more candidates of one class (a stage of repeated blocks) is
  descended into; (b) *layer spans* in top-level ``nn.Sequential`` stacks (VGG): a conv/linear with the
  norm/activation/dropout leaves that follow it, when the span's output shape equals its input shape
  and each of its modules runs once per forward (a span stops before a shared activation instance);
* **token sites**: none (the ViT adapter adds them).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from torch import nn

from hookchains.core.sites import FilterSite, GateSite, SiteMap, TokenSite
from hookchains.inputs.forward import OutputSpec, primary

from .graph import SCORED_TYPES, ModelGraph, is_container, read_graph

__all__ = ["Adapter", "SCORED_TYPES"]

_ELEMENTWISE: Tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU,
                                  nn.Hardswish, nn.LeakyReLU, nn.Dropout, nn.Identity, nn.Tanh, nn.Sigmoid)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


class Adapter:
    """Generic site discovery; family adapters override :meth:`matches`, :meth:`filter_label`,
    :meth:`gate_label` and, where the family knows better, :meth:`gate_sites` / :meth:`token_sites`."""

    name = "generic"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this adapter knows the model's family (the generic one knows every model)."""
        return True

    # ---------------------------------------------------------------- labels
    def filter_label(self, path: str) -> str:
        """Human label of a filter site; generic: the module path itself."""
        return path

    def gate_label(self, path: str) -> str:
        """Human label of a gate site; generic: the module path itself."""
        return path

    # ---------------------------------------------------------------- discovery
    def discover(self, model: nn.Module, example, use_fx: bool = True,
                 output: OutputSpec = OutputSpec()) -> SiteMap:
        """Find every site of ``model`` using one probe pass on ``example`` (and fx when it traces)."""
        graph = read_graph(model, example, use_fx=use_fx, selector=output.select)
        classifier = self.classifier(model, graph)
        filters = self.filter_sites(model, graph, classifier)
        gates = self.gate_sites(model, graph, filters)
        tokens = self.token_sites(model, graph)
        notes = [graph.reason] if graph.reason else []
        depthwise = sum(1 for f in filters if f.depthwise)
        if depthwise:
            notes.append(f"{depthwise} depthwise conv sites are scored per channel; a channel is removed "
                         "physically only where every coupled producer is off, otherwise it is zeroed")
        return SiteMap(filters, gates, tokens, self.name, graph.discovery, classifier,
                       tuple(primary(example).shape), notes, output)

    def classifier(self, model: nn.Module, graph: ModelGraph) -> Optional[str]:
        """The final classifier (never scored): timm's ``get_classifier()``, the output layer when it is
        a conv/linear unit, else the last conv/linear unit that ran (a model ending in ``nn.Softmax``,
        or in a conv classifier + pool + ``nn.Flatten``)."""
        if hasattr(model, "get_classifier"):
            head = model.get_classifier()
            for path, module in model.named_modules():
                if module is head and isinstance(module, SCORED_TYPES):
                    return path
        if graph.output_module is not None and isinstance(model.get_submodule(graph.output_module), SCORED_TYPES):
            return graph.output_module
        scored = [c for c in graph.calls.values() if isinstance(model.get_submodule(c.path), SCORED_TYPES)]
        return max(scored, key=lambda c: c.order).path if scored else None

    def filter_sites(self, model: nn.Module, graph: ModelGraph, classifier: Optional[str]) -> List[FilterSite]:
        """One :class:`FilterSite` per conv/linear that ran, in execution order."""
        sites = []
        for call in sorted(graph.calls.values(), key=lambda c: c.order):
            module = model.get_submodule(call.path)
            if not isinstance(module, SCORED_TYPES) or call.path == classifier or call.out_shape is None:
                continue
            norm = graph.follower.get(call.path)
            hook, fold = call.path, call.path
            if norm is not None:
                norm_module = model.get_submodule(norm)
                fold = norm
                has_inner_drop = hasattr(norm_module, "act") and isinstance(getattr(norm_module, "drop", None), nn.Module)
                hook = f"{norm}.drop" if has_inner_drop else norm
            linear = isinstance(module, nn.Linear)
            sites.append(FilterSite(
                name=call.path, label=self.filter_label(call.path), hook_module=hook, fold_module=fold,
                channels=module.out_features if linear else module.out_channels,
                channel_dim=-1 if linear else 1, kind="linear" if linear else "conv",
                groups=1 if linear else module.groups, params=_param_count(module)))
        return sites

    def gate_sites(self, model: nn.Module, graph: ModelGraph, filters: Sequence[FilterSite]) -> List[GateSite]:
        """Shape-preserving blocks, then shape-preserving layer spans outside any block."""
        blocks = self._block_paths(model, graph)
        gates = [self._gate(path, path, (path,), filters) for path in blocks]
        for members in self._layer_spans(model, graph, blocks):
            gates.append(self._gate(members[0], members[-1], tuple(members), filters))
        order = {p: c.order for p, c in graph.calls.items()}
        return sorted(gates, key=lambda g: order[g.first])

    def token_sites(self, model: nn.Module, graph: ModelGraph) -> List[TokenSite]:
        """Token sequences; none for a generic model."""
        return []

    # ---------------------------------------------------------------- helpers
    def _gate(self, first: str, last: str, members: Tuple[str, ...], filters: Sequence[FilterSite]) -> GateSite:
        inside = tuple(f.name for f in filters
                       if any(f.name == m or f.name.startswith(m + ".") for m in members))
        return GateSite(name=first, label=self.gate_label(first), first=first, last=last,
                        members=members, filter_sites=inside)

    @staticmethod
    def _shape_preserving(graph: ModelGraph, path: str) -> bool:
        call = graph.calls.get(path)
        return bool(call and call.calls == 1 and call.args == 1 and call.tensor_out and call.in_shape
                    and call.in_shape == call.out_shape)

    def _block_paths(self, model: nn.Module, graph: ModelGraph) -> List[str]:
        def contains_scored(m: nn.Module) -> bool:
            return any(isinstance(x, SCORED_TYPES) for x in m.modules())

        def candidates(module: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
            found = []
            for name, child in module.named_children():
                path = f"{prefix}.{name}" if prefix else name
                if (not is_container(child) and next(child.children(), None) is not None
                        and contains_scored(child) and self._shape_preserving(graph, path)):
                    found.append((path, child))
                else:
                    found.extend(candidates(child, path))
            return found

        def choose(module: nn.Module, prefix: str) -> List[str]:
            chosen = []
            for path, child in candidates(module, prefix):
                inner = candidates(child, path)
                kinds = [type(m) for _, m in inner]
                repeated = any(kinds.count(k) >= 2 for k in kinds)
                chosen.extend(choose(child, path) if repeated else [path])
            return chosen

        return choose(model, "")

    def _layer_spans(self, model: nn.Module, graph: ModelGraph, blocks: Sequence[str]) -> List[List[str]]:
        spans = []
        for path, seq in model.named_modules():
            if not isinstance(seq, nn.Sequential) or not self._top_level_container(model, path):
                continue
            if any(path == b or path.startswith(b + ".") for b in blocks):
                continue
            children = [(f"{path}.{n}" if path else n, c) for n, c in seq.named_children()]
            spans.extend(self._spans_in(children, graph))
        return spans

    @staticmethod
    def _top_level_container(model: nn.Module, path: str) -> bool:
        parts = path.split(".") if path else []
        return all(is_container(model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))

    def _spans_in(self, children, graph: ModelGraph) -> List[List[str]]:
        spans, i = [], 0
        while i < len(children):
            path, module = children[i]
            if not isinstance(module, SCORED_TYPES) or path not in graph.calls:
                i += 1
                continue
            j = i + 1
            while (j < len(children) and isinstance(children[j][1], _ELEMENTWISE) and children[j][0] in graph.calls
                   and graph.calls[children[j][0]].calls == 1):  # a shared module ends the span before it
                j += 1
            first, last = graph.calls[path], graph.calls[children[j - 1][0]]
            if first.calls == 1 and first.args == 1 and first.in_shape and first.in_shape == last.out_shape:
                spans.append([p for p, _ in children[i:j]])
            i = j
        return spans
