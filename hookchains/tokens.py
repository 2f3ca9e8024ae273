"""Per-image token (patch) pruning for timm ViT/DeiT with hooks only (paper section 4.5).

NeuroChains on a vision transformer freezes every weight and learns one score per *(image, block,
token)*: "the patch scores are not shared among training samples, i.e., each input sample has its
own patch scores" (section 4.5). The objective is Eq. 8 with the L1 term on token scores::

    mean_n KL(softmax(F(x_n)) || softmax(F(x_n; tokens scored by s_n)))  +  lam * mean_n ||s_n||_1

What a score means here (the decisions, and why):

* **Where.** ``s[n, i, t]`` scores token ``t`` *as an input of block i* (the sequence block ``i``
  processes, i.e. the one leaving block ``i-1``, or the embedding for ``i = 0``). Read as "the
  sequence leaving block i", the last block's tokens would be free to drop under class-token pooling;
  the paper's Fig. 7 shows patches retained *in* the last block. Labels follow the adapters' token
  sites: token ``t`` of block ``i`` is ``B{i+1}_T{t}``.
* **Cumulative.** A token's presence in block ``i`` is ``m[n, i, t] = min_{j <= i} s[n, j, t]``; it is
  kept when ``m >= tau``. So a token pruned in block ``i`` stays pruned in every later block, and the
  binary mask is exactly the product of the per-block masks ``[s >= tau]``. Class/register (prefix)
  tokens always have presence 1: they are never pruned (the class token is what the head reads).
* **Exact exclusion.** A forward pre-hook on every block passes an additive ``attn_mask`` of shape
  ``(n, 1, 1, T)``: ``-inf`` for every pruned key. A pruned token is thus neither a key nor a value
  of any later block; attention, LayerNorm and MLP act per token otherwise, and the head reads only
  the class token, so it influences nothing downstream. timm's fused (SDPA) and manual attention
  paths both accept this mask and agree.
* **Soft form.** A kept token's presence enters as the additive bias ``log m``: it multiplies that
  key's unnormalised attention weight ``exp(q.k)`` in every query's softmax. ``m = 1`` is the
  original network, ``m -> 0`` removes the key continuously, and the limit is the exact mask above.
  (Scaling the token's value instead would leave it absorbing attention mass at ``m = 0``.)

Modes (:data:`hookchains.attach.MODES`), as for filters:

* ``soft`` -- bias ``log(m + 1e-6)`` for every token: the relaxed network of Eq. 8 (recipe ``paper``);
* ``hard`` -- kept tokens weighted by ``m`` (bias ``log m``), pruned ones ``-inf``: the thresholded
  network, like ``S * [S >= tau]`` for filters. :func:`fit_tokens` reports its fidelity and
  :func:`materialize_tokens` builds it by default;
* ``ste`` -- the ``hard`` forward with straight-through gradients (recipe ``hookchains``, default);
* ``mask`` -- kept tokens at weight 1: the binary sub-network;
* ``off`` -- the original model.

Why ``ste`` needs more than an ``attn_mask``: a key at ``-inf`` has probability 0, so its gradient is
0 and a pruned token could never come back. Measured on a small ViT trained on scikit-learn digits
(6 blocks, 17 tokens, 20 images): training ``hard`` collapsed (every score falls at the same rate
while the network still equals the teacher, the KL gradient being exactly 0 there; they all crossed
``tau`` in one step and none returned: KL 3.1, 11/20 agreement); training ``soft`` and thresholding
afterwards left a soft/hard gap (KL 0.005 soft, 0.46 hard). So mode ``ste`` runs timm's manual
attention path (``attn.fused_attn`` switched off while in ``ste``, restored after) and a forward hook
on ``attn.attn_drop`` -- whose input is the softmax -- reweights the probabilities to
``w_j p_ij / sum_k w_k p_ik``: the value of ``w`` is the hard weight (``m`` kept, 0 pruned), its
gradient the identity in ``m``. The forward is exactly the ``hard`` network; a pruned key gets the
gradient of re-admitting it. (The softmax runs with pruned keys at weight ``1e-4`` so the
renormalisation stays well conditioned; the hook replaces that weight with an exact 0.) Same data:
KL 0.006, 20/20 agreement, 50/102 slots kept, stopped after 85 steps.

Example:
    >>> model = timm.create_model("deit_small_patch16_224").eval()
    >>> result = fit_tokens(model, images)               # images: N x 3 x 224 x 224
    >>> print(result.summary())                          # 'keeps .../2364 token slots per image ...'
    >>> small = materialize_tokens(result, model, images)   # physically drops the pruned tokens
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn
from tqdm.auto import tqdm

from hookchains.adapters import discover
from hookchains.adapters.families import ViTAdapter
from hookchains.attach import MODES, HookOwner
from hookchains.data import validate_images
from hookchains.featvis import _frozen_weights
from hookchains.fit import FitConfig, _chunks, _next_kl_weight, _stopped
from hookchains.heatmap import eval_mode
from hookchains.io import read_json, read_tensors, write_json, write_tensors
from hookchains.materialize import TOLERANCE, MaterializeError
from hookchains.metrics import fidelity
from hookchains.sites import TokenSite

__all__ = ["TokenChains", "TokenSubnetwork", "TokenDroppedViT", "fit_tokens", "materialize_tokens",
           "check_token_model", "is_token_model", "token_presence", "vit_parameter_counts", "TOKEN_DEFAULTS",
           "TOKEN_FORMAT_VERSION", "TOKEN_FILES"]

TOKEN_FORMAT_VERSION = 1
_TINY = 1e-12  # log(_TINY) stands for log(0) where a finite, differentiable value is needed
_FLOOR = 1e-4  # mode ste: pruned keys enter the softmax at this weight, then the hook zeroes them
_EPS = 1e-6  # soft mode: log(m + _EPS) keeps a finite "re-admission" gradient at m = 0
_SCORES_FILE, _META_FILE = "token_scores.safetensors", "tokens.json"
TOKEN_FILES = (_META_FILE, _SCORES_FILE)  # what TokenSubnetwork.save writes (run folders list them)
Rows = Union[None, slice, Sequence[int], torch.Tensor]

# Defaults of fit_tokens. lr 0.05: a score needs ~18 Adam steps to fall from 1 to tau = 0.1, so pruning
# starts early (with the paper's 0.005 it would take ~180). lam: the paper's 0.005, on the per-image L1
# so it does not depend on the number of images. lam_gate is unused for tokens. Checked only on random
# weights (mechanics, timing) and on a toy ViT trained on scikit-learn digits (module doc); no real
# ImageNet ViT weights were available, so these are not tuned for fidelity on DeiT.
TOKEN_DEFAULTS = FitConfig(steps=150, lr=0.05, lam=0.005, lam_gate=0.0, kl_target=0.1, kl_rate=0.05,
                           patience=20, min_steps=30, kl_tol=0.1, loss_tol=0.05)
# Recipe "hookchains" stops once the kept set is stable for `patience` steps (and loss and KL settled,
# as in hookchains.fit). With tens of thousands of per-image slots, a few slots always flicker at the
# threshold, so "stable" means at most this fraction of slots changed since the previous step.
STABLE_FLIPS = 0.01


def check_token_model(model: nn.Module) -> None:
    """Raise a clear ``ValueError`` unless ``model`` is a timm ViT whose pruned tokens can be excluded.

    Requirements: timm's ViT layout (``blocks``, ``patch_embed``, ``num_prefix_tokens``), at least one
    class token, class-token pooling (``global_pool='token'``: average pooling would let every pruned
    token reach the output), and blocks whose ``forward`` takes ``attn_mask``.

    Example:
        >>> check_token_model(timm.create_model("deit_tiny_patch16_224"))
        >>> check_token_model(timm.create_model("resnet18"))
        Traceback (most recent call last):
        ValueError: ResNet is not a timm ViT/DeiT ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"token pruning needs a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if not ViTAdapter.matches(model):
        raise ValueError(f"{name} is not a timm ViT/DeiT: token pruning (paper section 4.5) needs `blocks`, "
                         "`patch_embed` and `num_prefix_tokens`, e.g. timm.create_model('deit_small_patch16_224')")
    if int(model.num_prefix_tokens) < 1:
        raise ValueError(f"{name} has no class token: the class token is what token pruning keeps")
    pool = getattr(model, "global_pool", "token")
    if pool != "token" or getattr(model, "attn_pool", None) is not None:
        raise ValueError(f"{name} pools its output with global_pool={pool!r}, so a pruned token would still "
                         "reach the output; token pruning needs class-token pooling "
                         "(timm.create_model(name, global_pool='token'))")
    for i, block in enumerate(model.blocks):
        if "attn_mask" not in inspect.signature(block.forward).parameters:
            raise ValueError(f"blocks.{i} ({type(block).__name__}) does not take attn_mask, so pruned tokens "
                             "cannot be excluded from its attention")


def is_token_model(model: nn.Module) -> bool:
    """Whether :func:`check_token_model` accepts ``model`` (a timm ViT/DeiT with class-token pooling).

    Example:
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
        >>> vit_parameter_counts(timm.create_model("deit_small_patch16_224"))
        {'mha_params': 7096320, 'ffn_params': 14178816}
    """
    if not ViTAdapter.matches(model) or not all(hasattr(b, "attn") and hasattr(b, "mlp") for b in model.blocks):
        raise ValueError(f"{type(model).__name__} is not a timm ViT/DeiT with attn and mlp in every block")
    parts = {"mha_params": "attn", "ffn_params": "mlp"}
    return {key: sum(p.numel() for block in model.blocks for p in getattr(block, part).parameters())
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


def _mark(hook):
    hook.hookchains = True  # attach.strip_hooks() recognises hookchains' hooks by this flag
    hook.hookchains_tokens = True
    return hook


def _token_hooks_on(model: nn.Module) -> bool:
    return any(getattr(h, "hookchains_tokens", False) for b in model.blocks for h in b._forward_pre_hooks.values())


def _token_sites(model: nn.Module, example: torch.Tensor) -> List[TokenSite]:
    sites = discover(model, "vit", example=example).tokens
    if len(sites) != len(model.blocks) or len({s.tokens for s in sites}) != 1:
        raise ValueError(f"{type(model).__name__}: expected one token site of equal length per block, "
                         f"found {[(s.name, s.tokens) for s in sites]}")
    return sites


class TokenChains(HookOwner):
    """Per-image token scores on a timm ViT, applied through forward pre-hooks (section 4.5).

    ``scores`` is one ``nn.Parameter`` of shape ``N x blocks x T`` (prefix columns are ignored: prefix
    tokens always have presence 1). A forward pass must carry the images of the current row selection
    (:meth:`select`; default: all ``N``, in order), because every image has its own scores. Set the
    mode with :meth:`using`: for mode ``ste`` it also switches timm to its manual attention path.

    Example:
        >>> with TokenChains(model, images.shape[0], example=images[:1]) as chains:
        ...     with torch.no_grad():
        ...         chains.scores[:, 3:, 50:] = 0.0          # prune patches 49.. from block 4 on
        ...     with chains.using("mask"):
        ...         logits = model(images)
    """

    def __init__(self, model: nn.Module, num_images: int, *, tau: float = 0.1,
                 example: Optional[torch.Tensor] = None, sites: Optional[Sequence[TokenSite]] = None) -> None:
        check_token_model(model)
        if num_images < 1 or not 0.0 <= tau <= 1.0:
            raise ValueError(f"need num_images >= 1 and 0 <= tau <= 1, got {num_images} and {tau}")
        self.model, self.tau = model, float(tau)
        self.sites = list(sites) if sites is not None else _token_sites(model, example)
        self.tokens, self.prefix = self.sites[0].tokens, self.sites[0].prefix_tokens
        device = next(model.parameters()).device
        self.scores = nn.Parameter(torch.ones(num_images, len(self.sites), self.tokens, device=device))
        self.mode, self._rows = "soft", None
        blocks = [model.get_submodule(site.name) for site in self.sites]
        self._handles = [b.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        self._attentions = [b.attn for b in blocks if isinstance(getattr(b, "attn", None), Attention)]
        if len(self._attentions) == len(blocks):  # "ste" reweights timm's attention probabilities
            self._handles += [a.attn_drop.register_forward_hook(self._ste_hook(i))
                              for i, a in enumerate(self._attentions)]

    # ------------------------------------------------------------------ values
    def presence(self) -> torch.Tensor:
        """Presence ``m`` (``n x blocks x T``) of the selected rows; see :func:`token_presence`.

        Example: ``chains.presence()[0, -1, 0]`` is 1 (the class token)."""
        scores = self.scores if self._rows is None else self.scores[self._rows]
        return token_presence(scores, self.prefix)

    def kept(self) -> torch.Tensor:
        """Cumulative keep mask (``n x blocks x T`` bool) of the selected rows.

        Example: ``chains.kept().sum((1, 2))`` -- kept token slots per image."""
        with torch.no_grad():
            return self.presence() >= self.tau

    def key_bias(self, block: int, mode: Optional[str] = None) -> Optional[torch.Tensor]:
        """Additive attention bias ``n x 1 x 1 x T`` for the keys of ``block`` (``None`` when off).

        Example: ``chains.key_bias(0, "mask")`` -- 0 for kept keys, ``-inf`` for pruned ones."""
        mode = mode or self.mode
        if mode == "off":
            return None
        m = self.presence()[:, block]
        if mode == "soft":
            return torch.log(m + _EPS)[:, None, None, :]
        if mode == "ste":  # the hard weights floored at _FLOOR; _ste_hook swaps the floor for exact zeros
            return torch.log(self._hard_weight(m).clamp_min(_FLOOR).detach())[:, None, None, :]
        kept_value = torch.zeros_like(m) if mode == "mask" else torch.log(m.clamp_min(_TINY))
        return torch.where(m >= self.tau, kept_value, torch.full_like(m, float("-inf")))[:, None, None, :]

    def _hard_weight(self, m: torch.Tensor) -> torch.Tensor:
        return torch.where(m >= self.tau, m, torch.zeros_like(m))

    def _ste_hook(self, block: int):
        """Mode ``ste``: the softmax ran with weights ``u = max(hard, _FLOOR)``; multiplying by ``w / u``,
        where ``w`` has the hard value (``m`` if kept, else 0) and the gradient of ``m``, and renormalising
        gives exactly the ``hard`` probabilities, plus a gradient for pruned keys too: that of
        re-admitting them (``d/dw_j`` of ``sum_j w_j e^(z_ij) v_j / sum_j w_j e^(z_ij)`` at ``w_j = 0``)."""
        def hook(module, args, probs):
            if self.mode != "ste":
                return None
            m = self.presence()[:, block]
            hard = self._hard_weight(m)
            ratio = (hard + (m - m.detach())) / hard.clamp_min(_FLOOR).detach()
            weighted = probs * ratio[:, None, None, :].to(probs.dtype)
            return weighted / weighted.sum(-1, keepdim=True)
        return _mark(hook)

    def _hook(self, block: int):
        def hook(module, args, kwargs):
            if self.mode == "off":
                return None
            x, rows = args[0], self.presence().shape[0]
            if x.ndim != 3 or x.shape[:2] != (rows, self.tokens):
                raise ValueError(f"token scores are for {rows} images x {self.tokens} tokens, but block "
                                 f"{block} got a sequence of shape {tuple(x.shape)}: feed the images the scores "
                                 "belong to (see TokenChains.select), at the size used to create them")
            if kwargs.get("attn_mask") is not None:
                raise ValueError("the model was called with its own attn_mask; token pruning cannot combine masks")
            bias = self.key_bias(block)
            return None if bias is None else (args, {**kwargs, "attn_mask": bias.to(x.dtype)})
        return _mark(hook)

    # ------------------------------------------------------------------ state
    @contextmanager
    def using(self, mode: str) -> Iterator["TokenChains"]:
        """Temporarily evaluate the hooks in ``mode`` (one of :data:`hookchains.attach.MODES`).

        Example: ``with chains.using("mask"): logits = model(images)``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
        if mode == "ste" and len(self._attentions) != len(self.sites):
            raise ValueError("mode 'ste' reweights timm Attention probabilities; this model's blocks use another "
                             "attention class: use mode 'hard' (fit_tokens(..., recipe='paper') trains 'soft')")
        previous, self.mode = self.mode, mode
        fused = [a.fused_attn for a in self._attentions]
        if mode == "ste":  # the probabilities exist only on timm's manual attention path
            for a in self._attentions:
                a.fused_attn = False
        try:
            yield self
        finally:
            self.mode = previous
            for a, flag in zip(self._attentions, fused):
                a.fused_attn = flag

    @contextmanager
    def select(self, rows: Rows) -> Iterator["TokenChains"]:
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
        return self.scores[..., self.prefix:].abs().sum() / self.scores.shape[0]


@dataclass
class TokenSubnetwork:
    """Learned per-image token scores and what they keep (section 4.5), as plain data.

    Attributes:
        scores: ``N x blocks x T`` scores, prefix columns 1.
        sites: one :class:`~hookchains.sites.TokenSite` per block (``blocks.{i}``, label ``B{i+1}``).
        tau: threshold: token ``t`` is kept in block ``i`` when ``min_{j<=i} s[n, j, t] >= tau``.
        fidelity: figures of the ``hard`` network on the fitting images (:func:`hookchains.metrics.fidelity`).
        config: fit options; history: per-step figures; model_ref / task: as in ``Subnetwork``.
    """

    scores: torch.Tensor
    sites: List[TokenSite]
    tau: float = 0.1
    fidelity: Dict[str, float] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    history: Dict[str, List[float]] = field(default_factory=dict)
    model_ref: Optional[Dict[str, Any]] = None
    task: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_masks(cls, masks: torch.Tensor, sites: Sequence[TokenSite]) -> "TokenSubnetwork":
        """A result whose scores are the binary ``masks`` (``N x blocks x T`` bool; made cumulative).

        Example: ``TokenSubnetwork.from_masks(torch.rand(2, 12, 197) > 0.3, sites)``."""
        scores = masks.float().clone()
        scores[..., :sites[0].prefix_tokens] = 1.0
        return cls(scores, list(sites), tau=0.5)

    @property
    def prefix_tokens(self) -> int:
        """Leading class/register tokens (never pruned). Example: ``result.prefix_tokens == 1`` for DeiT."""
        return self.sites[0].prefix_tokens

    @property
    def presence(self) -> torch.Tensor:
        """``min_{j<=i} s[n, j, t]`` per image, block and token (see :func:`token_presence`).

        Example: ``result.presence[0, :, 50]`` -- how present token 50 of image 0 is, block by block."""
        return token_presence(self.scores, self.prefix_tokens)

    @property
    def masks(self) -> torch.Tensor:
        """Cumulative kept masks, ``N x blocks x T`` bool (prefix tokens always True).

        Example: ``kept_patches_figure(image, result.masks[0])``."""
        return self.presence >= self.tau

    def counts(self) -> Dict[str, Any]:
        """Kept token slots per image (prefix slots included, as in the paper's 197 x 12 = 2364).

        Example: ``result.counts()["slots_kept"]`` -- e.g. ``[212, 187]`` for two images."""
        masks = self.masks
        per_image = masks.sum((1, 2))
        return {
            "slots_total": int(masks.shape[1] * masks.shape[2]),
            "slots_kept": per_image.tolist(),
            "slots_kept_mean": float(per_image.float().mean()),
            "tokens_per_block_mean": masks.sum(2).float().mean(0).tolist(),
            "patches_in_last_block": (masks[:, -1, self.prefix_tokens:].sum(1)).tolist(),
            "images": int(masks.shape[0]),
        }

    def summary(self) -> str:
        """One line: 'keeps K/2364 token slots per image (P %, mean of N); last block keeps ...; KL ...'.

        Example: ``print(result.summary())``."""
        c, f = self.counts(), self.fidelity
        line = (f"keeps {c['slots_kept_mean']:.0f}/{c['slots_total']} token slots per image "
                f"({100.0 * c['slots_kept_mean'] / c['slots_total']:.1f} %, mean of {c['images']}); "
                f"last block keeps {sum(c['patches_in_last_block']) / c['images']:.1f} patch tokens per image")
        if f:
            line += f"; top-1 agreement {f['agree']}/{f['images']}; KL {f['kl']:.3f}; Q mean {f['quotient_mean']:.2f}"
        return line

    def materialize(self, model: nn.Module, images: Optional[torch.Tensor] = None, **options) -> "TokenDroppedViT":
        """The physically token-dropping module; see :func:`materialize_tokens`.

        Example: ``small = result.materialize(model, images)``."""
        return materialize_tokens(self, model, images, **options)

    # ------------------------------------------------------------------ persistence
    def save(self, directory) -> Path:
        """Write ``token_scores.safetensors`` and ``tokens.json`` into ``directory`` (each atomically).

        Example: ``result.save("runs/deit-cat")``; ``TokenSubnetwork.load("runs/deit-cat")``."""
        directory = Path(directory)
        write_tensors(directory / _SCORES_FILE, {"scores": self.scores, "kept": self.masks},
                      metadata={"format": "hookchains-tokens"})
        write_json(directory / _META_FILE, {
            "format_version": TOKEN_FORMAT_VERSION, "summary": self.summary(), "counts": self.counts(),
            "tau": self.tau, "fidelity": self.fidelity, "config": self.config, "history": self.history,
            "model_ref": self.model_ref, "task": self.task, "sites": [dataclasses.asdict(s) for s in self.sites]})
        return directory

    @classmethod
    def load(cls, directory) -> "TokenSubnetwork":
        """Read what :meth:`save` wrote; missing, truncated or mismatched files are clear errors.

        Example: ``result = TokenSubnetwork.load("runs/deit-cat")``."""
        directory = Path(directory)
        for name in TOKEN_FILES:
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: {directory} holds no token result "
                                        f"(it needs {_META_FILE} and {_SCORES_FILE})")
        meta, tensors = read_json(directory / _META_FILE), read_tensors(directory / _SCORES_FILE)
        if meta.get("format_version") != TOKEN_FORMAT_VERSION:
            raise ValueError(f"{directory} has token format version {meta.get('format_version')}, this "
                             f"hookchains reads version {TOKEN_FORMAT_VERSION}")
        result = cls(tensors["scores"], [TokenSite(**s) for s in meta["sites"]], meta["tau"], meta["fidelity"],
                     meta["config"], meta["history"], meta["model_ref"], meta.get("task", {}))
        shape = (len(result.sites), result.sites[0].tokens)
        if (tuple(result.scores.shape[1:]) != shape or not torch.equal(result.masks, tensors["kept"])
                or meta.get("counts", {}).get("slots_kept") != result.counts()["slots_kept"]):
            raise ValueError(f"{directory}/{_SCORES_FILE} does not match its {_META_FILE}: the files were mixed up")
        return result


# ---------------------------------------------------------------------- fitting
def _kl_backward(chains: TokenChains, images: torch.Tensor, teacher_logp: torch.Tensor,
                 chunks: Sequence[slice], weight: float) -> float:
    """Mean KL over the images; backpropagates ``weight * KL`` chunk by chunk (each with its rows)."""
    total = 0.0
    for part in chunks:
        with chains.select(part):
            logq = F.log_softmax(chains.model(images[part]).float(), -1)
        kl = F.kl_div(logq, teacher_logp[part], log_target=True, reduction="sum") / images.shape[0]
        (weight * kl).backward()
        total += float(kl.detach())
    return total


@torch.no_grad()
def _logits(chains: TokenChains, images: torch.Tensor, mode: str, batch_size: Optional[int]) -> torch.Tensor:
    outs = []
    with chains.using(mode):
        for part in _chunks(images.shape[0], batch_size):
            with chains.select(part):
                outs.append(chains.model(images[part]).float())
    return torch.cat(outs)


def _optimise(chains: TokenChains, images: torch.Tensor, teacher_logp: torch.Tensor,
              cfg: FitConfig) -> Dict[str, List[float]]:
    """Adam on the token scores; recipe ``hookchains``: mode ``ste``, adaptive KL weight, stable stop."""
    chunks = _chunks(images.shape[0], cfg.batch_size)
    optimiser = torch.optim.Adam([chains.scores], lr=cfg.lr)
    history: Dict[str, List[float]] = {"loss": [], "kl": [], "slots": [], "kl_weight": []}
    weight, stable_for, last = 1.0, 0, None
    bar = tqdm(range(cfg.steps), desc="fit tokens", disable=not cfg.progress, leave=False)
    with chains.using("soft" if cfg.recipe == "paper" else "ste"):
        for _ in bar:
            optimiser.zero_grad(set_to_none=True)
            kl = _kl_backward(chains, images, teacher_logp, chunks, weight)
            penalty = cfg.lam * chains.l1()
            penalty.backward()
            optimiser.step()
            chains.clamp_()
            kept = chains.kept()
            slots = float(kept.sum((1, 2)).float().mean())
            figures = {"loss": kl + float(penalty.detach()), "kl": kl, "slots": slots, "kl_weight": weight}
            for key, value in figures.items():
                history[key].append(value)
            weight = _next_kl_weight(weight, kl, cfg)
            settled = last is not None and int((kept != last).sum()) <= STABLE_FLIPS * kept.numel()
            stable_for, last = (stable_for + 1 if settled else 0), kept
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", kl=f"{kl:.3f}", slots=f"{slots:.0f}")
            if _stopped(cfg, history, stable_for):
                break
    bar.close()
    return history


def fit_tokens(model: nn.Module, images: torch.Tensor, *, steps: Optional[int] = None, lr: Optional[float] = None,
               lam: Optional[float] = None, tau: float = 0.1, seed: Optional[int] = None,
               progress: Optional[bool] = None, config: Optional[FitConfig] = None, **options) -> TokenSubnetwork:
    """Learn per-image token scores so the thresholded ViT keeps the model's outputs (Eq. 8, section 4.5).

    Model weights are frozen for the duration (``requires_grad_(False)``, restored afterwards) and the
    model runs in eval mode; teacher logits are computed once; every hook is removed at the end.

    Args:
        model: a timm ViT/DeiT with class-token pooling (see :func:`check_token_model`).
        images: ``N x 3 x H x W``, preprocessed for the model; score row ``n`` belongs to image ``n``.
        steps, lr, lam, seed, progress: override :data:`TOKEN_DEFAULTS` (``None``: keep the default).
        tau: keep threshold on the presence ``min_{j<=i} s``.
        config: a :class:`~hookchains.fit.FitConfig` to start from instead of :data:`TOKEN_DEFAULTS`.
        **options: any other ``FitConfig`` field (``recipe``, ``kl_target``, ``patience``, ``batch_size``...).
            Recipe ``hookchains`` (default) trains in mode ``ste`` (the ``hard`` forward; pruned tokens
            get the gradient of re-admitting them) with the adaptive KL weight of :mod:`hookchains.fit`
            and stops once at most 1 % of the slots change per step for ``patience`` steps, the loss
            has settled and the KL is within ``kl_tol``; ``paper`` trains the ``soft`` network with a
            fixed weight and stops when the loss changes by < ``loss_tol`` between steps.

    Returns:
        a :class:`TokenSubnetwork` whose fidelity is measured on the ``hard`` network.

    Example:
        >>> result = fit_tokens(timm.create_model("deit_small_patch16_224").eval(), images, steps=100)
        >>> result.counts()["slots_total"]
        2364
    """
    validate_images(images)
    check_token_model(model)
    given = {"steps": steps, "lr": lr, "lam": lam, "seed": seed, "progress": progress}
    cfg = dataclasses.replace(config or TOKEN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}, **options)
    images = images.to(next(model.parameters()).device)
    torch.manual_seed(cfg.seed)
    with eval_mode(model), _frozen_weights(model), \
            TokenChains(model, images.shape[0], tau=tau, example=images[:1]) as chains:
        teacher = _logits(chains, images, "off", cfg.batch_size)
        history = _optimise(chains, images, F.log_softmax(teacher, -1), cfg)
        student = _logits(chains, images, "hard", cfg.batch_size)
    scores = chains.scores.detach().cpu().clone()
    scores[..., :chains.prefix] = 1.0  # prefix scores never change; stored as 1 for readability
    if any(math.isnan(v) for v in history["loss"]):
        raise FloatingPointError("the loss became NaN while fitting token scores; lower lr or check the images")
    config_out = {**dataclasses.asdict(cfg), "tau": tau, "steps_run": len(history["loss"])}
    return TokenSubnetwork(scores, chains.sites, tau, fidelity(teacher, student), config_out, history)


# ---------------------------------------------------------------------- materialising
class TokenDroppedViT(nn.Module):
    """A ViT that physically drops, before each block, the tokens a :class:`TokenSubnetwork` pruned.

    Every image has its own kept set, so a batch is run image by image: for image ``n`` a forward
    pre-hook on block ``i`` gathers the tokens kept in block ``i`` (a subset of those of block
    ``i-1``, so the sequence only shrinks) and the model's own, unmodified blocks run on that shorter
    sequence; in ``hard`` mode the kept tokens' weights ``log m`` go in as ``attn_mask`` on the gathered
    keys. The class token stays first, so the head's class-token pooling is unchanged. The hooks exist
    only during :meth:`forward`; the wrapped model is borrowed, not copied.

    ``forward(images, rows=None)``: row ``j`` of ``images`` is fitting image ``rows[j]`` (default: all
    fitting images, in order) -- the masks are per image and apply to those images only.

    Example:
        >>> small = materialize_tokens(result, model, images)
        >>> small(images[2:4], rows=[2, 3]).shape
        torch.Size([2, 1000])
    """

    def __init__(self, model: nn.Module, tsub: TokenSubnetwork, mode: str = "hard") -> None:
        super().__init__()
        if mode not in ("hard", "mask"):
            raise ValueError(f"mode must be 'hard' (kept tokens weighted by their scores) or 'mask', got {mode!r}")
        self.model, self.mode, self.tsub = model, mode, tsub
        self.block_names = [site.name for site in tsub.sites]
        self.gather: List[List[torch.Tensor]] = []
        self.bias: List[List[Optional[torch.Tensor]]] = []
        presence, masks = tsub.presence, tsub.masks
        for n in range(masks.shape[0]):
            previous, gathers, biases = torch.arange(masks.shape[2]), [], []
            for i in range(masks.shape[1]):
                kept = torch.nonzero(masks[n, i]).flatten()
                gathers.append(torch.searchsorted(previous, kept))
                weights = torch.log(presence[n, i, kept].clamp_min(_TINY))[None, None, None]
                biases.append(weights if mode == "hard" else None)
                previous = kept
            self.gather.append(gathers)
            self.bias.append(biases)
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
            kwargs = {**kwargs, "attn_mask": None if bias is None else bias.to(device=x.device, dtype=x.dtype)}
            return (x, *args[1:]), kwargs
        return _mark(hook)

    def forward(self, images: torch.Tensor, rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        rows = list(range(len(self.gather))) if rows is None else [int(r) for r in rows]
        if len(rows) != images.shape[0] or not all(0 <= r < len(self.gather) for r in rows):
            raise ValueError(f"got {images.shape[0]} images for rows {rows[:8]}: this module holds the kept "
                             f"tokens of {len(self.gather)} fitting images; pass rows=[indices] for a subset")
        if _token_hooks_on(self.model):
            raise RuntimeError("TokenChains hooks are attached to the wrapped model; detach them first")
        current = {"n": 0}
        handles = [self.model.get_submodule(name).register_forward_pre_hook(self._hook(i, current), with_kwargs=True)
                   for i, name in enumerate(self.block_names)]
        try:
            outs = []
            for j, n in enumerate(rows):
                current["n"] = n
                outs.append(self.model(images[j:j + 1]))
            return torch.cat(outs)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def check(self, images: torch.Tensor, rows: Optional[Sequence[int]] = None,
              tolerance: float = TOLERANCE) -> float:
        """Raise :class:`~hookchains.materialize.MaterializeError` unless the logits equal the masked
        (hooked) model's within ``tolerance * max|logit|``; returns the max abs difference.

        Example: ``small.check(images)``."""
        rows_t = torch.arange(len(self.gather)) if rows is None else torch.as_tensor(list(rows))
        with eval_mode(self.model), TokenChains(self.model, len(self.gather), tau=self.tsub.tau,
                                                sites=self.tsub.sites) as chains:
            chains.load_scores(self.tsub.scores.to(chains.scores.device))
            with chains.using(self.mode), chains.select(rows_t):
                reference = self.model(images).float()
        with eval_mode(self.model):
            got = self(images, rows_t.tolist()).float()
        diff, scale = float((got - reference).abs().max()), max(float(reference.abs().max()), 1e-12)
        self.max_abs_diff = diff
        if diff > tolerance * scale:
            raise MaterializeError(f"token-dropping module differs from the masked network by {diff:.3g} "
                                   f"(> {tolerance:g} x max|logit| = {tolerance * scale:.3g})")
        return diff


def materialize_tokens(tsub: TokenSubnetwork, model: nn.Module, images: Optional[torch.Tensor] = None, *,
                       mode: str = "hard", check: bool = True) -> TokenDroppedViT:
    """Build the module that physically drops each fitting image's pruned tokens before every block.

    Args:
        tsub: a :class:`TokenSubnetwork` fitted on ``model``.
        model: the original ViT (borrowed by the returned module, never modified).
        images: the fitting images (``N x 3 x H x W``, same order); with ``check`` the module's logits
            are compared with the hooked masked network's (:meth:`TokenDroppedViT.check`).
        mode: ``"hard"`` (default; kept tokens weighted by their scores: the network ``fit_tokens``
            measured) or ``"mask"`` (kept tokens at weight 1: the binary sub-network).

    Example:
        >>> small = materialize_tokens(result, model, images)   # raises MaterializeError if not exact
        >>> small.tokens_per_block()[0]                         # sequence lengths of image 0
    """
    check_token_model(model)
    if len(tsub.sites) != len(model.blocks):
        raise ValueError(f"the result has {len(tsub.sites)} blocks, {type(model).__name__} has {len(model.blocks)}")
    module = TokenDroppedViT(model, tsub, mode)
    if images is not None and check:
        validate_images(images)
        module.check(images.to(next(model.parameters()).device))
    return module
