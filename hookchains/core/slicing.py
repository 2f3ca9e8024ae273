"""Materialise a transformer sub-network by direct slicing: heads, neurons and layers physically removed.

For a :class:`~hookchains.Subnetwork` fitted on a Hugging Face model (:mod:`hookchains.adapters.transformers`),
on a deep copy of the model (``transformers`` 5.x has no ``prune_heads``; torch-pruning is not needed,
every cut is a plain row/column selection):

1. **layers** whose gate is closed become :class:`~hookchains.core.state.PassThrough` (Eq. 7, ``G = 0``);
2. **heads**: the query/key/value projections keep the output rows of the kept heads (the three slices
   of a fused GPT-2 ``c_attn``), the output projection keeps their input columns, each multiplied by its
   head's score ``S`` (the thresholded network scales a kept head by ``S``), and the attention's head
   count (``num_attention_heads``/``num_heads``, ``all_head_size``/``split_size``) is updated;
3. **MLP neurons**: the first projection keeps the kept neurons' rows, the second their columns times ``S``;
4. **check**: on the given inputs the module's class scores equal the thresholded hooked network's within
   ``tolerance x max|score|``, else :class:`~hookchains.core.materialize.MaterializeError` (one line).

A layer left with no head (or no neuron) keeps one whose output columns are zero: exact, and the
attention code needs at least one head; the report says how many such placeholders there are.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hookchains.core.objectives import OutputLogits
    >>> from hookchains.core.testing import random_subnetwork
    >>> bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                                                 intermediate_size=64, vocab_size=50, num_labels=3))
    >>> model, ids = OutputLogits(bert.eval()), {"input_ids": torch.randint(0, 50, (2, 5))}
    >>> sub = random_subnetwork(model, ids, keep=0.5, gates_open=True)
    >>> small, report = materialize_transformer(sub, model, ids)
    >>> report.params_after < report.params_before and report.max_abs_diff <= report.tolerance
    True
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn

from hookchains.adapters.transformers import LayerLayout, transformer_layers
from hookchains.core.attach import ScoreHooks, strip_hooks
from hookchains.core.materialize import TOLERANCE, MaterializeError
from hookchains.core.state import PassThrough, tensor_of
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.forward import call, class_scores

__all__ = ["SlicedReport", "materialize_transformer", "parameter_count"]


@dataclass
class SlicedReport:
    """Physical facts of a sliced transformer: kept / total heads, neurons and layers, parameters before
    and after (the whole model, and its transformer layers alone: embeddings and heads stay), the
    exactness check (``max_abs_diff`` <= ``tolerance``), the method and notes."""

    heads_kept: int
    heads_total: int
    neurons_kept: int
    neurons_total: int
    layers_kept: int
    layers_total: int
    params_before: int
    params_after: int
    layer_params_before: int
    layer_params_after: int
    max_abs_diff: float
    tolerance: float
    method: str = "direct slicing"
    notes: List[str] = field(default_factory=list)

    def to_json(self) -> Dict[str, object]:
        """Plain JSON."""
        return asdict(self)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _kept(sub: Subnetwork, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept units of site ``name`` and their scores (at least one; a placeholder at 0)."""
    s = sub.scores[name].float()
    idx = torch.nonzero(s >= sub.tau).flatten()
    if not len(idx):
        return torch.zeros(1, dtype=torch.long), torch.zeros(1)
    return idx, s[idx]


def _set(module: nn.Module, weight: torch.Tensor, bias) -> None:
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.contiguous(), requires_grad=module.bias.requires_grad)


def _set_size(module: nn.Module, name: str, size: int) -> None:
    """Record a sliced layer's new size (``out_features``, ``in_features``, GPT-2 ``Conv1D``'s ``nf``): a
    plain attribute, stored as ``nn.Module.__setattr__`` stores any non-tensor value."""
    object.__setattr__(module, name, size)


def _keep_outputs(module: nn.Module, rows: torch.Tensor, conv1d: bool) -> None:
    """Keep output features ``rows`` of an ``nn.Linear`` (weight out x in) or GPT-2 ``Conv1D`` (in x out)."""
    bias = module.bias.data[rows] if isinstance(module.bias, torch.Tensor) else None
    if conv1d:
        _set(module, tensor_of(module).data[:, rows], bias)
        _set_size(module, "nf", len(rows))
    else:
        _set(module, tensor_of(module).data[rows], bias)
        _set_size(module, "out_features", len(rows))


def _keep_inputs(module: nn.Module, cols: torch.Tensor, scale: torch.Tensor, conv1d: bool) -> None:
    """Keep input features ``cols`` of a projection, each scaled by ``scale`` (folded score)."""
    w = tensor_of(module).data
    if conv1d:
        _set(module, w[cols] * scale.to(w)[:, None], None)
    else:
        _set(module, w[:, cols] * scale.to(w)[None, :], None)
        _set_size(module, "in_features", len(cols))


def _slice_heads(model: nn.Module, layer: LayerLayout, heads: torch.Tensor, scale: torch.Tensor) -> None:
    d = layer.head_dim
    cols = (heads[:, None] * d + torch.arange(d)).flatten()
    width = layer.heads * d
    for path in layer.qkv:
        rows = torch.cat([cols + k * width for k in range(3)]) if len(layer.qkv) == 1 else cols
        _keep_outputs(model.get_submodule(path), rows, layer.conv1d)
    _keep_inputs(model.get_submodule(layer.out_proj), cols, scale.repeat_interleave(d), layer.conv1d)
    attention = model.get_submodule(layer.attention)
    for name, value in (("num_attention_heads", len(heads)), ("num_heads", len(heads)),
                        ("all_head_size", len(cols)), ("split_size", len(cols))):
        if hasattr(attention, name):
            setattr(attention, name, value)


def _slice_neurons(model: nn.Module, layer: LayerLayout, neurons: torch.Tensor, scale: torch.Tensor) -> None:
    _keep_outputs(model.get_submodule(layer.fc_in), neurons, layer.conv1d)
    _keep_inputs(model.get_submodule(layer.fc_out), neurons, scale, layer.conv1d)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


@torch.no_grad()
def _hard_scores(model: nn.Module, sub: Subnetwork, inputs) -> torch.Tensor:
    """Class scores of the thresholded hooked network (the reference the sliced module must equal)."""
    hooks = ScoreHooks(model, sub.sites, tau=sub.tau, temperature=sub.temperature, score_max=None)
    try:
        hooks.load_state(sub.scores, sub.gate_logits)
        with hooks.using("hard"):
            return class_scores(call(model, inputs), sub.sites.output)
    finally:
        hooks.detach()


def _cut(work: nn.Module, sub: Subnetwork) -> Dict[str, int]:
    """Slice every layer of ``work`` in place; returns kept counts and placeholder counts."""
    counts = {"heads": 0, "neurons": 0, "layers": 0, "placeholders": 0}
    for layer in transformer_layers(work):
        if not sub.gate_open(layer.path):
            _replace(work, layer.path, PassThrough())
            continue
        counts["layers"] += 1
        for name, cut, unit in ((layer.attention, _slice_heads, "heads"), (layer.fc_in, _slice_neurons, "neurons")):
            idx, scale = _kept(sub, name)
            cut(work, layer, idx, scale)
            placeholder = not bool(scale.any())
            counts[unit] += 0 if placeholder else len(idx)
            counts["placeholders"] += int(placeholder)
    return counts


def materialize_transformer(sub: Subnetwork, model: nn.Module, inputs, *,
                            tolerance: float = TOLERANCE) -> Tuple[nn.Module, SlicedReport]:
    """Build the thresholded sub-network of a transformers model as a physically smaller module.

    Args:
        sub: a result of :func:`hookchains.fit` on hooks from the ``transformers`` adapter.
        model: the model the hooks were attached to (an objective wrapper or the HF model; untouched).
        inputs: a batch the model takes (a dict of token ids and attention mask, or pixel values) on
            which the sliced module is checked against the hooked thresholded network.
        tolerance: relative tolerance of that check (``x max|class score|``).

    Returns:
        ``(module, SlicedReport)``; the module is an independent copy in eval mode.

    Raises:
        ValueError: ``sub`` was not fitted with the ``transformers`` adapter.
        MaterializeError: the sliced module differs from the thresholded network (one line, with the figures).
    """
    if sub.sites.adapter != "transformers":
        raise ValueError(f"materialize_transformer needs a result of the 'transformers' adapter, not "
                         f"{sub.sites.adapter!r}: use hookchains.materialize")
    work = strip_hooks(copy.deepcopy(model)).eval()  # our own copy: no state of the user's model to restore
    reference = _hard_scores(work, sub, inputs)
    layers = transformer_layers(work)
    totals = (sum(layer.heads for layer in layers), sum(sub.scores[layer.fc_in].numel() for layer in layers))
    before = parameter_count(work)

    def in_layers() -> int:
        return sum(parameter_count(work.get_submodule(layer.path)) for layer in layers)
    layers_before = in_layers()
    counts = _cut(work, sub)
    with torch.no_grad():
        diff = float((class_scores(call(work, inputs), sub.sites.output) - reference).abs().max())
    bound = tolerance * max(float(reference.abs().max()), 1e-12)
    if diff > bound:
        raise MaterializeError(f"the sliced transformer differs from the thresholded network by {diff:.3g} "
                               f"(> {bound:.3g}); keep the hooked network (hookchains.attach) and please report this model")
    notes = [f"{counts['placeholders']} layer part(s) with nothing kept hold one zeroed head/neuron "
             "(the attention code needs one)"] if counts["placeholders"] else []
    report = SlicedReport(counts["heads"], totals[0], counts["neurons"], totals[1], counts["layers"], len(layers),
                          before, parameter_count(work), layers_before, in_layers(), diff, bound, notes=notes)
    return work.eval(), report
