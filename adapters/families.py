"""Family adapters: the generic discovery plus the paper's labels and the family's own gate rules.

* :class:`ResNetAdapter` -- timm/torchvision ResNet(-D/-Xt): ``L{stage}B{block}C{conv}``, shortcut conv
  ``L{stage}B{block}SC``, stem ``L0C1``; gates on bottleneck/basic blocks with an identity shortcut.
* :class:`VGGAdapter` -- timm/torchvision VGG with or without BN: conv ``L{features-index}``, fully
  connected ``FC{index}``; gates on conv(+BN)+ReLU layers whose output shape equals their input shape.
* :class:`MobileNetAdapter` -- timm MobileNet/EfficientNet (``blocks.{s}.{b}``) and torchvision
  MobileNetV2/V3 (``features.{i}``): ``S{s}B{b}{PW|DW|PWL|SE..}`` / ``F{i}C{j}``; gates on inverted
  residual blocks with a skip.
* :class:`ViTAdapter` -- timm ViT/DeiT: ``B{block}.{linear}``; gates on blocks; token sites on blocks.
"""
from __future__ import annotations

import dataclasses
import re
from typing import List

from torch import nn

from hookchains.core.sites import TokenSite

from .base import Adapter
from .graph import ModelGraph

__all__ = ["ResNetAdapter", "VGGAdapter", "MobileNetAdapter", "ViTAdapter"]


class ResNetAdapter(Adapter):
    """ResNet family (timm ``resnet*``/``resnext*``/``wide_resnet*``, ``torchvision:resnet*``)."""

    name = "resnet"
    _CONV = re.compile(r"^layer(\d+)\.(\d+)\.(?:conv(\d+)|downsample\.(\d+)|(downsample))")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return all(hasattr(model, a) for a in ("conv1", "layer1", "layer4", "fc"))

    def filter_label(self, path: str) -> str:
        if path == "conv1":
            return "L0C1"
        m = self._CONV.match(path)
        if not m:
            return path
        stage, block = int(m.group(1)), int(m.group(2)) + 1
        return f"L{stage}B{block}C{m.group(3)}" if m.group(3) else f"L{stage}B{block}SC"

    def gate_label(self, path: str) -> str:
        m = re.match(r"^layer(\d+)\.(\d+)$", path)
        return f"L{m.group(1)}B{int(m.group(2)) + 1}" if m else path


class VGGAdapter(Adapter):
    """VGG family (timm ``vgg*``/``vgg*_bn``, ``torchvision:vgg*``)."""

    name = "vgg"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__.lower() == "vgg" and isinstance(getattr(model, "features", None), nn.Sequential)

    def filter_label(self, path: str) -> str:
        m = re.match(r"^features\.(\d+)$", path)
        if m:
            return f"L{m.group(1)}"
        m = re.match(r"^(?:classifier|pre_logits)\.(\w+?)(\d+)$", path)
        return f"FC{m.group(2)}" if m else path

    gate_label = filter_label

    def filter_sites(self, model, graph, classifier):
        """As generic, but timm's ``pre_logits`` convs (fully connected layers written as 7x7/1x1
        convs) count as linear units, so conv totals match torchvision's and the paper's layout."""
        sites = super().filter_sites(model, graph, classifier)
        return [dataclasses.replace(s, kind="linear") if s.name.startswith("pre_logits.") else s for s in sites]


class MobileNetAdapter(Adapter):
    """MobileNet/EfficientNet family (timm ``blocks.{s}.{b}`` or torchvision ``features.{i}``)."""

    name = "mobilenet"
    _TIMM = re.compile(r"^blocks\.(\d+)\.(\d+)(?:\.(.*))?$")
    _TV = re.compile(r"^features\.(\d+)(?:\.(.*))?$")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        name = type(model).__name__
        return name in {"MobileNetV2", "MobileNetV3", "EfficientNet", "MobileNetV1"}

    def filter_label(self, path: str) -> str:
        m = self._TIMM.match(path)
        if m:
            part = (m.group(3) or "").replace("conv_", "").replace(".", "").upper()
            return f"S{m.group(1)}B{int(m.group(2)) + 1}{part}"
        m = self._TV.match(path)
        if m:
            digits = re.findall(r"\d+", m.group(2) or "")
            return f"F{m.group(1)}C{digits[0] if digits else 0}"
        return {"conv_stem": "STEM", "conv_head": "HEAD"}.get(path, path)

    def gate_label(self, path: str) -> str:
        m = self._TIMM.match(path)
        if m and m.group(3) is None:
            return f"S{m.group(1)}B{int(m.group(2)) + 1}"
        m = self._TV.match(path)
        return f"F{m.group(1)}" if m and m.group(2) is None else path


class ViTAdapter(Adapter):
    """timm VisionTransformer/DeiT: blocks are gates, each block's output sequence is a token site."""

    name = "vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")

    def filter_label(self, path: str) -> str:
        m = re.match(r"^blocks\.(\d+)\.(.*)$", path)
        return f"B{int(m.group(1)) + 1}.{m.group(2)}" if m else path

    def gate_label(self, path: str) -> str:
        m = re.match(r"^blocks\.(\d+)$", path)
        return f"B{int(m.group(1)) + 1}" if m else path

    def token_sites(self, model: nn.Module, graph: ModelGraph) -> List[TokenSite]:
        sites = []
        for i, _ in enumerate(model.blocks):
            call = graph.calls.get(f"blocks.{i}")
            if call is not None and call.out_shape is not None and len(call.out_shape) == 3:
                sites.append(TokenSite(f"blocks.{i}", f"B{i + 1}", call.out_shape[1], int(model.num_prefix_tokens)))
        return sites
