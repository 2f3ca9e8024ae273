"""Token sites of a Hugging Face model -- a BERT-like encoder (BERT, MiniLM) or a ViT/DeiT image
classifier: what differs from a timm ViT.

The semantics are those of :mod:`hookchains.tokens` (per-sentence scores, cumulative presence, the
first token -- ``[CLS]`` -- never pruned, a pruned token excluded from every later layer's keys and
values); only the plumbing differs:

* **Keys.** A BERT layer takes its attention mask as its second positional argument (a boolean
  ``N x 1 x L x L`` mask for SDPA, an additive float one for eager attention, ``None`` without
  padding). :func:`with_key_bias` turns it into an additive float mask and adds the token bias
  ``N x 1 x 1 x L``; SDPA and eager attention both accept it.
* **Residual stream.** An embedding model's output reads every token (the mean pooling of
  :class:`~hookchains.core.objectives.ZeroShotClassifier`), so a pruned token must also leave the
  pooling: its ``pool_weights`` are the last layer's token weights (0 for a pruned token) times the
  attention mask. A classification head reads the first token only, as a ViT's does.
* **Padding.** A padded position has presence 0: never kept, never counted, never a key.
* **Masking ste.** The attention probabilities exist only on transformers' eager path, so masking ``ste``
  switches ``config._attn_implementation`` to ``"eager"`` (restored after), keeps each layer's values
  (a forward hook on ``value``/``v_proj``) and recomputes the context from the reweighted probabilities
  (a forward hook on the self-attention module; where that module also holds the output projection,
  as HF ViT's ``o_proj``, the projection is applied to the new context), as the ViT path does on
  ``attn_drop``.
* **Images.** An HF ViT/DeiT image classifier (``config.model_type`` in
  :data:`~hookchains.adapters.transformers.IMAGE_TOKEN_MODELS`, wrapped in
  :class:`~hookchains.core.objectives.OutputLogits`) takes an ``N x 3 x H x W`` tensor, as a timm ViT
  does (``hookchains.tokens.hooks.is_text_model`` is then ``False``: no padding, no mask); its head reads the class token
  (DeiT: class and distillation tokens), which are never pruned. Image models that also pool the
  patches (BEiT, DINOv2) are refused.

Causal LMs (GPT-2) are refused: their last position reads every earlier token through the causal mask
and the tokenizer has no class token to keep.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> from hookchains.core.objectives import OutputLogits
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                             intermediate_size=64, vocab_size=100)).eval()
    >>> is_text_token_model(OutputLogits(bert)), is_text_token_model(bert)
    (False, False)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from hookchains.adapters.transformers import IMAGE_TOKEN_MODELS, encoder_layers, patch_embeddings, token_layers
from hookchains.core.objectives import OutputLogits, ZeroShotClassifier

__all__ = ["check_text_token_model", "is_text_token_model", "is_hf_objective", "is_image_objective",
           "with_key_bias", "eager_attention", "ste_context_hooks", "hf_config"]

ATTENTION_PATHS = ("sdpa", "eager")


def is_hf_objective(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face model wrapped in its objective (:mod:`hookchains.core.objectives`):
    its token hooks are those of this module."""
    return isinstance(model, (ZeroShotClassifier, OutputLogits))


def is_image_objective(model: nn.Module) -> bool:
    """Whether ``model`` is an HF objective around an image model (``main_input_name == "pixel_values"``):
    it takes an image tensor, not token ids."""
    return is_hf_objective(model) and getattr(model.model, "main_input_name", None) == "pixel_values"


def hf_config(model: nn.Module) -> Any:
    """The wrapped transformers model's ``PretrainedConfig`` (``None`` without one): a plain attribute,
    not a submodule, so ``nn.Module``'s typing cannot name it."""
    return getattr(model.get_submodule("model"), "config", None) if is_hf_objective(model) else None


def _check_image_model(model: nn.Module, name: str) -> None:
    kind = getattr(hf_config(model), "model_type", None)
    if not isinstance(model, OutputLogits) or not name.endswith("ForImageClassification") or kind not in IMAGE_TOKEN_MODELS:
        raise ValueError(f"{name} (model_type {kind!r}) is not an HF image classifier whose head reads the class "
                         f"token only: token pruning of HF image models supports model_type {IMAGE_TOKEN_MODELS} "
                         "wrapped in OutputLogits; use --sites filters")
    if patch_embeddings(model) is None or not token_layers(model):
        raise ValueError(f"{name} has no ViT patch embeddings with a class token or no recognised layers: "
                         "token pruning needs both; use --sites filters")


def check_text_token_model(model: nn.Module) -> None:
    """Raise a one-line ``ValueError`` unless ``model`` is an HF objective whose pruned tokens can be
    excluded (module doc).

    Accepted: :class:`~hookchains.core.objectives.ZeroShotClassifier` (mean pooling, handled) and
    :class:`~hookchains.core.objectives.OutputLogits` without ``position`` around a
    ``...ForSequenceClassification`` model (its head reads the first token; a head reading any other
    token would make the token-dropping module differ from the hooked network, which the
    materialise check refuses), with SDPA or eager attention; and ``OutputLogits`` around an HF ViT or
    DeiT ``...ForImageClassification`` model.
    """
    name = type(getattr(model, "model", model)).__name__
    if not is_hf_objective(model):
        raise ValueError(f"{type(model).__name__} is not a text objective: wrap the transformers model in "
                         "ZeroShotClassifier or OutputLogits (hookchains.workflow.text.text_task does)")
    if getattr(model, "position", None) is not None:
        raise ValueError(f"{name} is a causal LM: its last position reads every earlier token, so token "
                         "pruning is for encoders (BERT, MiniLM); use --sites filters")
    if is_image_objective(model):
        _check_image_model(model, name)
    elif isinstance(model, OutputLogits) and not name.endswith("ForSequenceClassification"):
        raise ValueError(f"{name} has no sequence-classification head: token pruning of a text model needs an "
                         "embedding (ZeroShotClassifier) or a head that reads the first token (...ForSequenceClassification)")
    elif not encoder_layers(model):
        raise ValueError(f"{name} has no BERT-like encoder layers (attention.self.query/key/value): token pruning "
                         "of text models needs one; use --sites filters")
    attention = getattr(hf_config(model), "_attn_implementation", None)
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"{name} uses attention {attention!r}: token pruning passes an additive mask, which "
                         f"needs one of {ATTENTION_PATHS} (load it with attn_implementation='sdpa')")


def is_text_token_model(model: nn.Module) -> bool:
    """Whether :func:`check_text_token_model` accepts ``model``."""
    try:
        check_text_token_model(model)
    except ValueError:
        return False
    return True


def with_key_bias(args: tuple, kwargs: dict, bias: Optional[torch.Tensor], *, replace: bool = False):
    """A BERT layer's ``(args, kwargs)`` with ``bias`` (``n x 1 x 1 x T``, additive) added to its attention
    mask (boolean or additive; ``None`` when the model had no padding); ``replace``: the bias alone
    (a token-dropped sequence has no padding left). Returns the new ``(args, kwargs)``."""
    x = args[0]
    positional = len(args) > 1
    mask = args[1] if positional else kwargs.get("attention_mask")
    if bias is not None:
        bias = bias.to(device=x.device, dtype=x.dtype)
    if mask is not None and not replace:
        additive = (torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, float("-inf"))
                    if mask.dtype == torch.bool else mask.to(x.dtype))
        bias = additive if bias is None else additive + bias
    if positional:
        return (x, bias, *args[2:]), kwargs
    return args, {**kwargs, "attention_mask": bias}


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """``config._attn_implementation = "eager"`` on the wrapped model while inside; restored after."""
    config = hf_config(model)
    previous, config._attn_implementation = config._attn_implementation, "eager"
    try:
        yield
    finally:
        config._attn_implementation = previous


def ste_context_hooks(model: nn.Module, reweight: Callable[[int, torch.Tensor], Optional[torch.Tensor]]) -> list:
    """Forward hooks for masking ``ste``: per layer, one on ``value`` keeping its output and one on the
    self-attention replacing its context by ``reweight(layer, probabilities) @ values`` (eager
    attention returns its probabilities). ``reweight`` returns ``None`` outside masking ``ste``.
    Returns the hook functions as ``(module, hook)`` pairs, for the caller to register and mark."""
    pairs, values = [], {}
    for i, layer in enumerate(token_layers(model)):
        attention = model.get_submodule(layer.attention)
        inner = layer.out_proj.startswith(layer.attention + ".")  # HF ViT: o_proj inside the attention
        projection = model.get_submodule(layer.out_proj) if inner else None

        def keep(module, args, output, i=i):
            values[i] = output

        def context(module, args, output, i=i, heads=layer.heads, width=layer.head_dim, projection=projection):
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            weighted = None if probs is None else reweight(i, probs)
            if weighted is None:
                return None
            n, length = values[i].shape[:2]
            v = values[i].view(n, length, heads, width).transpose(1, 2)
            merged = (weighted @ v).transpose(1, 2).reshape(n, -1, heads * width)
            return (merged if projection is None else projection(merged)), weighted

        pairs += [(model.get_submodule(layer.qkv[2]), keep), (attention, context)]
    return pairs
