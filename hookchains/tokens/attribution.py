"""Where ViT tokens draw their information from: the attribution of Eq. 10 (paper section 4.5, Fig. 7).

For a ViT with ``L`` blocks the paper propagates head-averaged attention through the residual stream::

    Attribution_l = Attention_l x Attribution_(l-1) + Attribution_(l-1),    Attribution_0 = I     (Eq. 10)

Row ``i`` of ``Attribution_l`` says how much token ``i`` after block ``l`` draws on each *input* token.
``Attention_l = softmax(Q K^T / sqrt(d_k))`` -- the paper writes ``... V`` after the softmax, but only
the ``T x T`` probability matrix can multiply ``Attribution_(l-1)``; it is averaged over heads.

Choices made here (and why):

* **The pruned network.** With token masks (a :class:`~hookchains.tokens.TokenSubnetwork` or boolean
  ``N x blocks x T`` masks) the attention is that of the pruned network: pruned keys are excluded
  inside the softmax (so its columns are exactly 0 and each kept row still sums to 1 over the kept
  keys), the rows of tokens absent from block ``l`` are set to 0 in ``Attention_l`` and in
  ``Attribution_l`` (an absent token has no attribution to speak of), and a ``TokenSubnetwork``'s kept
  tokens carry their score weights, as in its ``hard`` network.
* **No row re-normalisation of the attention**: the masked softmax is already row-stochastic over the
  kept keys; re-normalising after zeroing would only be needed if pruned keys had been dropped after
  the softmax, which they are not.
* **Scale.** Eq. 10 doubles every kept row's sum per block (``A`` is row-stochastic and the shortcut
  adds ``Attribution_(l-1)``), so ``Attribution_l`` rows sum to ``2^l``. ``normalize=True`` (default)
  divides by ``2^l`` -- exactly the row sums -- so each kept row is a distribution over the input
  tokens and blocks are comparable; this is Abnar & Zuidema's rollout ``(A + I) / 2``. Heatmaps
  are unchanged up to that per-block factor; ``normalize=False`` gives Eq. 10 literally.
* **Capturing attention with hooks.** timm's fused path (SDPA) never materialises the probabilities,
  so a forward hook on each ``attn.qkv`` recomputes ``softmax(q k^T * scale + mask)`` from the qkv
  output (with timm's ``q_norm``/``k_norm`` and the same mask the block received). On the manual path
  this equals the probabilities timm computes (tested).

Example:
    >>> import timm, torch
    >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
    >>> images = torch.randn(4, 3, 64, 64)
    >>> from hookchains.tokens.fit import fit_tokens
    >>> result = fit_tokens(model, images, steps=2, progress=False)
    >>> attr = token_attribution(model, images, result)            # N x blocks x T x T
    >>> attr.shape                                                  # deit_small at 224 px: N x 12 x 197 x 197
    torch.Size([4, 6, 17, 17])
    >>> cls_maps = class_token_heatmaps(model, images, result, attribution=attr).maps  # N x 6 x 4 x 4
    >>> raw_image_0 = torch.rand(3, 64, 64)                         # the unnormalised picture, in [0, 1]
    >>> kept_patches_figure(raw_image_0, result.masks[0]).save("kept.png")
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from timm.layers import Attention
from torch import Tensor, nn

from hookchains.adapters.transformers import prefix_tokens, token_layers
from hookchains.core.fit import chunks
from hookchains.core.state import eval_mode
from hookchains.inputs.data import validate_images
from hookchains.inputs.forward import call
from hookchains.tokens.encoder import check_text_token_model, eager_attention, is_hf_objective
from hookchains.tokens.hooks import TokenChains, check_token_model, token_presence, vit_blocks, vit_prefix_tokens
from hookchains.tokens.result import TokenSubnetwork

__all__ = ["Heatmaps", "rollout", "attention_maps", "token_attribution", "class_token_heatmaps",
           "patch_token_heatmaps", "kept_patches_figure", "text_token_attribution"]

Masks = Union[None, Tensor, TokenSubnetwork]


class Heatmaps(NamedTuple):
    """Per-block patch-grid maps (``N x blocks x gh x gw``) of one attribution row per image, and the
    sequence index of that row (``N``; 0 is the class token)."""

    maps: Tensor
    tokens: Tensor


def rollout(attentions: Tensor, keep: Optional[Tensor] = None, *, normalize: bool = True) -> Tensor:
    """Eq. 10 over given head-averaged attention matrices.

    Args:
        attentions: ``N x L x T x T`` (row = query, column = key).
        keep: optional ``N x L x T`` bool: tokens present in each block. Rows and columns of absent
            tokens are zeroed in ``Attention_l``, and their rows in ``Attribution_l``.
        normalize: divide ``Attribution_l`` by ``2^l`` (kept rows then sum to 1; see module doc).

    Returns:
        ``N x L x T x T``: ``Attribution_1 .. Attribution_L``.

    Example:
        >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])        # N=1, L=1, T=2
        >>> rollout(a, normalize=False)[0, 0]                    # A @ I + I
        tensor([[1.5000, 0.5000], [0.0000, 2.0000]])
    """
    if attentions.ndim != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attentions must be N x L x T x T, got shape {tuple(attentions.shape)}")
    if keep is not None and keep.shape != attentions.shape[:3]:
        raise ValueError(f"keep must be N x L x T = {tuple(attentions.shape[:3])}, got {tuple(keep.shape)}")
    n, blocks, t, _ = attentions.shape
    attribution = torch.eye(t, dtype=attentions.dtype, device=attentions.device).expand(n, t, t)
    out = []
    for block in range(blocks):
        a = attentions[:, block]
        present = None if keep is None else keep[:, block].to(a.dtype)
        if present is not None:
            a = a * present[:, :, None] * present[:, None, :]
        attribution = a @ attribution + attribution
        if present is not None:
            attribution = attribution * present[:, :, None]
        if normalize:
            attribution = attribution / 2
        out.append(attribution)
    return torch.stack(out, 1)


def _check_attention(model: nn.Module) -> None:
    if is_hf_objective(model):
        raise ValueError(f"{type(model.model).__name__} is a Hugging Face model: its attention maps are not "
                         "recomputed from attn.qkv; token_attribution(model, inputs, result) reads transformers' own")
    for i, block in enumerate(vit_blocks(model)):
        if not isinstance(getattr(block, "attn", None), Attention):
            raise ValueError(f"blocks.{i}.attn is {type(getattr(block, 'attn', None)).__name__}, not timm's "
                             "Attention: its probabilities cannot be recomputed from attn.qkv")


def _probabilities(attn: Attention, qkv: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Head-averaged ``softmax(q k^T * scale + bias)`` from ``attn.qkv``'s output, as timm computes it."""
    b, t, _ = qkv.shape
    q, k, _v = qkv.reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits.softmax(-1).mean(1)


def _network(masks: Masks, n: int) -> Tuple[Optional[Tensor], float, str, Optional[list]]:
    """(scores, tau, masking, sites) of the network whose attention is read."""
    if masks is None:
        return None, 0.1, "off", None
    if isinstance(masks, TokenSubnetwork):
        if masks.scores.shape[0] != n:
            raise ValueError(f"the result holds scores of {masks.scores.shape[0]} images, got {n} images")
        return masks.scores, masks.tau, "hard", masks.sites
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.ndim != 3 or masks.shape[0] != n:
        raise ValueError(f"masks must be a TokenSubnetwork or a bool tensor N x blocks x T with N = {n}")
    return masks.float(), 0.5, "mask", None


def attention_maps(model: nn.Module, images: Tensor, masks: Masks = None, *,
                   batch_size: Optional[int] = None) -> Tensor:
    """Head-averaged attention probabilities of every block, ``N x blocks x T x T`` (on the CPU).

    With ``masks`` the (pruned) network's attention, pruned keys excluded, rows of absent tokens 0.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
        >>> images = torch.randn(4, 3, 64, 64)
        >>> attention_maps(model, images[:2]).sum(-1)[0, 0, :3]     # rows sum to 1
        tensor([1.0000, 1.0000, 1.0000])
    """
    validate_images(images)
    _check_attention(model)
    check_token_model(model)
    scores, tau, masking, sites = _network(masks, images.shape[0])
    images = images.to(next(model.parameters()).device)
    with eval_mode(model), torch.no_grad(), \
            TokenChains(model, images.shape[0], tau=tau, example=images[:1], sites=sites) as chains:
        if scores is not None:
            chains.load_scores(scores.to(chains.scores.device))
        captured: List[List[Tensor]] = [[] for _ in chains.sites]
        handles = [model.get_submodule(f"{site.name}.attn.qkv").register_forward_hook(_capture(chains, i, captured[i]))
                   for i, site in enumerate(chains.sites)]
        try:
            with chains.using(masking):
                for part in chunks(images.shape[0], batch_size):
                    with chains.select(part):
                        model(images[part])
        finally:
            for handle in handles:
                handle.remove()
    return torch.stack([torch.cat(rows) for rows in captured], 1)


def _capture(chains: TokenChains, block: int, sink: List[Tensor]):
    attn = chains.model.get_submodule(chains.sites[block].name).attn

    def hook(module, args, out):
        probs = _probabilities(attn, out, chains.key_bias(block))
        if chains.masking != "off":
            probs = probs * chains.kept()[:, block, :, None].to(probs.dtype)
        sink.append(probs.float().cpu())
    return hook


def token_attribution(model: nn.Module, images: Tensor, masks: Masks = None, *, normalize: bool = True,
                      batch_size: Optional[int] = None) -> Tensor:
    """Eq. 10 on ``model`` for ``images``: ``N x blocks x T x T`` (block ``l`` at index ``l - 1``).

    Args:
        model: a timm ViT/DeiT (see :func:`hookchains.tokens.check_token_model`), or an HF ViT/DeiT
            classifier in ``OutputLogits`` (then ``masks`` must be its result: :func:`text_token_attribution`).
        images: ``N x 3 x H x W``; with masks, in the order of the fitting images.
        masks: ``None`` (the full model), a :class:`~hookchains.tokens.TokenSubnetwork` (its ``hard``
            network), or bool masks ``N x blocks x T`` (made cumulative; prefix tokens always kept).
        normalize: divide block ``l`` by ``2^l`` so kept rows sum to 1 (``False``: Eq. 10 as written).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
        >>> images = torch.randn(4, 3, 64, 64)
        >>> from hookchains.tokens.fit import fit_tokens
        >>> result = fit_tokens(model, images, steps=2, progress=False)
        >>> attr = token_attribution(model, images, result)
        >>> attr[0, -1, 0, 1:].reshape(4, 4).shape      # what the class token draws on, last block
        torch.Size([4, 4])
    """
    if is_hf_objective(model):  # an HF ViT/DeiT: transformers' own attentions
        if not isinstance(masks, TokenSubnetwork):
            raise ValueError(f"{type(model.model).__name__} is a Hugging Face model: its Eq. 10 attribution is "
                             "read on a token result's network; pass the TokenSubnetwork fitted on these images")
        return text_token_attribution(model, images, masks, normalize=normalize)
    attentions = attention_maps(model, images, masks, batch_size=batch_size)
    return rollout(attentions, _presence(masks, _prefix(model)), normalize=normalize)


def _prefix(model: nn.Module) -> int:
    """Prefix tokens of a timm ViT/DeiT or of an HF one in its objective wrapper."""
    return prefix_tokens(model) if is_hf_objective(model) else vit_prefix_tokens(model)


@torch.no_grad()
def text_token_attribution(model: nn.Module, inputs, tsub: TokenSubnetwork, *, normalize: bool = True) -> Tensor:
    """Eq. 10 on the ``hard`` network of a token result of an HF model (a text objective, or an HF
    ViT/DeiT classifier given its images): ``N x layers x T x T`` (on the CPU).

    The head-averaged probabilities are those transformers' eager attention returns (switched on for
    the pass, restored after) with the result's token bias added to the padding mask; rows and
    columns of tokens absent from a layer (pruned or padding) are 0, as in :func:`rollout`.

    Args:
        model: the HF objective the result was fitted on (:mod:`hookchains.tokens.encoder`).
        inputs: its ``input_ids`` and ``attention_mask`` (``N x T``), or its images (``N x 3 x H x W``),
            in the order of the fit.
        tsub: the :class:`~hookchains.tokens.TokenSubnetwork`.

    Example: ``text_token_attribution(task.model, task.inputs, tsub)[n, -1, 0]`` -- what sentence
    ``n``'s first token draws on, word by word, after the last layer.
    """
    check_text_token_model(model)
    layers = token_layers(model)
    captured: List[Tensor] = []

    def hook(module, args, output):
        captured.append(output[1].float().mean(1).cpu())

    with eval_mode(model), eager_attention(model), TokenChains(model, tsub.scores.shape[0], tau=tsub.tau,
                                                               sites=tsub.sites, valid=tsub.valid) as chains:
        chains.load_scores(tsub.scores.to(chains.scores.device))
        handles = [model.get_submodule(layer.attention).register_forward_hook(hook) for layer in layers]
        try:
            with chains.using("hard"):
                call(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
    return rollout(torch.stack(captured, 1), tsub.masks, normalize=normalize)


def _presence(masks: Masks, prefix: int) -> Optional[Tensor]:
    if masks is None:
        return None
    if isinstance(masks, TokenSubnetwork):
        return masks.masks
    return token_presence(masks.float(), prefix) >= 0.5


def patch_grid(model: nn.Module, patches: int) -> Tuple[int, int]:
    """(rows, columns) of the patch grid of ``model`` holding ``patches`` patch tokens (timm's
    ``patch_embed.grid_size`` when it fits, else the nearest square)."""
    grid = tuple(getattr(getattr(model, "patch_embed", None), "grid_size", ()) or ())
    if len(grid) == 2 and grid[0] * grid[1] == patches:
        return int(grid[0]), int(grid[1])
    side = int(round(patches ** 0.5))
    if side * side != patches:
        raise ValueError(f"cannot lay {patches} patch tokens out on a grid; pass images of the model's size")
    return side, side


def _rows_as_maps(model: nn.Module, attribution: Tensor, tokens: Tensor) -> Heatmaps:
    prefix = _prefix(model)
    rows = torch.stack([attribution[n, :, t, prefix:] for n, t in enumerate(tokens.tolist())])
    gh, gw = patch_grid(model, rows.shape[-1])
    return Heatmaps(rows.reshape(*rows.shape[:2], gh, gw), tokens)


def class_token_heatmaps(model: nn.Module, images: Tensor, masks: Masks = None, *,
                         attribution: Optional[Tensor] = None) -> Heatmaps:
    """Attribution of the class token to the input patches in every block (Fig. 7, middle row).

    ``attribution`` (from :func:`token_attribution`) skips recomputing it.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
        >>> images = torch.randn(4, 3, 64, 64)
        >>> from hookchains.tokens.fit import fit_tokens
        >>> result = fit_tokens(model, images, steps=2, progress=False)
        >>> class_token_heatmaps(model, images, result).maps.shape      # N x blocks x 4 x 4 patches
        torch.Size([4, 6, 4, 4])
    """
    attribution = token_attribution(model, images, masks) if attribution is None else attribution
    return _rows_as_maps(model, attribution, torch.zeros(attribution.shape[0], dtype=torch.long))


def patch_token_heatmaps(model: nn.Module, images: Tensor, masks: Masks = None, *,
                         tokens: Optional[Sequence[int]] = None, attribution: Optional[Tensor] = None) -> Heatmaps:
    """Attribution of one patch token per image to the input patches in every block (Fig. 7, bottom).

    Args:
        tokens: sequence index per image (prefix tokens come first: patch ``p`` is ``p + prefix``).
            Default: the patch token that stays longest (the one "retained in the last block" of the
            paper), ties broken by the class token's last-block attribution to that patch.
        attribution: precomputed :func:`token_attribution` output.

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
        >>> images = torch.randn(4, 3, 64, 64)
        >>> from hookchains.tokens.fit import fit_tokens
        >>> result = fit_tokens(model, images, steps=2, progress=False)
        >>> heat = patch_token_heatmaps(model, images, result)
        >>> heat.tokens.shape, heat.maps.shape          # chosen tokens, N x blocks x 4 x 4
        (torch.Size([4]), torch.Size([4, 6, 4, 4]))
    """
    attribution = token_attribution(model, images, masks) if attribution is None else attribution
    if tokens is None:
        keep = _presence(masks, _prefix(model))
        keep = torch.ones(attribution.shape[:3], dtype=torch.bool) if keep is None else keep
        chosen = _longest_kept_patch(keep, attribution, _prefix(model))
    else:
        chosen = torch.as_tensor(list(tokens), dtype=torch.long)
    if chosen.shape != (attribution.shape[0],) or not bool(((chosen >= 0) & (chosen < attribution.shape[2])).all()):
        raise ValueError(f"tokens must hold one sequence index in [0, {attribution.shape[2]}) per image")
    return _rows_as_maps(model, attribution, chosen)


def _longest_kept_patch(keep: Tensor, attribution: Tensor, prefix: int) -> Tensor:
    depth = keep[:, :, prefix:].sum(1).float()
    cls_last = attribution[:, -1, 0, prefix:]
    deepest = depth == depth.max(1, keepdim=True).values
    return torch.where(deepest, cls_last, torch.full_like(cls_last, float("-inf"))).argmax(1) + prefix


def _as_tensor(image: Union[Tensor, Image.Image]) -> Tensor:
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError("image must be a PIL image or a float tensor 3 x H x W with values in [0, 1]")
    return image.detach().float().cpu().clamp(0.0, 1.0)


def _panel(picture: Tensor, cells: Tensor, dim: float, colour: Tuple[int, int, int]) -> Image.Image:
    """One block: pruned patches dimmed to ``dim`` brightness, kept patches outlined."""
    height, width = picture.shape[1:]
    gh, gw = cells.shape
    shade = F.interpolate(cells[None, None].float(), size=(height, width), mode="nearest")[0]
    pixels = (picture * (dim + (1.0 - dim) * shade) * 255.0).round().to(torch.uint8)
    panel = Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
    draw = ImageDraw.Draw(panel)
    for r, c in torch.nonzero(cells).tolist():
        box = (c * width / gw, r * height / gh, (c + 1) * width / gw - 1, (r + 1) * height / gh - 1)
        draw.rectangle([round(v) for v in box], outline=colour)
    return panel


def kept_patches_figure(image: Union[Tensor, Image.Image], keep: Tensor, *, prefix_tokens: int = 1,
                        grid: Optional[Tuple[int, int]] = None, columns: int = 6, dim: float = 0.35,
                        colour: Tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    """The patches kept in each block as red squares on the image (Fig. 7, top row), as one PIL image.

    Args:
        image: the picture the model saw (PIL, or float ``3 x H x W`` in [0, 1], not normalised).
        keep: ``blocks x T`` bool for this image, e.g. ``result.masks[n]`` (prefix columns ignored).
        grid: patch grid ``(gh, gw)``; default: square.
        columns: panels per row; dim: brightness of pruned patches (1 = not dimmed).

    Example:
        >>> import timm, torch
        >>> model = timm.create_model("test_vit", img_size=64, num_classes=10).eval()   # 6 blocks, 4 x 4 patches
        >>> images = torch.randn(4, 3, 64, 64)
        >>> from hookchains.tokens.fit import fit_tokens
        >>> result = fit_tokens(model, images, steps=2, progress=False)
        >>> raw = torch.rand(3, 64, 64)          # image 0 before normalisation (e.g. ``image_set.raw[0]``)
        >>> kept_patches_figure(raw, result.masks[0]).save("kept_patches.png")
    """
    picture = _as_tensor(image)
    if keep.ndim != 2 or not 0.0 <= dim <= 1.0 or columns < 1:
        raise ValueError(f"need keep of shape blocks x T, 0 <= dim <= 1 and columns >= 1 (got {tuple(keep.shape)}, "
                         f"{dim}, {columns})")
    patches = keep.shape[1] - prefix_tokens
    gh, gw = grid or (int(round(patches ** 0.5)),) * 2
    if gh * gw != patches:
        raise ValueError(f"{patches} patch tokens do not fill a {gh} x {gw} grid; pass grid=(rows, columns)")
    panels = [_panel(picture, keep[b, prefix_tokens:].reshape(gh, gw).cpu(), dim, colour) for b in range(keep.shape[0])]
    return _tile(panels, [f"B{b + 1}" for b in range(len(panels))], columns)


def _tile(panels: List[Image.Image], labels: List[str], columns: int, gap: int = 4, header: int = 14) -> Image.Image:
    width, height = panels[0].size
    rows = -(-len(panels) // columns)
    cols = min(columns, len(panels))
    sheet = Image.new("RGB", (cols * (width + gap) + gap, rows * (height + header + gap) + gap), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x, y = gap + (i % columns) * (width + gap), gap + (i // columns) * (height + header + gap)
        draw.text((x, y), label, fill="black", font=font)
        sheet.paste(panel, (x, y + header))
    return sheet
