"""Physically drop each image's pruned tokens (paper section 4.5): the token twin of
:mod:`hookchains.core.materialize`, checked against the masked network in the same way."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from hookchains.core.deprecation import RenamedAttribute, renamed_keyword
from hookchains.core.objectives import ZeroShotClassifier
from hookchains.core.result import TOLERANCE, check_exact
from hookchains.core.state import eval_mode
from hookchains.inputs.data import validate_images
from hookchains.inputs.forward import call, count, map_tensors, validate_inputs
from hookchains.tokens.encoder import is_hf_objective, with_key_bias
from hookchains.tokens.fit import rows_of
from hookchains.tokens.hooks import (
    TINY,
    TokenChains,
    check_token_model,
    is_text_model,
    mark_hook,
    token_hooks_on,
    vit_blocks,
)
from hookchains.tokens.result import TokenSubnetwork

__all__ = ["TokenDroppedViT", "materialize_tokens"]


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


class TokenDroppedViT(nn.Module):
    """A ViT that physically drops, before each block, the tokens a :class:`TokenSubnetwork` pruned.

    Every image has its own kept set, so a batch is run image by image: for image ``n`` a forward
    pre-hook on block ``i`` gathers the tokens kept in block ``i`` (a subset of those of block
    ``i-1``, so the sequence only shrinks) and the model's own, unmodified blocks run on that shorter
    sequence; in masking ``hard`` the kept tokens' weights ``log m`` go in as ``attn_mask`` on the gathered
    keys. The class token stays first, so the head's class-token pooling is unchanged. The hooks exist
    only during :meth:`forward`; the wrapped model is borrowed, not copied.

    An HF ViT/DeiT classifier runs the same way, its layers given the gathered keys' bias as their
    attention mask. A text objective (:mod:`hookchains.tokens.encoder`) runs sentence by sentence: its
    padded positions are never kept, so the layers see no padding and get the token weights alone as
    their attention mask; an embedding's mean pooling reads the tokens left after the last layer with
    their weights (``pool_weights``).

    ``forward(images, rows=None)``: row ``j`` of ``images`` is fitting image ``rows[j]`` (default: all
    fitting images, in order) -- the masks are per image and apply to those images only.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
        >>> images = torch.randn(4, 3, 64, 64)
        >>> from hookchains.tokens.fit import fit_tokens
        >>> result = fit_tokens(model, images, steps=2, progress=False)
        >>> small = materialize_tokens(result, model, images)
        >>> small(images[2:4], rows=[2, 3]).shape
        torch.Size([2, 10])
    """

    mode = RenamedAttribute("masking")

    @renamed_keyword(mode="masking")
    def __init__(self, model: nn.Module, tsub: TokenSubnetwork, masking: str = "hard") -> None:
        super().__init__()
        if masking not in ("hard", "mask"):
            raise ValueError(f"masking must be 'hard' (kept tokens weighted by their scores) or 'mask', got {masking!r}")
        self.model, self.masking, self.tsub, self.hf = model, masking, tsub, is_hf_objective(model)
        self.block_names = [site.name for site in tsub.sites]
        self.gather: List[List[torch.Tensor]] = []
        self.bias: List[List[Optional[torch.Tensor]]] = []
        self.pool: List[torch.Tensor] = []  # text embedding: the pooling weights of the last layer's tokens
        presence, masks = tsub.presence, tsub.masks
        for n in range(masks.shape[0]):
            previous, gathers, biases = torch.arange(masks.shape[2]), [], []
            for i in range(masks.shape[1]):
                kept = torch.nonzero(masks[n, i]).flatten()
                gathers.append(torch.searchsorted(previous, kept))
                weights = presence[n, i, kept] if masking == "hard" else torch.ones(len(kept))
                biases.append(torch.log(weights.clamp_min(TINY))[None, None, None] if masking == "hard" else None)
                previous = kept
            self.gather.append(gathers)
            self.bias.append(biases)
            self.pool.append(weights[None])
        self.max_abs_diff: Optional[float] = None

    def tokens_per_block(self) -> torch.Tensor:
        """``N x blocks`` sequence lengths the blocks actually process.

        Example: ``small.tokens_per_block()[0]`` -- image 0's sequence length in each block."""
        return torch.tensor([[len(g) for g in gathers] for gathers in self.gather])

    def _hook(self, block: int, current: Dict[str, int]):
        def hook(module, args, kwargs):
            x, n = args[0], current["n"]
            x = x.index_select(1, self.gather[n][block].to(x.device))
            bias = self.bias[n][block]
            if self.hf:  # no padding is left: the token weights are the whole mask
                return with_key_bias((x, *args[1:]), kwargs, bias, replace=True)
            kwargs = {**kwargs, "attn_mask": None if bias is None else bias.to(device=x.device, dtype=x.dtype)}
            return (x, *args[1:]), kwargs
        return mark_hook(hook)

    def _pool_hook(self, current: Dict[str, int]):
        def hook(module, args, kwargs):
            return args, {**kwargs, "pool_weights": self.pool[current["n"]].to(self.model.prototypes.device)}
        return mark_hook(hook)

    def forward(self, images, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        rows = list(range(len(self.gather))) if rows is None else [int(r) for r in rows]
        if len(rows) != count(images) or not all(0 <= r < len(self.gather) for r in rows):
            raise ValueError(f"got {count(images)} inputs for rows {rows[:8]}: this module holds the kept "
                             f"tokens of {len(self.gather)} fitting inputs; pass rows=[indices] for a subset")
        if token_hooks_on(self.model):
            raise RuntimeError("TokenChains hooks are attached to the wrapped model; detach them first")
        current = {"n": 0}
        handles = [self.model.get_submodule(name).register_forward_pre_hook(self._hook(i, current), with_kwargs=True)
                   for i, name in enumerate(self.block_names)]
        if isinstance(self.model, ZeroShotClassifier):
            handles.append(self.model.register_forward_pre_hook(self._pool_hook(current), with_kwargs=True))
        try:
            outs = []
            for j, n in enumerate(rows):
                current["n"] = n
                outs.append(call(self.model, rows_of(images, slice(j, j + 1))))
            return torch.cat(outs)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def check(self, images, rows: Optional[Sequence[int]] = None,
              tolerance: float = TOLERANCE) -> float:
        """Raise :class:`~hookchains.core.materialize.MaterializeError` unless the logits equal the masked
        (hooked) model's within ``tolerance * max|logit|``; returns the max abs difference.

        Example: ``small.check(images)``."""
        rows_t = torch.arange(len(self.gather)) if rows is None else torch.as_tensor(list(rows))
        with eval_mode(self.model), TokenChains(self.model, len(self.gather), tau=self.tsub.tau,
                                                sites=self.tsub.sites, valid=self.tsub.valid) as chains:
            chains.load_scores(self.tsub.scores.to(chains.scores.device))
            with chains.using(self.masking), chains.select(rows_t):
                reference = call(self.model, images).float()
        with eval_mode(self.model):
            got = self(images, rows_t.tolist()).float()
        self.max_abs_diff = check_exact(got, reference, tolerance, what="token-dropping module", against="the masked network")
        return self.max_abs_diff


@renamed_keyword(mode="masking")
def materialize_tokens(tsub: TokenSubnetwork, model: nn.Module, images=None, *,
                       masking: str = "hard", check: bool = True) -> TokenDroppedViT:
    """Build the module that physically drops each fitting image's pruned tokens before every block.

    Args:
        tsub: a :class:`TokenSubnetwork` fitted on ``model``.
        model: the original ViT (borrowed by the returned module, never modified).
        images: the fitting images (``N x 3 x H x W``, same order; for a text model the dict of
            ``input_ids`` and ``attention_mask``); with ``check`` the module's logits are compared with
            the hooked masked network's (:meth:`TokenDroppedViT.check`).
        masking: ``"hard"`` (default; kept tokens weighted by their scores: the network ``fit_tokens``
            measured) or ``"mask"`` (kept tokens at weight 1: the binary sub-network). Keyword ``mode``
            before 0.3 (still accepted, with a ``DeprecationWarning``).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
        >>> images = torch.randn(4, 3, 64, 64)
        >>> from hookchains.tokens.fit import fit_tokens
        >>> result = fit_tokens(model, images, steps=2, progress=False)
        >>> small = materialize_tokens(result, model, images)   # raises MaterializeError if not exact
        >>> len(small.tokens_per_block()[0])                    # sequence lengths of image 0, one per block
        6
    """
    check_token_model(model)
    text, hf = is_text_model(model), is_hf_objective(model)
    blocks = len(tsub.sites) if hf else len(vit_blocks(model))
    if len(tsub.sites) != blocks or not all(_has_module(model, site.name) for site in tsub.sites):
        raise ValueError(f"the result has {len(tsub.sites)} blocks, {type(model).__name__} has {blocks}")
    module = TokenDroppedViT(model, tsub, masking)
    if images is not None and check:
        check_inputs = validate_inputs if text else validate_images
        check_inputs(images)
        device = next(model.parameters()).device
        module.check(map_tensors(lambda t: t.to(device), images))
    return module
