"""Output distributions of text models, so the fit's KL (Eq. 5, 8) applies to them unchanged.

The fit compares the original's and the sub-network's ``log_softmax`` over the last dimension of the
model's class scores (:func:`hookchains.inputs.forward.class_scores`). A transformer does not always
return class scores, so its objective is a thin ``nn.Module`` around the unmodified model (hooks sit
on the inner model's modules, path prefix ``model.``):

* :class:`ZeroShotClassifier` -- an embedding model (all-MiniLM-L6-v2): the sentence embedding is the
  attention-masked mean of the last hidden states (as sentence-transformers pools), L2-normalised; the
  class scores are ``cos(e, p_k) / temperature`` against fixed class prototypes ``p_k`` (the original
  model's normalised mean embedding of each class's sentences, or of class descriptions). The default
  ``temperature = 0.05`` is the scale (20) that all-MiniLM-L6-v2 was trained with (sentence-transformers'
  ``MultipleNegativesRankingLoss``), so the softmax is the model's own contrastive distribution.
* :class:`OutputLogits` -- a model with a classification head (``.logits``, N x classes), or a causal LM
  with ``position="last"``: the next-token distribution at each sequence's last real token (N x vocab).

Example:
    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                             intermediate_size=64, vocab_size=50)).eval()
    >>> ids, mask = torch.randint(1, 50, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    >>> protos = class_prototypes(bert, [{"input_ids": ids[:2], "attention_mask": mask[:2]},
    ...                                  {"input_ids": ids[2:], "attention_mask": mask[2:]}])
    >>> ZeroShotClassifier(bert, protos)(input_ids=ids, attention_mask=mask).shape
    torch.Size([4, 2])
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hookchains.core.state import explaining

__all__ = ["ZeroShotClassifier", "OutputLogits", "mean_pooled", "class_prototypes", "ZERO_SHOT_TEMPERATURE"]

ZERO_SHOT_TEMPERATURE = 0.05  # all-MiniLM-L6-v2's training scale 20 (MultipleNegativesRankingLoss)


def _hidden(output) -> torch.Tensor:
    """The last hidden states (N x L x D) of a transformers output (ModelOutput or tuple)."""
    return output["last_hidden_state"] if isinstance(output, dict) else output[0]


def mean_pooled(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_weights: Optional[torch.Tensor] = None, **inputs) -> torch.Tensor:
    """Sentence embeddings, N x D: the mean of the last hidden states over real (unmasked) tokens, as
    sentence-transformers' ``Pooling(mode="mean")`` computes them (not normalised). ``pool_weights``
    (N x L', L' the length of the last hidden states) replaces the attention mask as the pooling's
    weights: token pruning (:mod:`hookchains.tokens.encoder`) passes the kept tokens' weights there."""
    hidden = _hidden(model(input_ids=input_ids, attention_mask=attention_mask, **inputs))
    weights = (attention_mask if pool_weights is None else pool_weights).unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


@torch.no_grad()
def class_prototypes(model: nn.Module, batches: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
    """K x D unit prototypes: per class, the normalised mean of the normalised embeddings of its batch
    (a class's sentences, or its descriptions), computed once with the original model in eval mode."""
    with explaining(model):
        means = [F.normalize(mean_pooled(model, **batch), dim=-1).mean(0) for batch in batches]
    return F.normalize(torch.stack(means), dim=-1)


class ZeroShotClassifier(nn.Module):
    """Class scores ``cos(e(x), p_k) / temperature`` of an embedding model (module docstring).

    Args:
        model: a transformers encoder returning ``last_hidden_state`` (unmodified; hooks go on it).
        prototypes: K x D class prototypes (:func:`class_prototypes`); fixed (a buffer, never learned).
        temperature: softmax temperature of the cosine similarities (default :data:`ZERO_SHOT_TEMPERATURE`).

    Input: ``input_ids`` and ``attention_mask`` (N x L, integer), optional ``token_type_ids`` and
    ``pool_weights`` (see :func:`mean_pooled`).
    Output: N x K class scores (logits).
    """

    prototypes: torch.Tensor  # a buffer: K x D unit class prototypes

    def __init__(self, model: nn.Module, prototypes: torch.Tensor, temperature: float = ZERO_SHOT_TEMPERATURE) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model, self.temperature = model, float(temperature)
        self.register_buffer("prototypes", F.normalize(prototypes.detach().float(), dim=-1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_weights: Optional[torch.Tensor] = None, **inputs) -> torch.Tensor:
        embedding = F.normalize(mean_pooled(self.model, input_ids, attention_mask, pool_weights, **inputs), dim=-1)
        return embedding @ self.prototypes.to(embedding.dtype).T / self.temperature


class OutputLogits(nn.Module):
    """The ``logits`` of a transformers model: N x classes for a classification head; with
    ``position="last"`` (causal LM) the N x vocab logits at each sequence's last real token
    (the last position where ``attention_mask`` is 1; the last position without a mask)."""

    def __init__(self, model: nn.Module, position: Optional[str] = None) -> None:
        super().__init__()
        if position not in (None, "last"):
            raise ValueError(f"position must be None or 'last', got {position!r}")
        self.model, self.position = model, position

    def forward(self, *args, **inputs) -> torch.Tensor:
        output = self.model(*args, **inputs)
        logits = output["logits"] if isinstance(output, dict) else output[0]
        if self.position is None:
            return logits
        mask = inputs.get("attention_mask")
        last = (mask.long().cumsum(1).argmax(1) if mask is not None
                else torch.full((logits.shape[0],), logits.shape[1] - 1, device=logits.device))
        return logits[torch.arange(logits.shape[0], device=logits.device), last]
