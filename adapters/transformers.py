"""Hugging Face ``transformers`` models, found by module structure (``torch.fx`` cannot trace ``BertModel``).

The mapping of the paper's vocabulary onto a transformer layer (docs/design.md, "Text transformers"):

* **filter sites**, two per layer: the layer's **MLP neurons** (the intermediate activation, e.g. BERT's
  ``intermediate`` output, GPT-2's ``mlp.act`` output; one score per neuron) and its **attention heads**
  (one score per head, multiplying that head's slice of the context vector on its way into the output
  projection: ``FilterSite.on_input``, ``width = head_dim``);
* **gate sites**: whole layers (shape-preserving, Eq. 6-7): a closed layer passes its input through;
* **token sites** (BERT-like encoders given token ids; HF ViT/DeiT image classifiers given images): the
  sequence entering each layer, one site per layer, the first token ([CLS]; DeiT: also its distillation
  token) never pruned (:mod:`hookchains.tokens.encoder`).

Recognised layouts (no ``transformers`` import: the structure is read from module attributes):

* BERT-like encoders (BERT, MiniLM, RoBERTa, ...): ``encoder.layer.{i}`` with ``attention.self``
  (or ``attention.attention``) ``.query/.key/.value``, ``attention.output.dense``, ``intermediate.dense``,
  ``output.dense``;
* projection-style layers (transformers 5.x HF ViT, CLIP): ``attention.{q,k,v,o}_proj`` (or ``self_attn``,
  ``attn``), ``mlp.fc1``, ``mlp.activation_fn``, ``mlp.fc2``;
* GPT-2 family: ``h.{i}`` with ``attn.c_attn`` (fused q/k/v, ``Conv1D``), ``attn.c_proj``, ``mlp.c_fc``,
  ``mlp.act``, ``mlp.c_proj``.

Labels: layer ``i`` (1-based) is gate ``L{i}``; its heads are ``L{i}.heads_{h}``, its neurons ``L{i}.mlp_{n}``.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> [(l.path, l.heads, l.head_dim) for l in transformer_layers(model)]
    [('encoder.layer.0', 4, 8), ('encoder.layer.1', 4, 8)]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from torch import nn

from hookchains.core.sites import FilterSite, GateSite, SiteMap, TokenSite
from hookchains.inputs.forward import OutputSpec, primary

from .base import Adapter

__all__ = ["LayerLayout", "TransformersAdapter", "transformer_layers", "encoder_layers", "patch_embeddings",
           "prefix_tokens", "token_layers", "IMAGE_TOKEN_MODELS"]

IMAGE_TOKEN_MODELS = ("vit", "deit")
"""``config.model_type`` of the HF image classifiers whose head reads only the class (and distillation)
token, so a pruned patch token cannot reach the output (BEiT and DINOv2 also pool the patches)."""


@dataclass(frozen=True)
class LayerLayout:
    """Module paths of one transformer layer (all relative to the model given to :func:`transformer_layers`).

    Attributes:
        path: the layer (its gate); index: 0-based position in its stack.
        attention: the self-attention module holding the head count (``num_attention_heads`` or ``num_heads``).
        qkv: the query, key and value projections, or one fused projection (GPT-2 ``c_attn``).
        out_proj: the attention's output projection (heads enter it concatenated).
        fc_in, act, fc_out: the MLP's first projection, the module whose output is the activation, the second.
        heads, head_dim: attention heads and their width.
        conv1d: the projections are GPT-2 ``Conv1D`` (weight ``in x out``), not ``nn.Linear``.
    """

    path: str
    index: int
    attention: str
    qkv: Tuple[str, ...]
    out_proj: str
    fc_in: str
    act: str
    fc_out: str
    heads: int
    head_dim: int
    conv1d: bool = False


def _has(module: nn.Module, *paths: str) -> bool:
    try:
        return all(isinstance(module.get_submodule(p), nn.Module) for p in paths)
    except AttributeError:
        return False


def _encoder_layout(path: str, index: int, layer: nn.Module) -> Optional[LayerLayout]:
    """BERT-like layer (``attention.self`` or ViT's ``attention.attention``)."""
    for inner in ("self", "attention"):
        att = f"attention.{inner}"
        if _has(layer, f"{att}.query", f"{att}.key", f"{att}.value", "attention.output.dense",
                "intermediate.dense", "output.dense"):
            module = layer.get_submodule(att)
            heads = int(getattr(module, "num_attention_heads", 0))
            size = int(getattr(module, "attention_head_size", 0))
            if not heads or not size:
                return None
            return LayerLayout(path, index, f"{path}.{att}", tuple(f"{path}.{att}.{q}" for q in ("query", "key", "value")),
                               f"{path}.attention.output.dense", f"{path}.intermediate.dense", f"{path}.intermediate",
                               f"{path}.output.dense", heads, size)
    return None


def _projection_layout(path: str, index: int, layer: nn.Module) -> Optional[LayerLayout]:
    """Layer with ``q_proj/k_proj/v_proj/o_proj`` attention and an ``fc1``/``activation_fn``/``fc2`` MLP
    (transformers 5.x HF ViT, CLIP)."""
    for att in ("attention", "self_attn", "attn"):
        if _has(layer, *(f"{att}.{p}_proj" for p in "qkvo"), "mlp.fc1", "mlp.activation_fn", "mlp.fc2"):
            module = layer.get_submodule(att)
            heads = int(getattr(module, "num_attention_heads", 0) or getattr(module, "num_heads", 0))
            size = int(getattr(module, "head_dim", 0))
            if not heads or not size:
                return None
            return LayerLayout(path, index, f"{path}.{att}", tuple(f"{path}.{att}.{p}_proj" for p in "qkv"),
                               f"{path}.{att}.o_proj", f"{path}.mlp.fc1", f"{path}.mlp.activation_fn",
                               f"{path}.mlp.fc2", heads, size)
    return None


def _gpt2_layout(path: str, index: int, layer: nn.Module) -> Optional[LayerLayout]:
    """GPT-2 layer (fused ``c_attn``, ``Conv1D`` projections)."""
    if not _has(layer, "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.act", "mlp.c_proj"):
        return None
    att = layer.get_submodule("attn")
    heads, size = int(getattr(att, "num_heads", 0)), int(getattr(att, "head_dim", 0))
    if not heads or not size or getattr(att, "is_cross_attention", False):
        return None
    conv1d = type(layer.get_submodule("attn.c_attn")).__name__ == "Conv1D"
    return LayerLayout(path, index, f"{path}.attn", (f"{path}.attn.c_attn",), f"{path}.attn.c_proj",
                       f"{path}.mlp.c_fc", f"{path}.mlp.act", f"{path}.mlp.c_proj", heads, size, conv1d)


def transformer_layers(model: nn.Module) -> List[LayerLayout]:
    """The layers of the first recognised layer stack in ``model`` (a ``ModuleList`` whose every entry
    has a known layout), in order; ``[]`` when the model is not a recognised transformer."""
    for path, stack in model.named_modules():
        if not isinstance(stack, nn.ModuleList) or not len(stack):
            continue
        for reader in (_encoder_layout, _projection_layout, _gpt2_layout):
            layouts = [reader(f"{path}.{i}", i, layer) for i, layer in enumerate(stack)]
            found = [layout for layout in layouts if layout is not None]
            if len(found) == len(layouts):
                return found
    return []


def _params(model: nn.Module, *paths: str) -> int:
    return sum(p.numel() for path in paths for p in model.get_submodule(path).parameters())


def _out_width(module: nn.Module) -> int:
    """Output features of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (``nf``)."""
    return int(getattr(module, "out_features", 0) or getattr(module, "nf", 0))


def encoder_layers(model: nn.Module) -> List[LayerLayout]:
    """The layers of ``model`` when they are BERT-like (``attention.self.query/key/value``), else ``[]``."""
    layers = transformer_layers(model)
    return layers if all(len(layer.qkv) == 3 and layer.attention.endswith(".self") for layer in layers) else []


def patch_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The embeddings module of an HF ViT-style image model (``patch_embeddings`` and a ``cls_token``
    parameter), or ``None``."""
    for _, module in model.named_modules():
        if hasattr(module, "patch_embeddings") and isinstance(getattr(module, "cls_token", None), nn.Parameter):
            return module
    return None


def prefix_tokens(model: nn.Module) -> int:
    """Prefix tokens of an HF ViT-style image model (:func:`patch_embeddings`): the class token, plus
    DeiT's distillation token; 0 for a model without patch embeddings."""
    embeddings = patch_embeddings(model)
    if embeddings is None:
        return 0
    return 1 + isinstance(getattr(embeddings, "distillation_token", None), nn.Parameter)


def token_layers(model: nn.Module) -> List[LayerLayout]:
    """The layers whose input sequences are token sites: BERT-like encoder layers (:func:`encoder_layers`),
    or every layer of an HF ViT-style image model (:func:`patch_embeddings`); else ``[]``."""
    return encoder_layers(model) or (transformer_layers(model) if patch_embeddings(model) is not None else [])


def _token_sites(model: nn.Module, example) -> List[TokenSite]:
    """One token site per layer of :func:`token_layers`: for token ids (``N x L`` integers) the ``L``
    tokens entering the layer, the first never pruned; for images (``N x C x H x W``) the prefix tokens
    and the ``(H / p) x (W / p)`` patches (``p`` the patch size), the prefix tokens never pruned."""
    x = primary(example) if example is not None else None
    embeddings = patch_embeddings(model)
    if x is not None and x.ndim == 2 and not x.is_floating_point() and embeddings is None:
        return [TokenSite(layer.path, f"L{layer.index + 1}", int(x.shape[1]), 1) for layer in encoder_layers(model)]
    if x is None or x.ndim != 4 or not x.is_floating_point() or embeddings is None:
        return []
    size = getattr(embeddings.patch_embeddings, "patch_size", None)
    ph, pw = (size, size) if isinstance(size, int) else tuple(size or (0, 0))
    if not ph or not pw:
        return []
    prefix = prefix_tokens(model)
    tokens = prefix + (int(x.shape[2]) // ph) * (int(x.shape[3]) // pw)
    return [TokenSite(layer.path, f"L{layer.index + 1}", tokens, prefix) for layer in token_layers(model)]


class TransformersAdapter(Adapter):
    """Hugging Face transformer layers (BERT/MiniLM, HF ViT, GPT-2): heads and MLP neurons are filter
    sites, layers are gate sites. Found by module structure, so a model wrapped in an objective
    (:mod:`hookchains.core.objectives`) is recognised too."""

    name = "transformers"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool(transformer_layers(model))

    def discover(self, model: nn.Module, example, use_fx: bool = True,
                 output: OutputSpec = OutputSpec()) -> SiteMap:
        """Heads, neurons and layers of every recognised layer (``use_fx`` is ignored: read from structure)."""
        filters, gates = [], []
        for layer in transformer_layers(model):
            label = f"L{layer.index + 1}"
            heads = FilterSite(name=layer.attention, label=f"{label}.heads", hook_module=layer.out_proj,
                               fold_module=layer.out_proj, channels=layer.heads, channel_dim=-1, kind="head",
                               params=_params(model, *layer.qkv, layer.out_proj), width=layer.head_dim, on_input=True)
            neurons = FilterSite(name=layer.fc_in, label=f"{label}.mlp", hook_module=layer.act,
                                 fold_module=layer.fc_out, channels=_out_width(model.get_submodule(layer.fc_in)),
                                 channel_dim=-1, kind="neuron", params=_params(model, layer.fc_in, layer.fc_out))
            filters += [heads, neurons]
            gates.append(GateSite(name=layer.path, label=label, first=layer.path, last=layer.path,
                                  members=(layer.path,), filter_sites=(heads.name, neurons.name)))
        notes = ["transformer layers read from module structure: attention heads (scored on their context "
                 "vector before the output projection) and MLP neurons are filter sites, layers are gates"]
        return SiteMap(filters, gates, _token_sites(model, example), self.name, "structure", None, tuple(primary(example).shape), notes, output)
