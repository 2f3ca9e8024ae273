"""``TokenChains``: per-image token scores on a timm ViT or an HF ViT/DeiT (or per-sentence scores on a
BERT-like text encoder; the HF specifics in :mod:`hookchains.tokens.encoder`) applied through forward pre-hooks, and the checks that the
model can drop tokens exactly (paper section 4.5; the design is in :mod:`hookchains.tokens`)."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from timm.layers import Attention
from torch import nn

from hookchains.adapters import discover
from hookchains.adapters.families import ViTAdapter
from hookchains.core.attach import MASKINGS, HookOwner
from hookchains.core.deprecation import RenamedAttribute, renamed_keyword
from hookchains.core.objectives import ZeroShotClassifier
from hookchains.core.sites import TokenSite
from hookchains.tokens.encoder import (
    check_text_token_model,
    eager_attention,
    is_hf_objective,
    is_image_objective,
    ste_context_hooks,
    with_key_bias,
)

__all__ = ["TokenChains", "check_token_model", "is_token_model", "is_text_model", "token_presence",
           "vit_parameter_counts", "vit_blocks", "vit_prefix_tokens", "mark_hook", "token_hooks_on", "TINY"]

TINY = 1e-12  # log(TINY) stands for log(0) where a finite, differentiable value is needed
FLOOR = 1e-4  # masking ste: pruned keys enter the softmax at this weight, then the hook zeroes them
EPS = 1e-6  # masking soft: log(m + EPS) keeps a finite "re-admission" gradient at m = 0
Rows = Union[None, slice, Sequence[int], torch.Tensor]


def check_token_model(model: nn.Module) -> None:
    """Raise a clear ``ValueError`` unless ``model`` is a timm ViT whose pruned tokens can be excluded.

    Requirements: timm's ViT layout (``blocks``, ``patch_embed``, ``num_prefix_tokens``), at least one
    class token, class-token pooling (``global_pool='token'``: average pooling would let every pruned
    token reach the output), and blocks whose ``forward`` takes ``attn_mask``.

    Example:
        >>> import timm
        >>> check_token_model(timm.create_model("deit_tiny_patch16_224"))
        >>> check_token_model(timm.create_model("resnet18"))
        Traceback (most recent call last):
        ValueError: ResNet is not a timm ViT/DeiT: ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"token pruning needs a torch.nn.Module, got {type(model).__name__}")
    if is_hf_objective(model):
        check_text_token_model(model)
        return
    name = type(model).__name__
    if not ViTAdapter.matches(model):
        raise ValueError(f"{name} is not a timm ViT/DeiT: token pruning (paper section 4.5) needs `blocks`, "
                         "`patch_embed` and `num_prefix_tokens`, e.g. timm.create_model('deit_small_patch16_224')")
    if vit_prefix_tokens(model) < 1:
        raise ValueError(f"{name} has no class token: the class token is what token pruning keeps")
    pool = getattr(model, "global_pool", "token")
    if pool != "token" or getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"{name} pools its output with global_pool={pool!r}, so a pruned token would still "
                         "reach the output; token pruning needs class-token pooling "
                         "(timm.create_model(name, global_pool='token'))")
    for i, block in enumerate(vit_blocks(model)):
        if "attn_mask" not in inspect.signature(block.forward).parameters:
            raise ValueError(f"blocks.{i} ({type(block).__name__}) does not take attn_mask, so pruned tokens "
                             "cannot be excluded from its attention")


def vit_blocks(model: nn.Module) -> List[nn.Module]:
    """The blocks of a timm ViT/DeiT (``model.blocks``), in order."""
    return list(model.get_submodule("blocks").children())


def vit_prefix_tokens(model: nn.Module) -> int:
    """The class (and distillation or register) tokens of a timm ViT/DeiT (``num_prefix_tokens``; 0 without)."""
    return int(getattr(model, "num_prefix_tokens", 0))


def is_text_model(model: nn.Module) -> bool:
    """Whether ``model`` is a text objective (:mod:`hookchains.core.objectives`): its token sites are those
    of :mod:`hookchains.tokens.encoder`, its inputs token ids (an HF image classifier in ``OutputLogits``
    takes images: ``False``)."""
    return is_hf_objective(model) and not is_image_objective(model)


def is_token_model(model: nn.Module) -> bool:
    """Whether :func:`check_token_model` accepts ``model`` (a timm ViT/DeiT with class-token pooling, an
    HF ViT/DeiT classifier in ``OutputLogits``, or a text objective around a BERT-like encoder).

    Example:
        >>> import timm
        >>> is_token_model(timm.create_model("deit_tiny_patch16_224")), is_token_model(timm.create_model("resnet18"))
        (True, False)
    """
    try:
        check_token_model(model)
    except (TypeError, ValueError):
        return False
    return True


def vit_parameter_counts(model: nn.Module) -> Dict[str, int]:
    """Weights + biases of the multi-head attention and feed-forward parts of every block (Table 1).

    Counts ``blocks[i].attn`` (qkv and output projection) and ``blocks[i].mlp`` (fc1, fc2); the
    blocks' LayerNorms are in neither. For timm's ``deit_small_patch16_224`` this gives the paper's
    figures exactly.

    Example:
        >>> import timm
        >>> vit_parameter_counts(timm.create_model("deit_small_patch16_224"))
        {'mha_params': 7096320, 'ffn_params': 14178816}
    """
    blocks = vit_blocks(model) if ViTAdapter.matches(model) else []
    if not blocks or not all(hasattr(b, "attn") and hasattr(b, "mlp") for b in blocks):
        raise ValueError(f"{type(model).__name__} is not a timm ViT/DeiT with attn and mlp in every block")
    parts = {"mha_params": "attn", "ffn_params": "mlp"}
    return {key: sum(p.numel() for block in blocks for p in block.get_submodule(part).parameters())
            for key, part in parts.items()}


def token_presence(scores: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """Presence ``m[n, i, t] = min_{j <= i} s[n, j, t]`` (prefix tokens: 1) of ``N x blocks x T`` scores.

    A token is kept in block ``i`` when ``m >= tau``; the min makes pruning cumulative.

    Example:
        >>> token_presence(torch.tensor([[[0.3, 0.9], [0.2, 1.0], [0.5, 0.05]]]), 1)
        tensor([[[1.0000, 0.9000], [1.0000, 0.9000], [1.0000, 0.0500]]])
    """
    ones = torch.ones_like(scores[..., :prefix_tokens])
    return torch.cummin(torch.cat([ones, scores[..., prefix_tokens:]], -1), dim=1).values


def mark_hook(hook):
    """Flag ``hook`` as a token hook of hookchains (``strip_hooks`` and :func:`token_hooks_on` read it)."""
    hook.hookchains = True  # attach.strip_hooks() recognises hookchains' hooks by this flag
    hook.hookchains_tokens = True
    return hook


def token_hooks_on(model: nn.Module) -> bool:
    """Whether :class:`TokenChains` hooks are attached to any of ``model``'s modules."""
    return any(getattr(h, "hookchains_tokens", False) for m in model.modules() for h in m._forward_pre_hooks.values())


def _set_fused(attentions: Sequence[Attention], flags: Sequence[bool]) -> None:
    """Set each timm ``Attention.fused_attn``: timm marks it ``Final`` (a TorchScript constant), but the
    eager forward reads it on every call, and masking ``ste`` needs the manual path while in use."""
    for attention, flag in zip(attentions, flags):
        attention.fused_attn = flag  # type: ignore[misc]  # Final for TorchScript only; read per call


def _token_sites(model: nn.Module, example) -> List[TokenSite]:
    hf = is_hf_objective(model)
    sites = discover(model, "transformers" if hf else "vit", example=example).tokens
    expected = len(sites) if hf else len(vit_blocks(model))
    if not sites or len(sites) != expected or len({s.tokens for s in sites}) != 1:
        raise ValueError(f"{type(model).__name__}: expected one token site of equal length per block, "
                         f"found {[(s.name, s.tokens) for s in sites]}")
    return sites


class TokenChains(HookOwner):
    """Per-image token scores on a timm ViT, applied through forward pre-hooks (section 4.5).

    ``scores`` is one ``nn.Parameter`` of shape ``N x blocks x T`` (prefix columns are ignored: prefix
    tokens always have presence 1). A forward pass must carry the images of the current row selection
    (:meth:`select`; default: all ``N``, in order), because every image has its own scores. Set the
    masking with :meth:`using` (the attribute ``masking``; ``mode`` before 0.3): for masking ``ste`` it
    also switches timm to its manual attention path.

    An HF ViT/DeiT classifier in ``OutputLogits`` works the same way (its layers take the bias as their
    attention mask), and so does a text objective around a BERT-like encoder, one row per sentence
    (:mod:`hookchains.tokens.encoder`); ``valid`` (``N x T`` bool, the attention mask) marks its real
    tokens: a padded position has presence 0 (never kept, never a key, not in the L1 term).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
        >>> images = torch.randn(4, 3, 64, 64)
        >>> with TokenChains(model, images.shape[0], example=images[:1]) as chains:
        ...     with torch.no_grad():
        ...         chains.scores[:, 3:, 9:] = 0.0          # prune patches 8.. from block 4 on
        ...     with chains.using("mask"):
        ...         logits = model(images)
        >>> logits.shape
        torch.Size([4, 10])
    """

    def __init__(self, model: nn.Module, num_images: int, *, tau: float = 0.1,
                 example=None, sites: Optional[Sequence[TokenSite]] = None,
                 valid: Optional[torch.Tensor] = None) -> None:
        check_token_model(model)
        if num_images < 1 or not 0.0 <= tau <= 1.0:
            raise ValueError(f"need num_images >= 1 and 0 <= tau <= 1, got {num_images} and {tau}")
        self.model, self.tau = model, float(tau)
        self.sites = list(sites) if sites is not None else _token_sites(model, example)
        self.tokens, self.prefix = self.sites[0].tokens, self.sites[0].prefix_tokens
        device = next(model.parameters()).device
        self.scores = nn.Parameter(torch.ones(num_images, len(self.sites), self.tokens, device=device))
        self.valid = (torch.ones(num_images, self.tokens, dtype=torch.bool) if valid is None else valid.bool()).to(device)
        if tuple(self.valid.shape) != (num_images, self.tokens):
            raise ValueError(f"valid must be {num_images} x {self.tokens} (the attention mask), got {tuple(self.valid.shape)}")
        self.masking, self.hf = "soft", is_hf_objective(model)
        self._rows: Rows = None
        blocks = [model.get_submodule(site.name) for site in self.sites]
        self._handles = [b.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        self._attentions = [a for a in (getattr(b, "attn", None) for b in blocks) if isinstance(a, Attention)]
        if self.hf:  # "ste" recomputes the context from eager attention's probabilities
            self._handles += [module.register_forward_hook(mark_hook(hook))
                              for module, hook in ste_context_hooks(model, self._reweight)]
            if isinstance(model, ZeroShotClassifier):  # a pruned token leaves the mean pooling too
                self._handles.append(model.register_forward_pre_hook(self._pool_hook(), with_kwargs=True))
        elif len(self._attentions) == len(blocks):  # "ste" reweights timm's attention probabilities
            self._handles += [a.attn_drop.register_forward_hook(self._ste_hook(i))
                              for i, a in enumerate(self._attentions)]

    # ------------------------------------------------------------------ values
    def presence(self) -> torch.Tensor:
        """Presence ``m`` (``n x blocks x T``) of the selected rows; see :func:`token_presence`.

        Example: ``chains.presence()[0, -1, 0]`` is 1 (the class token)."""
        scores, valid = (self.scores, self.valid) if self._rows is None else (self.scores[self._rows], self.valid[self._rows])
        return token_presence(scores, self.prefix) * valid[:, None, :]

    def kept(self) -> torch.Tensor:
        """Cumulative keep mask (``n x blocks x T`` bool) of the selected rows.

        Example: ``chains.kept().sum((1, 2))`` -- kept token slots per image."""
        with torch.no_grad():
            return self.presence() >= self.tau

    @renamed_keyword(mode="masking")
    def key_bias(self, block: int, masking: Optional[str] = None) -> Optional[torch.Tensor]:
        """Additive attention bias ``n x 1 x 1 x T`` for the keys of ``block`` (``None`` when off).

        Example: ``chains.key_bias(0, "mask")`` -- 0 for kept keys, ``-inf`` for pruned ones."""
        masking = masking or self.masking
        if masking == "off":
            return None
        m = self.presence()[:, block]
        if masking == "soft":
            return torch.log(m + EPS)[:, None, None, :]
        if masking == "ste":  # the hard weights floored at FLOOR; _ste_hook swaps the floor for exact zeros
            return torch.log(self._hard_weight(m).clamp_min(FLOOR).detach())[:, None, None, :]
        kept_value = torch.zeros_like(m) if masking == "mask" else torch.log(m.clamp_min(TINY))
        return torch.where(m >= self.tau, kept_value, torch.full_like(m, float("-inf")))[:, None, None, :]

    @renamed_keyword(mode="masking")
    def token_weight(self, block: int, masking: Optional[str] = None) -> torch.Tensor:
        """Weight ``n x T`` of each token leaving ``block`` where an output reads every token (the mean
        pooling of a text embedding): ``m`` (soft), ``m`` if kept else 0 (hard; ste with the gradient of
        ``m``), kept as 0/1 (mask).

        Example: ``chains.token_weight(-1, "mask")`` -- the tokens kept in the last block."""
        masking = masking or self.masking
        m = self.presence()[:, block]
        if masking == "soft":
            return m
        if masking == "mask":
            return (m >= self.tau).to(m.dtype)
        hard = self._hard_weight(m)
        return hard + (m - m.detach()) if masking == "ste" else hard

    def _hard_weight(self, m: torch.Tensor) -> torch.Tensor:
        return torch.where(m >= self.tau, m, torch.zeros_like(m))

    def _reweight(self, block: int, probs: torch.Tensor) -> Optional[torch.Tensor]:
        """Masking ``ste``: the softmax ran with weights ``u = max(hard, FLOOR)``; multiplying by ``w / u``,
        where ``w`` has the hard value (``m`` if kept, else 0) and the gradient of ``m``, and renormalising
        gives exactly the ``hard`` probabilities, plus a gradient for pruned keys too: that of
        re-admitting them (``d/dw_j`` of ``sum_j w_j e^(z_ij) v_j / sum_j w_j e^(z_ij)`` at ``w_j = 0``).
        ``None`` in the other maskings."""
        if self.masking != "ste":
            return None
        m = self.presence()[:, block]
        hard = self._hard_weight(m)
        ratio = (hard + (m - m.detach())) / hard.clamp_min(FLOOR).detach()
        weighted = probs * ratio[:, None, None, :].to(probs.dtype)
        return weighted / weighted.sum(-1, keepdim=True)

    def _ste_hook(self, block: int):
        """timm: ``attn_drop``'s input is the softmax; see :meth:`_reweight`."""
        def hook(module, args, probs):
            return self._reweight(block, probs)
        return mark_hook(hook)

    def _pool_hook(self):
        """Text embedding: the pooling reads the last layer's token weights times the attention mask."""
        def hook(module, args, kwargs):
            if self.masking == "off":
                return None
            mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[1]
            weights = self.token_weight(len(self.sites) - 1)
            return args, {**kwargs, "pool_weights": weights * mask.to(weights.dtype)}
        return mark_hook(hook)

    def _hook(self, block: int):
        def hook(module, args, kwargs):
            if self.masking == "off":
                return None
            x, rows = args[0], self.presence().shape[0]
            if x.ndim != 3 or x.shape[:2] != (rows, self.tokens):
                raise ValueError(f"token scores are for {rows} images x {self.tokens} tokens, but block "
                                 f"{block} got a sequence of shape {tuple(x.shape)}: feed the images the scores "
                                 "belong to (see TokenChains.select), at the size used to create them")
            bias = self.key_bias(block)
            if self.hf:  # combined with the model's own (padding) mask
                return None if bias is None else with_key_bias(args, kwargs, bias)
            if kwargs.get("attn_mask") is not None:
                raise ValueError("the model was called with its own attn_mask; token pruning cannot combine masks")
            return None if bias is None else (args, {**kwargs, "attn_mask": bias.to(x.dtype)})
        return mark_hook(hook)

    # ------------------------------------------------------------------ state
    mode = RenamedAttribute("masking")

    @renamed_keyword(mode="masking")
    @contextmanager
    def using(self, masking: str) -> Iterator[TokenChains]:
        """Temporarily evaluate the hooks in ``masking`` (one of :data:`hookchains.core.attach.MASKINGS`;
        keyword ``mode`` before 0.3).

        Example: ``with chains.using("mask"): logits = model(images)``."""
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; choose one of {MASKINGS}")
        if masking == "ste" and not self.hf and len(self._attentions) != len(self.sites):
            raise ValueError("masking 'ste' reweights timm Attention probabilities; this model's blocks use another "
                             "attention class: use masking 'hard' (fit_tokens(..., recipe='paper') trains 'soft')")
        previous, self.masking = self.masking, masking
        fused = [a.fused_attn for a in self._attentions]
        if masking == "ste":  # the probabilities exist only on timm's manual attention path
            _set_fused(self._attentions, [False] * len(fused))
        try:
            if masking == "ste" and self.hf:  # and on transformers' eager one
                with eager_attention(self.model):
                    yield self
            else:
                yield self
        finally:
            self.masking = previous
            _set_fused(self._attentions, fused)

    @contextmanager
    def select(self, rows: Rows) -> Iterator[TokenChains]:
        """Temporarily apply the scores of images ``rows`` (slice or indices) to the next forwards.

        Example: ``with chains.select(slice(0, 4)): model(images[:4])``."""
        previous, self._rows = self._rows, rows
        try:
            yield self
        finally:
            self._rows = previous

    def load_scores(self, scores: torch.Tensor) -> None:
        """Copy ``N x blocks x T`` scores (e.g. a :class:`TokenSubnetwork`'s) into the hooks.

        Example: ``chains.load_scores(result.scores)``."""
        if tuple(scores.shape) != tuple(self.scores.shape):
            raise ValueError(f"scores of shape {tuple(scores.shape)} do not fit {tuple(self.scores.shape)}")
        with torch.no_grad():
            self.scores.copy_(scores)

    def clamp_(self) -> None:
        """Project the scores onto ``[0, 1]`` (the paper's range; 1 is the original network).

        Example: ``optimiser.step(); chains.clamp_()``."""
        with torch.no_grad():
            self.scores.clamp_(0.0, 1.0)

    def l1(self) -> torch.Tensor:
        """``mean_n ||s_n||_1`` over patch scores (prefix scores are not parameters of the method).

        Example: ``loss = kl + lam * chains.l1()``."""
        valid = self.valid[:, None, self.prefix:].to(self.scores.dtype)
        return (self.scores[..., self.prefix:].abs() * valid).sum() / self.scores.shape[0]
