"""Create the model to study from a short spec string, and the image preprocessing it expects.

One string names a model wherever hookchains needs one (API, command line, saved results):

=============================  ==============================================================
``resnet50`` / ``timm:resnet50``  a timm model (``timm.create_model``)
``torchvision:resnet18``          a torchvision model (``torchvision.models.get_model``)
``hookchains:mobilenet_v2``       torchvision MobileNetV2 with the ImageNet weights shipped
                                  inside hookchains (works with no network)
``my_nets:build`` /               your own code: the module is imported (the working directory
``pkg.models:Net``                is searched too) and the factory is called
=============================  ==============================================================

Weights come from ``pretrained=True`` (the timm / torchvision hubs) or from ``checkpoint``, a
safetensors file or a torch file read with ``weights_only=True``: hookchains never unpickles
arbitrary objects. :class:`ModelRef` records what was built, so a saved result can rebuild the
same model later and notice when the checkpoint file has changed.

Example:
    >>> model, ref = create_model("hookchains:mobilenet_v2")
    >>> prep = preprocessing(model, image_size=160)
    >>> ref.spec, prep.input_size
    ('hookchains:mobilenet_v2', (160, 160))
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import json
import os
import pickle
import re
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import timm
import torch
import torchvision
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from torch import nn
from torchvision import transforms

from hookchains.assets import asset_path, sha256_file

__all__ = ["EMBEDDED_MODELS", "ModelRef", "Preprocess", "create_model", "load_checkpoint", "preprocessing",
           "hf_preprocessing_note"]

EMBEDDED_MODELS: Mapping[str, tuple[str, str]] = {"mobilenet_v2": ("mobilenet_v2", "mobilenet_v2-b0353104.pth")}
"""``hookchains:NAME`` -> (torchvision architecture, shipped weight file)."""

_TORCHVISION_DATA_CONFIG: Mapping[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": 0.875,
    "crop_mode": "center",
}
"""torchvision's ImageNet evaluation recipe (resize 256, centre crop 224, bilinear), used for models
without a timm ``pretrained_cfg``. timm's own default would be bicubic; the torchvision weights
were trained with bilinear resizing (shipped cat photo, Egyptian cat: 0.77 bilinear, 0.71 bicubic)."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """What :func:`create_model` built, as plain data, so a saved result can rebuild the same model.

    Attributes:
        spec: the model spec string, e.g. ``"timm:resnet50"``.
        pretrained: whether hub weights were requested.
        checkpoint: absolute path of the checkpoint file, or None.
        checkpoint_sha256: sha256 of that file when it was loaded, or None.
        num_classes: the classifier size asked for, or None for the model's default.

    Example:
        >>> ref = ModelRef("torchvision:resnet18", num_classes=3)
        >>> ModelRef.from_json(ref.to_json()) == ref
        True
    """

    spec: str
    pretrained: bool = False
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    num_classes: int | None = None

    def to_json(self) -> str:
        """Serialise to a JSON object string (keys sorted, so equal refs give equal text)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelRef:
        """Parse what :meth:`to_json` wrote; unknown or missing fields raise ``ValueError``."""
        data = json.loads(text)
        names = {field.name for field in dataclasses.fields(cls)}
        if not isinstance(data, dict) or "spec" not in data or not set(data) <= names:
            raise ValueError(f"not a hookchains ModelRef (expected a JSON object with keys {sorted(names)}): {text!r}")
        return cls(**data)

    @property
    def random_init(self) -> bool:
        """Whether the weights are random: a timm/torchvision model built without ``pretrained`` or a
        checkpoint (``module:factory`` and ``hookchains:`` models decide their own weights).

        Such a model's predictions mean nothing, so neither does a sub-network explaining them.

        Example:
            >>> ModelRef("torchvision:resnet18").random_init, ModelRef("resnet18", pretrained=True).random_init
            (True, False)
        """
        prefix, colon, _ = self.spec.partition(":")
        return (not self.pretrained and self.checkpoint is None
                and (not colon or prefix in ("timm", "torchvision")))

    def build(self, checkpoint: str | Path | None = None) -> nn.Module:
        """Rebuild the model; ``checkpoint`` relocates the weights file, whose sha256 must still match.

        Example:
            >>> model = ModelRef("hookchains:mobilenet_v2").build()
        """
        path = checkpoint if checkpoint is not None else self.checkpoint
        model, rebuilt = create_model(self.spec, self.pretrained, None if path is None else str(path), self.num_classes)
        if rebuilt.checkpoint_sha256 != self.checkpoint_sha256:
            raise ValueError(
                f"checkpoint {path} has sha256 {rebuilt.checkpoint_sha256}, but the saved result was made with "
                f"sha256 {self.checkpoint_sha256}: pass the checkpoint file the result was computed with"
            )
        return model


def create_model(
    spec: str, pretrained: bool = False, checkpoint: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, ModelRef]:
    """Build the model named by ``spec`` in eval mode and return it with its :class:`ModelRef`.

    ``pretrained`` asks the timm / torchvision hub for weights (or is passed as ``pretrained=True``
    to your factory); ``hookchains:`` models always carry their shipped weights. ``checkpoint`` is
    loaded last, so it overrides both. ``num_classes`` resizes the classifier (passed to your
    factory as ``num_classes=``). Unknown names raise ``ValueError`` with up to 5 close matches.

    Example:
        >>> model, ref = create_model("torchvision:resnet18", num_classes=2)
        >>> model(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 2])
    """
    if not spec or spec != spec.strip():
        raise ValueError(
            f"model spec {spec!r} is empty or has surrounding spaces: use e.g. 'resnet50' or 'hookchains:mobilenet_v2'"
        )
    model = _build(spec, pretrained, num_classes)
    digest = None
    if checkpoint is not None:
        digest = load_checkpoint(model, checkpoint)
        checkpoint = str(Path(checkpoint).resolve())
    model.eval()
    return model, ModelRef(spec, pretrained, checkpoint, digest, num_classes)


def _build(spec: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    """Dispatch on the spec's prefix (see the module docstring for the forms)."""
    prefix, colon, name = spec.partition(":")
    if not colon:
        return _timm_model(spec, spec, pretrained, num_classes)
    if not prefix or not name:
        raise ValueError(
            f"model spec {spec!r} needs a name on both sides of ':', e.g. 'timm:resnet50' or 'my_nets:build'"
        )
    if prefix == "timm":
        return _timm_model(spec, name, pretrained, num_classes)
    if prefix == "torchvision":
        return _torchvision_model(spec, name, pretrained, num_classes)
    if prefix == "hookchains":
        return _embedded_model(spec, name, num_classes)
    if prefix == "hf":
        raise ValueError(f"{spec}: a Hugging Face model cannot be rebuilt from its run folder yet (report, load); "
                         "extract writes its report, and in Python load it with transformers and wrap it in "
                         "hookchains.core.objectives.OutputLogits")
    return _factory_model(spec, prefix, name, pretrained, num_classes)


def _timm_model(spec: str, name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    """``timm.create_model``; a bare unknown name also gets torchvision / embedded suggestions."""
    if not timm.is_model(name):
        if spec.startswith("timm:"):
            candidates: Iterable[str] = (f"timm:{n}" for n in timm.list_models())
        else:
            candidates = [*(f"hookchains:{n}" for n in EMBEDDED_MODELS), *timm.list_models(), *_torchvision_specs()]
        raise ValueError(_unknown_model_message(spec, name, candidates))
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if pretrained:
        cached = _timm_weights_offline(spec, name)
        if cached is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": cached}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as err:
        raise _download_error(spec, err) from err


def _torchvision_model(spec: str, name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    """``torchvision.models.get_model`` with the architecture's default weights when ``pretrained``;
    otherwise no weights at all, backbone included (nothing is downloaded)."""
    if name not in torchvision.models.list_models():
        raise ValueError(_unknown_model_message(spec, name, _torchvision_specs()))
    kwargs: dict[str, Any] = {"weights": "DEFAULT" if pretrained else None}
    if not pretrained and "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None  # detection/segmentation/video builders default to ImageNet backbones
    default = getattr(torchvision.models.get_model_weights(name), "DEFAULT", None) if pretrained else None
    if default is not None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(default.url).path)
        if not cached.is_file():
            _require_network(spec, default.url)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return torchvision.models.get_model(name, **kwargs)
    except OSError as err:
        raise _download_error(spec, err) from err


def _embedded_model(spec: str, name: str, num_classes: int | None) -> nn.Module:
    """A torchvision architecture loaded ``strict=True`` with weights shipped in hookchains.assets."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(_unknown_model_message(spec, name, [f"hookchains:{n}" for n in EMBEDDED_MODELS]))
    if num_classes not in (None, 1000):
        raise ValueError(
            f"{spec} is a 1000-class ImageNet model; for num_classes={num_classes} use "
            f"'torchvision:{EMBEDDED_MODELS[name][0]}' with a checkpoint trained for your classes"
        )
    architecture, weight_file = EMBEDDED_MODELS[name]
    model = torchvision.models.get_model(architecture, weights=None)
    state = torch.load(asset_path(weight_file), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model


def _factory_model(spec: str, module_name: str, attribute: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    """Import ``module_name`` and call ``attribute`` (dots allowed, e.g. ``Net.small``)."""
    module = _import_user_module(spec, module_name)
    try:
        factory: Any = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attribute, public, n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"module {module_name!r} has no attribute {attribute!r} (model spec {spec!r}){hint}") from None
    kwargs: dict[str, Any] = {}
    if pretrained:
        kwargs["pretrained"] = True
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    _check_factory_accepts(spec, factory, kwargs)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_user_module(spec: str, module_name: str) -> ModuleType:
    """Import the user's module, also searching the working directory (console scripts omit it)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ValueError(  # the user's module itself imports something missing
                f"model spec {spec!r}: importing {module_name!r} failed because it imports {err.name!r}, "
                f"which is not installed: pip install the package that provides it") from None
        prefix = difflib.get_close_matches(module_name, ["timm", "torchvision", "hookchains"], n=1)
        hint = f" (did you mean '{prefix[0]}:{spec.partition(':')[2]}'?)" if prefix else ""
        raise ValueError(
            f"cannot import module {module_name!r} for model spec {spec!r}{hint}: run from the folder "
            "that contains it or add that folder to PYTHONPATH"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)


def _check_factory_accepts(spec: str, factory: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Fail before calling a factory that cannot take ``pretrained=`` / ``num_classes=``."""
    if not callable(factory):
        raise ValueError(f"{spec} names a {type(factory).__name__}, not a callable that builds a model")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return  # no introspectable signature (e.g. a C extension): let the call decide
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    missing = [key for key in kwargs if key not in parameters]
    if missing:
        raise ValueError(
            f"{spec} does not take {', '.join(f'{k}=' for k in missing)}: add the parameter to your factory "
            "or leave out the matching option (pretrained / num_classes)"
        )


def _torchvision_specs() -> list[str]:
    return [f"torchvision:{name}" for name in torchvision.models.list_models()]


def _unknown_model_message(spec: str, name: str, candidates: Iterable[str]) -> str:
    """One line: what is unknown, then up to 5 specs whose name part is closest to ``name``."""
    by_name: dict[str, list[str]] = {}
    for candidate in candidates:
        by_name.setdefault(candidate.rpartition(":")[2], []).append(candidate)
    close = [c for n in difflib.get_close_matches(name, list(by_name), n=5) for c in by_name[n]][:5]
    hint = f"close matches: {', '.join(close)}" if close else "no close matches"
    return (
        f"unknown model {spec!r}; {hint} (list names with timm.list_models() or "
        "torchvision.models.list_models(); use 'module:factory' for your own code)"
    )


def _require_network(spec: str, url: str, timeout: float = 3.0) -> None:
    """Raise at once, in one line, when the host of ``url`` cannot be reached (no network), instead of
    letting the hub client retry for about a minute. Behind a proxy (``HTTPS_PROXY`` ...) nothing is
    probed: only the hub client knows how to get through."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme in urllib.request.getproxies():
        return
    host, port = parts.hostname or url, parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise RuntimeError(
            f"the pretrained weights of {spec!r} are not in the local cache and {host} cannot be reached "
            f"(no network? {' '.join(str(err).split())[:80]}); pass --checkpoint FILE with the weights, run once "
            "with network to fill the cache, or use 'hookchains:mobilenet_v2' (shipped weights)"
        ) from None


def _timm_weights_offline(spec: str, name: str) -> str | None:
    """For a timm model whose weights live on the Hugging Face hub: ``None`` when the hub answers (timm
    then downloads or uses its cache as usual), the cached weight file when it does not (loaded without
    asking the hub), and a one-line ``RuntimeError`` when neither the hub nor a cached file is there."""
    import huggingface_hub

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id or huggingface_hub.constants.HF_HUB_OFFLINE:
        return None  # weights from a URL (torch.hub cache), or the user chose hub offline mode: timm decides
    try:
        _require_network(spec, huggingface_hub.constants.ENDPOINT)
        return None
    except RuntimeError:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return found
        raise


def _download_error(spec: str, err: OSError) -> RuntimeError:
    reason = " ".join(str(err).split())[:200]
    return RuntimeError(
        f"could not download pretrained weights for {spec!r} ({type(err).__name__}: {reason}); "
        "without hub access pass a checkpoint file with the weights, or use 'hookchains:mobilenet_v2' (shipped weights)"
    )


def load_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Load weights from ``path`` into ``model`` (all keys and shapes must match); return the file's sha256.

    Accepts a safetensors file, or a torch file holding a state_dict or a dict with a
    ``'state_dict'`` or ``'model'`` entry (``module.`` prefixes from DataParallel are removed).
    Torch files are read with ``weights_only=True``, so a checkpoint can never run code.

    Example:
        >>> model, _ = create_model("torchvision:resnet18")
        >>> torch.save(model.state_dict(), "r18.pt")  # doctest: +SKIP
        >>> digest = load_checkpoint(model, "r18.pt")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key} {tuple(state[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and state[key].shape != value.shape
    ]
    problems = [
        f"{len(items)} {label} ({_first_few(items)})"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
        if items
    ]
    if problems:
        raise ValueError(
            f"checkpoint {path} does not fit the model: {'; '.join(problems)}; was it saved from "
            "this architecture with the same num_classes?"
        )
    model.load_state_dict(state, strict=True)
    return sha256_file(path)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict from safetensors or a ``weights_only=True`` torch file, unwrapping common nests."""
    try:
        if path.suffix == ".safetensors":
            data: Any = load_safetensors(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:
            raise ValueError(f"checkpoint {path} is not a torch or safetensors file (it cannot be unpickled)") from None
        raise ValueError(
            f"checkpoint {path} holds pickled Python objects ({found.group(1)}), which hookchains does not load "
            "(weights_only=True): re-save it with torch.save(model.state_dict(), path) or as safetensors"
        ) from None
    except (RuntimeError, EOFError, SafetensorError) as err:
        reason = " ".join(str(err).split())[:120]
        raise ValueError(f"checkpoint {path} is not a torch or safetensors file ({reason})") from None
    if isinstance(data, dict):
        nested = next((data[k] for k in ("state_dict", "model") if isinstance(data.get(k), dict)), None)
        data = data if nested is None else nested
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(
            f"checkpoint {path} is not a state_dict: expected a dict of tensors, or a dict with a "
            "'state_dict' or 'model' entry holding one"
        )
    if all(key.startswith("module.") for key in data):
        data = {key[len("module.") :]: value for key, value in data.items()}
    return data


def _first_few(items: list[str], count: int = 3) -> str:
    return ", ".join(items[:count]) + (", ..." if len(items) > count else "")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grey, palette and RGBA images become 3-channel RGB (a module-level function, so it pickles)."""
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """A model's evaluation transform, split in two so the resized picture can be shown as well as fed.

    ``geometry`` maps any PIL image to an RGB PIL image at the model's resolution (resize + crop);
    ``normalize`` maps such an image to the float tensor (C, H, W) the model expects. Calling the
    object does both. ``config`` is the resolved timm data config (mean, std, input_size, ...).

    Example:
        >>> prep = preprocessing(create_model("hookchains:mobilenet_v2")[0])
        >>> prep(Image.new("RGB", (320, 200))).shape
        torch.Size([3, 224, 224])
    """

    geometry: Callable[[Image.Image], Image.Image]
    normalize: Callable[[Image.Image], torch.Tensor]
    config: Mapping[str, Any]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.geometry(image))

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the images the model receives."""
        return int(self.config["input_size"][1]), int(self.config["input_size"][2])


_HF_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
"""``resample`` of a saved Hugging Face image processor (PIL's codes) -> timm's interpolation name."""


def _hf_image_model(model: nn.Module) -> Any:
    """The transformers image model ``model`` wraps as ``model.model`` (an objective of
    :mod:`hookchains.core.objectives`), or ``None``."""
    inner = getattr(model, "model", None)
    return inner if getattr(inner, "main_input_name", None) == "pixel_values" else None


def _hf_processor_file(model: nn.Module) -> Path | None:
    inner = _hf_image_model(model)
    folder = str(getattr(getattr(inner, "config", None), "_name_or_path", "") or "")
    path = Path(folder) / "preprocessor_config.json"
    return path if folder and path.is_file() else None


def _hf_data_config(model: nn.Module) -> dict[str, Any]:
    """timm data config of a Hugging Face image classifier: its config's ``image_size``, resized to it
    without keeping the aspect ratio (as ``ViTImageProcessor``); mean/std and resampling from the
    ``preprocessor_config.json`` saved beside the weights, else ``ViTImageProcessor``'s defaults
    (mean = std = 0.5, bilinear). A processor that crops (DeiT) is followed as timm crops: the shorter
    side resized to ``size / crop_pct``, then the centre ``crop_size``."""
    size = int(getattr(_hf_image_model(model).config, "image_size", 224))
    config: dict[str, Any] = {"input_size": (3, size, size), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                              "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "squash"}
    path = _hf_processor_file(model)
    saved = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    if saved.get("do_normalize", True):
        config.update(mean=tuple(saved.get("image_mean", config["mean"])), std=tuple(saved.get("image_std", config["std"])))
    else:
        config.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    config["interpolation"] = _HF_PIL_RESAMPLE.get(saved.get("resample", 2), "bilinear")
    crop, resize = saved.get("crop_size") or {}, saved.get("size") or {}
    if saved.get("do_center_crop") and crop.get("height") and (resize.get("height") or resize.get("shortest_edge")):
        config.update(crop_mode="center", crop_pct=crop["height"] / (resize.get("height") or resize["shortest_edge"]))
    return config


def hf_preprocessing_note(model: nn.Module) -> str | None:
    """One line for the user when ``model`` is a Hugging Face image classifier saved without its image
    processor (so :func:`preprocessing` normalises with ``ViTImageProcessor``'s defaults), else ``None``."""
    if _hf_image_model(model) is None or _hf_processor_file(model) is not None:
        return None
    return ("note: no preprocessor_config.json beside the model: images are normalised with mean = std = 0.5 "
            "(ViTImageProcessor's defaults); save the model's processor there (processor.save_pretrained(PATH)) "
            "to use its own")


def preprocessing(model: nn.Module, image_size: int | None = None) -> Preprocess:
    """Return the evaluation preprocessing for ``model``: PIL image -> normalised float tensor (C, H, W).

    timm models use their own data config (``timm.data.resolve_data_config``); a Hugging Face image
    classifier in an objective wrapper (``model.model``, e.g. ``OutputLogits``) its config's image size
    and its saved image processor's mean/std (:func:`hf_preprocessing_note` says when there is none);
    other models get torchvision's ImageNet recipe (mean/std, 224 px, crop 0.875, bilinear).
    ``image_size`` replaces the resolution (the crop fraction is kept), e.g. 160 for faster fits on CPU.

    Example:
        >>> model, _ = create_model("resnet18")
        >>> preprocessing(model, image_size=160).input_size
        (160, 160)
    """
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        config = dict(resolve_data_config({}, model=model))
    elif _hf_image_model(model) is not None:
        config = _hf_data_config(model)
    else:
        config = dict(_TORCHVISION_DATA_CONFIG)
    if image_size is not None:
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        config["input_size"] = (config["input_size"][0], image_size, image_size)
    steps = list(create_transform(**config).transforms)
    split = next((i for i, step in enumerate(steps) if type(step).__name__ in ("ToTensor", "MaybeToTensor")), None)
    if split is None:
        raise RuntimeError(f"unexpected timm evaluation transform (no ToTensor step): {steps}")
    return Preprocess(transforms.Compose([_to_rgb, *steps[:split]]), transforms.Compose(steps[split:]), config)
