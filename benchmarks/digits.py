"""A real, offline dataset and model for the sweep study: scikit-learn's handwritten digits and a small CNN.

The paper's quantitative analyses (section 4.2, Fig. 1-3, 11, 12) run NeuroChains on hundreds of
2-class tasks of a network trained on real data. No machine here reaches ImageNet or a model hub, so
this script makes the smallest honest stand-in that fits in a minute of CPU:

* the images: ``per_class`` digits per class from scikit-learn's bundled ``load_digits`` (1797 8x8
  greyscale digits, 10 classes), written as PNG files ``DIR/images/<digit>/<row>.png`` -- the sweep
  draws every task's fitting and held-out images from them;
* the model: :class:`DigitsCNN`, a miniature VGG/ResNet (304 conv filters, two max-pools, one
  residual block) trained on *every other* digit, fed through the same path as the sweep (PIL
  image -> ``hookchains.inputs.models.preprocessing(model)``), so it never sees the sweep's images;
* the checkpoint ``DIR/digits_cnn.safetensors``, loaded by ``--model benchmarks.digits:build``.

Run from the repository root (the model spec imports ``benchmarks.digits`` from the working
directory)::

    python benchmarks/digits.py --out /tmp/digits
    hookchains sweep --model benchmarks.digits:build --checkpoint /tmp/digits/digits_cnn.safetensors \\
        --data /tmp/digits/images --tasks 45 --classes-per-task 2 --per-class 10 --out /tmp/digits/sweep
"""
from __future__ import annotations

import argparse
import functools
import io
import random
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from hookchains.core.io import atomic_write_bytes, write_tensors
from hookchains.inputs.models import preprocessing

__all__ = ["DigitsCNN", "build", "digit_image", "write_images", "train"]

PIXEL_MEAN, PIXEL_STD = 0.31, 0.38
"""Mean and standard deviation of the digits' pixels scaled to [0, 1] (value / 16 over all 1797)."""


def _conv(cin: int, cout: int) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """3x3 conv (no bias: BatchNorm follows), BatchNorm, ReLU -- one VGG layer."""
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()


class ResidualBlock(nn.Module):
    """Two conv-BN layers with an identity shortcut (a ResNet basic block): shape-preserving, so
    NeuroChains can gate it as a whole (paper Eq. 6-7: a gate per block of a ResNet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class DigitsCNN(nn.Module):
    """A miniature VGG/ResNet for 3x32x32 digits: 6 conv layers, 304 filters, 2 gateable parts.

    ``features``: conv 3->16 and 16->32 at 32 px, max-pool, conv 32->64 and 64->64 at 16 px (the
    second is a shape-preserving layer: a VGG-style layer gate), max-pool, a residual block of two
    64->64 convs at 8 px (a ResNet-style block gate); then global average pooling and a linear
    classifier ``fc``.

    Example:
        >>> DigitsCNN()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv(3, 16), *_conv(16, 32), nn.MaxPool2d(2),
            *_conv(32, 64), *_conv(64, 64), nn.MaxPool2d(2),
            ResidualBlock(64))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def build(num_classes: int = 10) -> DigitsCNN:
    """The model factory of the spec ``benchmarks.digits:build``: a :class:`DigitsCNN` in eval mode
    with a timm-style ``pretrained_cfg``, so ``hookchains.inputs.models.preprocessing(model)`` (timm's
    ``resolve_data_config``) resizes the 8x8 PNGs to 32x32 (bilinear, no crop) and normalises them
    with the digits' own pixel statistics.

    Example:
        >>> preprocessing(build()).input_size
        (32, 32)
    """
    model = DigitsCNN(num_classes)
    model.pretrained_cfg = {
        "input_size": (3, 32, 32), "mean": (PIXEL_MEAN,) * 3, "std": (PIXEL_STD,) * 3, "crop_pct": 1.0,
        "interpolation": "bilinear", "crop_mode": "center", "num_classes": num_classes,
        "classifier": "fc", "first_conv": "features.0"}
    return model.eval()


@functools.lru_cache(maxsize=1)
def _digits() -> Tuple[np.ndarray, np.ndarray]:
    """(images 1797x8x8 with values 0..16, labels) of scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits  # only the data needs scikit-learn, not the model factory
    data = load_digits()
    return data.images, data.target


def digit_image(index: int) -> Image.Image:
    """Row ``index`` of ``load_digits`` as an 8x8 8-bit greyscale picture (pixel = round(value * 255 / 16)).

    Training and the written PNGs both use this, so the model sees exactly the sweep's pixels.

    Example:
        >>> digit_image(0).size, digit_image(0).mode
        ((8, 8), 'L')
    """
    pixels = np.rint(_digits()[0][index] * 255 / 16).astype(np.uint8)
    return Image.fromarray(pixels)  # 2-D uint8: mode "L"


def write_images(out_dir: str | Path, per_class: int = 40, seed: int = 0) -> Set[int]:
    """Write ``per_class`` seeded-random digits of each class as ``out_dir/<digit>/<row>.png``.

    These are the sweep's images (fitting and held-out): :func:`train` must leave them out. A folder
    holding other PNGs (say from another seed) is refused, since the sweep would read them too and
    the model may have trained on them. Returns the rows of ``load_digits`` written.

    Example:
        >>> used = write_images("/tmp/digits/images", per_class=40)  # doctest: +SKIP
        >>> len(used)  # doctest: +SKIP
        400
    """
    out_dir, labels, rng = Path(out_dir), _digits()[1], random.Random(seed)
    files = {out_dir / str(digit) / f"{row}.png": row
             for digit in sorted(set(labels.tolist()))
             for row in sorted(rng.sample(np.flatnonzero(labels == digit).tolist(), per_class))}
    stale = sorted(set(out_dir.rglob("*.png")) - set(files)) if out_dir.is_dir() else []
    if stale:
        raise ValueError(f"{out_dir} already holds {len(stale)} other PNG files (e.g. {stale[0]}): "
                         "write the images to an empty folder")
    for path, row in files.items():
        buffer = io.BytesIO()
        digit_image(row).save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
    return set(files.values())


def _batch(model: nn.Module, rows: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """The digits at ``rows`` through the sweep's path (PIL image -> ``preprocessing(model)``) and their labels."""
    prep = preprocessing(model)
    images = torch.stack([prep(digit_image(row)) for row in rows])
    return images, torch.as_tensor(_digits()[1][list(rows)], dtype=torch.int64)


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    model.eval()
    return float((model(images).argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def train(model: DigitsCNN, train_rows: Sequence[int], held_rows: Sequence[int] = (), *, epochs: int = 8,
          seed: int = 0, batch_size: int = 32, lr: float = 3e-3,
          log: Optional[Callable[[str], None]] = print) -> Dict[str, float]:
    """Train ``model`` on the digits at ``train_rows`` (Adam, cross-entropy, one-cycle learning rate);
    return and log the accuracy on them and on ``held_rows`` (the sweep's images, never trained on).

    Deterministic given ``seed`` (and the model's initial weights); torch's global RNG is left as it
    was. Images go through the sweep's own preprocessing, so the accuracies are those the sweep sees.

    Example:
        >>> held = write_images("/tmp/digits/images")  # doctest: +SKIP
        >>> model = build()
        >>> train(model, [r for r in range(1797) if r not in held], sorted(held))  # doctest: +SKIP
        {'train': 0.99..., 'held': 0.98...}
    """
    x, y = _batch(model, train_rows)
    steps = epochs * -(-len(y) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(y), generator=order).split(batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / len(y):.4f}")
    result = {"train": _accuracy(model, x, y),
              "held": _accuracy(model, *_batch(model, held_rows)) if len(held_rows) else float("nan")}
    if log:
        log(f"accuracy: train {result['train']:.4f} ({len(y)} digits), held {result['held']:.4f} "
            f"({len(held_rows)} digits, the sweep's images)")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Write the images and the trained checkpoint, then print the sweep command to run next."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for images/ and digits_cnn.safetensors")
    parser.add_argument("--per-class", type=int, default=40, help="sweep images per class (not trained on)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    held = write_images(args.out / "images", args.per_class, args.seed)
    torch.manual_seed(args.seed)
    model = build()
    train(model, [r for r in range(len(_digits()[1])) if r not in held], sorted(held), epochs=args.epochs,
          seed=args.seed)
    checkpoint = write_tensors(args.out / "digits_cnn.safetensors", model.state_dict())
    print(f"wrote {len(held)} images to {args.out / 'images'} and {checkpoint} in {time.perf_counter() - start:.0f} s")
    print("next, from the repository root:\n"
          f"hookchains sweep --model benchmarks.digits:build --checkpoint {checkpoint} --data {args.out / 'images'} "
          f"--tasks 45 --classes-per-task 2 --per-class 10 --out {args.out / 'sweep'}")


if __name__ == "__main__":
    main()
