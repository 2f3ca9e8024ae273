"""``TokenSubnetwork``: per-image token scores of a ViT and what they keep (paper section 4.5), as plain
data that saves as safetensors + JSON. The token twin of :class:`hookchains.core.subnetwork.Subnetwork`;
both are :class:`hookchains.core.result.Result` (save/load, format version, summary parts)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from hookchains.core.result import FORMAT_VERSION, Result
from hookchains.core.sites import TokenSite
from hookchains.tokens.hooks import token_presence

__all__ = ["TokenSubnetwork", "TOKEN_FORMAT_VERSION", "TOKEN_FILES"]

TOKEN_FORMAT_VERSION = FORMAT_VERSION  # one version for both results (hookchains.core.result)
TOKEN_FILES = ("tokens.json", "token_scores.safetensors")  # what TokenSubnetwork.save writes (run folders list them)


@dataclass
class TokenSubnetwork(Result):
    """Learned per-image token scores and what they keep (section 4.5), as plain data.

    Attributes:
        scores: ``N x blocks x T`` scores, prefix columns 1.
        sites: one :class:`~hookchains.core.sites.TokenSite` per block (``blocks.{i}``, label ``B{i+1}``).
        tau: threshold: token ``t`` is kept in block ``i`` when ``min_{j<=i} s[n, j, t] >= tau``.
        fidelity: figures of the ``hard`` network on the fitting images (:func:`hookchains.core.metrics.fidelity`).
        config: fit options; history: per-step figures; model_ref / task: as in ``Subnetwork``.
        valid: ``N x T`` bool, the real (unpadded) tokens of a text run (``None``: every token is real);
            a padded position is never kept and not counted in ``slots_total``.
    """

    scores: torch.Tensor
    sites: List[TokenSite]
    tau: float = 0.1
    fidelity: Dict[str, float] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    history: Dict[str, List[float]] = field(default_factory=dict)
    model_ref: Optional[Dict[str, Any]] = None
    task: Dict[str, Any] = field(default_factory=dict)
    valid: Optional[torch.Tensor] = None

    files = TOKEN_FILES
    tensor_format = "hookchains-tokens"
    unit = "token slots"

    @classmethod
    def from_masks(cls, masks: torch.Tensor, sites: Sequence[TokenSite]) -> TokenSubnetwork:
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
        presence = token_presence(self.scores, self.prefix_tokens)
        return presence if self.valid is None else presence * self.valid[:, None, :]

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
        lengths = None if self.valid is None else self.valid.sum(1) * masks.shape[1]
        return {
            "slots_total": int(masks.shape[1] * masks.shape[2]) if lengths is None else float(lengths.float().mean()),
            "slots_kept": per_image.tolist(),
            "slots_kept_mean": float(per_image.float().mean()),
            "tokens_per_block_mean": masks.sum(2).float().mean(0).tolist(),
            "patches_in_last_block": (masks[:, -1, self.prefix_tokens:].sum(1)).tolist(),
            "images": int(masks.shape[0]),
        }

    def summary(self) -> str:
        """One line: 'keeps K/2364 token slots per image (P %, mean of N); last block keeps ...; KL ...'.

        Example: ``print(result.summary())``."""
        c = self.counts()
        unit, rest = ("image", "patch") if self.valid is None else ("sentence", "word-piece")
        return (f"keeps {c['slots_kept_mean']:.0f}/{c['slots_total']:.0f} token slots per {unit} "
                f"({100.0 * c['slots_kept_mean'] / c['slots_total']:.1f} %, mean of {c['images']}); "
                f"last block keeps {sum(c['patches_in_last_block']) / c['images']:.1f} {rest} tokens per {unit}"
                + self.fidelity_text() + self.ending_text())

    # ------------------------------------------------------------------ persistence (Result.save / load)
    def tensors_to_save(self) -> Dict[str, torch.Tensor]:
        """``token_scores.safetensors``: ``scores``, ``kept`` (the masks, checked on load), ``valid`` (text)."""
        extra = {} if self.valid is None else {"valid": self.valid.to(torch.uint8)}
        return {"scores": self.scores, "kept": self.masks, **extra}

    def meta_to_save(self) -> Dict[str, Any]:
        """``tokens.json`` besides the shared fields: the token sites."""
        return {"sites": [dataclasses.asdict(s) for s in self.sites]}

    @classmethod
    def from_saved(cls, directory: Path, meta: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> TokenSubnetwork:
        result = cls(tensors["scores"], [TokenSite(**s) for s in meta["sites"]], meta["tau"], meta["fidelity"],
                     meta["config"], meta["history"], meta["model_ref"], meta.get("task", {}),
                     tensors["valid"].bool() if "valid" in tensors else None)
        shape = (len(result.sites), result.sites[0].tokens)
        if (tuple(result.scores.shape[1:]) != shape or not torch.equal(result.masks, tensors["kept"])
                or meta.get("counts", {}).get("slots_kept") != result.counts()["slots_kept"]):
            raise ValueError(f"{directory}/{cls.files[1]} does not match its {cls.files[0]}: the files were mixed up")
        return result
