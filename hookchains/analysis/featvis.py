"""Feature visualisation of a single filter by activation maximisation.

NeuroChains (section 4.3) shows, for every filter kept in a chain, the
pattern the filter looks for, "achieved by maximizing its activation w.r.t.
the input" (Erhan et al. 2009).  Plain pixel-space gradient ascent yields
high-frequency noise, so we follow the robust recipe of Olah et al. 2017,
"Feature Visualization" (Distill), as used by Lucid/Lucent:

* the image is parameterised in Fourier space with 1/f amplitude scaling, so
  every frequency is learned at a comparable rate (a whitened, natural-image
  like basis);
* colours live in a decorrelated space mapped to RGB by the square root of
  the ImageNet colour covariance, then squashed to [0, 1] with a sigmoid;
* every step sees a randomly padded, jittered, scaled and rotated copy, so
  only patterns robust to small transformations survive;
* Adam ascends the mean activation of the chosen channel, read by a forward
  hook that also stops the forward pass early (later layers are not needed).

Example::

    img = visualize_filter(model, "features.4", 17)     # (3, 128, 128) in [0, 1]
    cache = FeatureVisCache(Path("cache"), "mobilenet_v2", model=model)
    png = cache.get("features.4", 17, steps=32)          # PNG bytes, cached on disk
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from hookchains.core.io import PathLike, save_png
from hookchains.core.state import eval_mode, frozen_weights, get_module

__all__ = ["FLAT_STD", "FeatureVisCache", "featvis_failure", "visualize_filter", "visualize_filters"]

FLAT_STD = 0.02  # a visualisation whose pixels vary less than this (std, in [0, 1]) did not optimise

# Square root of the ImageNet RGB colour covariance (Lucid's "SVD sqrt"),
# scaled so its largest column has unit norm: maps decorrelated -> RGB.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR_MATRIX = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()

_INIT_STD = 0.01        # std of the random initial spectrum
_SPECTRUM_DIVISOR = 4.0  # keeps the initial pre-sigmoid image small (Lucid)
_PAD = 12               # constant grey padding, in pixels
_JITTERS = (8, 4)       # random crops before and after scale/rotation
_SCALES = tuple(1.0 + (i - 5) / 50.0 for i in range(11))  # 0.90 ... 1.10
_ANGLES = tuple(range(-10, 11)) + (0,) * 5                   # degrees, biased to 0


class _StopForward(Exception):
    """Raised by the hook once the target module has produced its output."""


class _SpectralImage:
    """A 1×3×S×S image in [0, 1] parameterised by a scaled Fourier spectrum.

    The learnable tensor holds real/imaginary parts of the rFFT of a
    decorrelated-colour image; each frequency is multiplied by 1/|f| (capped
    at the image size) so that low frequencies dominate, as in natural
    images (Olah et al. 2017, "Preconditioning and parameterization").
    """

    def __init__(self, size: int, generator: torch.Generator, device: torch.device, count: int = 1) -> None:
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        self.size = size
        self.scale = (1.0 / torch.sqrt(fx**2 + fy**2).clamp_min(1.0 / size)).to(device)
        init = torch.randn((1, 3, size, size // 2 + 1, 2), generator=generator) * _INIT_STD
        self.spectrum = init.repeat(count, 1, 1, 1, 1).to(device).requires_grad_(True)
        self.colors = _COLOR_MATRIX.to(device)

    def rgb(self) -> Tensor:
        """Decode spectrum -> decorrelated image -> RGB -> sigmoid, shape count×3×S×S."""
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")
        image = torch.einsum("ij,njhw->nihw", self.colors, image / _SPECTRUM_DIVISOR)
        return torch.sigmoid(image)


def _choice(options: Sequence[float], generator: torch.Generator) -> float:
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _jitter(image: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Random crop that removes ``shift`` pixels in total from each axis."""
    dy, dx = (int(v) for v in torch.randint(shift, (2,), generator=generator))
    height, width = image.shape[-2:]
    return image[..., dy : dy + height - shift, dx : dx + width - shift]


def _scale_rotate(image: Tensor, generator: torch.Generator) -> Tensor:
    """Random zoom in [0.9, 1.1] and rotation in [-10°, 10°], size preserved."""
    scale = _choice(_SCALES, generator)
    angle = math.radians(_choice(_ANGLES, generator))
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=image.dtype, device=image.device)
    theta = theta.expand(image.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _robust_view(image: Tensor, generator: torch.Generator) -> Tensor:
    """Lucid's standard transformation robustness: pad, jitter, scale+rotate, jitter."""
    image = F.pad(image, (_PAD,) * 4, mode="constant", value=0.5)
    image = _jitter(image, _JITTERS[0], generator)
    image = _scale_rotate(image, generator)
    return _jitter(image, _JITTERS[1], generator)


def _channel_activation(output: object, channel: int, module_path: str) -> Tensor:
    """Mean of ``channel`` in a conv (N×C×H×W), token (N×T×C) or linear (N×C) output, per image (N)."""
    if not isinstance(output, Tensor):
        raise TypeError(f"output of {module_path!r} is {type(output).__name__}, not a Tensor")
    if output.dim() not in (2, 3, 4):
        raise ValueError(
            f"output of {module_path!r} has shape {tuple(output.shape)}; "
            "expected N×C×H×W, N×T×C or N×C"
        )
    channel_dim = -1 if output.dim() == 3 else 1
    n_channels = output.shape[channel_dim]
    if not 0 <= channel < n_channels:
        raise ValueError(f"channel {channel} out of range: {module_path!r} has {n_channels} channels")
    return output.select(channel_dim, channel).reshape(output.shape[0], -1).mean(1)


@contextlib.contextmanager
def _truncated_forward(model: nn.Module, module_paths: Sequence[str]) -> Iterator[Callable[[Tensor], Dict[str, object]]]:
    """Yield ``run(x)`` that returns the outputs of the modules at ``module_paths`` (path -> output)
    and skips the layers after the last of them to run.

    Temporary forward hooks record the outputs and abort the forward once all are there; they are
    removed when the context exits, also on errors.
    """
    captured: Dict[str, object] = {}

    def make_hook(path: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            captured.setdefault(path, output)
            if len(captured) == len(paths):
                raise _StopForward
        return hook

    def run(x: Tensor) -> Dict[str, object]:
        captured.clear()
        try:
            model(x)
        except _StopForward:
            return dict(captured)
        missing = sorted(set(paths) - set(captured))
        raise ValueError(f"module {missing[0]!r} did not run during the forward pass")

    paths = sorted(set(module_paths))
    handles = [get_module(model, path).register_forward_hook(make_hook(path)) for path in paths]
    try:
        yield run
    finally:
        for handle in handles:
            handle.remove()


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _check_args(image_size: int, steps: int, lr: float, mean: Sequence[float], std: Sequence[float]) -> None:
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")


def visualize_filter(model: nn.Module, module_path: str, channel: int, **options: Any) -> Tensor:
    """Return the image (3×S×S, in [0, 1], on CPU) that maximises one filter.

    Activation maximisation (Erhan et al. 2009) with the robust recipe of
    Olah et al. 2017: FFT parameterisation with 1/f scaling, decorrelated
    colours, sigmoid, transformation robustness, Adam on the negative mean
    activation of ``channel`` in the output of ``module_path``.  ``options`` are
    :func:`visualize_filters`' (``image_size`` 128, ``steps`` 64, ``lr`` 0.05,
    ``seed`` 0, the model's input normalisation ``mean`` and ``std``, ``device``).
    The model is used in eval mode with all weights frozen; its training flags,
    ``requires_grad`` flags and hooks are restored afterwards.  Same seed, same
    result (on CPU).

    Example: ``img = visualize_filter(mobilenet, "features.4", 17, steps=32)``.
    """
    return visualize_filters(model, [(module_path, channel)], **options)[0]


def visualize_filters(
    model: nn.Module,
    filters: Sequence[Tuple[str, int]],
    *,
    image_size: int = 128,
    steps: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    device: Optional[Union[str, torch.device]] = None,
    bar: Optional[Callable[[Iterable[int]], Iterable[int]]] = None,
) -> Tensor:
    """:func:`visualize_filter` of each ``(module_path, channel)`` in ``filters``, all in one batch:
    K×3×S×S in [0, 1], on CPU, image ``k`` for ``filters[k]``.

    Each image is what :func:`visualize_filter` returns for its filter, up to float rounding: every
    filter starts from the same seeded image and sees the same random transformations, a model in eval
    mode treats the images of a batch independently, the loss is the sum of the filters' losses, and
    Adam's update is elementwise. The forward stops after the last of the filters' modules. One batch
    of K costs far less than K runs on a CPU: at the report's 64 px a single image leaves the cores idle.

    ``bar`` wraps the steps (e.g. a progress bar, :meth:`hookchains.core.progress.Progress.bar`).

    Raises:
        ValueError: a module that does not run in the forward pass, a channel out of range, a bad option.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
        >>> images = visualize_filters(net, [("0", 1), ("2", 0)], image_size=16, steps=3)
        >>> images.shape, torch.allclose(images[1], visualize_filter(net, "2", 0, image_size=16, steps=3), atol=1e-5)
        (torch.Size([2, 3, 16, 16]), True)
    """
    _check_args(image_size, steps, lr, mean, std)
    if not filters:
        raise ValueError("filters is empty: name at least one (module_path, channel)")
    device = torch.device(device) if device is not None else _model_device(model)
    generator = torch.Generator().manual_seed(seed)
    image = _SpectralImage(image_size, generator, device, count=len(filters))
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    optimizer = torch.optim.Adam([image.spectrum], lr=lr)
    with frozen_weights(model), eval_mode(model), torch.enable_grad(), \
            _truncated_forward(model, [path for path, _ in filters]) as forward:
        for _ in (bar or iter)(range(steps)):
            optimizer.zero_grad(set_to_none=True)
            outputs = forward((_robust_view(image.rgb(), generator) - mean_t) / std_t)
            activations = [_channel_activation(outputs[path], channel, path)[k]
                           for k, (path, channel) in enumerate(filters)]
            (-torch.stack(activations).sum()).backward()
            optimizer.step()
    return image.rgb().detach().cpu()


_VIS_DEFAULTS = {
    name: param.default
    for name, param in inspect.signature(visualize_filters).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("device", "bar")
}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


class FeatureVisCache:
    """On-disk PNG cache of :func:`visualize_filter` results.

    Entries are keyed by (model_key, module_path, channel, hash of the
    visualisation parameters with defaults filled in), so ``get(p, c)`` and
    ``get(p, c, steps=64)`` share one file.  Files are written atomically, so
    concurrent readers never see partial PNGs.  ``model`` is needed only to
    compute missing entries; without it the cache serves existing files.

    Example::

        cache = FeatureVisCache(Path("runs/featvis"), "mobilenet_v2", model=net)
        png = cache.get("features.4", 17, image_size=96)   # bytes
    """

    def __init__(self, root: PathLike, model_key: str, model: Optional[nn.Module] = None) -> None:
        self.root = Path(root)
        self.model_key = model_key
        self.model = model

    def path(self, module_path: str, channel: int, **params: object) -> Path:
        """Where the PNG for this filter and these parameters lives (may not exist)."""
        unknown = sorted(set(params) - set(_VIS_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown visualisation parameters {unknown}; allowed: {sorted(_VIS_DEFAULTS)}")
        key = [self.model_key, module_path, channel, {**_VIS_DEFAULTS, **params}]
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        name = f"{_slug(module_path)}_c{channel}_{digest}.png"
        return self.root / _slug(self.model_key) / name

    def get(self, module_path: str, channel: int, **params: object) -> bytes:
        """Return the PNG bytes, computing and storing them on a cache miss."""
        return self.get_many([(module_path, channel)], **params)[0]

    def get_many(self, filters: Sequence[Tuple[str, int]], bar: Optional[Callable[[Iterable[int]], Iterable[int]]] = None,
                 **params: object) -> List[bytes]:
        """:meth:`get` of each ``(module_path, channel)``; the missing ones computed in one batch
        (:func:`visualize_filters`, whose steps ``bar`` wraps)."""
        targets = [self.path(path, channel, **params) for path, channel in filters]
        missing = [f for f, target in zip(filters, targets) if not target.is_file()]
        if missing and self.model is None:
            raise LookupError(f"{self.path(*missing[0], **params)} is not cached and this cache has no model to "
                              "compute it")
        if missing:
            for picture, (path, channel) in zip(visualize_filters(self.model, missing, bar=bar, **params), missing):
                save_png(picture, self.path(path, channel, **params))
        return [target.read_bytes() for target in targets]


def featvis_failure(png: bytes, min_std: float = FLAT_STD) -> Optional[str]:
    """Why a feature visualisation (PNG bytes) shows nothing, or None when it looks optimised.

    A filter whose activation could not be raised within the budget leaves the image at its flat
    grey start; such a picture is not the filter's feature. The test: the standard deviation of all
    pixel values (RGB in [0, 1]) is below ``min_std``.

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="PNG")
        >>> featvis_failure(buffer.getvalue())
        'flat image (pixel std 0.000 < 0.02): the optimisation did not move it'
    """
    with Image.open(io.BytesIO(png)) as picture:
        pixels = torch.frombuffer(bytearray(picture.convert("RGB").tobytes()), dtype=torch.uint8).float() / 255
    std = float(pixels.std()) if pixels.numel() > 1 else 0.0
    if std < min_std:
        return f"flat image (pixel std {std:.3f} < {min_std:g}): the optimisation did not move it"
    return None
