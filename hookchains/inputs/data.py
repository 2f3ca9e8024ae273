"""The small image sets a sub-network is extracted for: loaded from a folder, or augmented from a few photos.

NeuroChains studies a model on a tiny task (the paper: 2 classes, 10 images each). Both loaders return
an :class:`ImageSet` holding the normalised batch the model is fed *and* the same pictures at the
model's resolution for drawing, so a rendered chain always shows exactly what the model saw.
Every choice of images is deterministic given ``seed``.

Example:
    >>> from hookchains.assets import demo_photos
    >>> from hookchains.inputs.models import create_model, preprocessing
    >>> model, _ = create_model("hookchains:mobilenet_v2")
    >>> photos = {k: v for k, v in demo_photos().items() if k in ("Egyptian cat", "espresso")}
    >>> views = augmented_views(photos, per_class=10, transform=preprocessing(model, 160))
    >>> views.images.shape
    torch.Size([20, 3, 160, 160])
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from hookchains.inputs.models import Preprocess

__all__ = ["IMAGE_EXTENSIONS", "ImageSet", "augmented_views", "class_folders", "count", "load_image_folder",
           "validate_images"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
"""File suffixes read as images (compared case-insensitively)."""


def _not_images(ndim: int) -> str:
    """What a batch of ``ndim`` dims is, if not images, and what to do (for :func:`validate_images`)."""
    other = {3: "1-D signals (N, C, L)", 5: "volumes or video (N, C, D, H, W)"}.get(ndim)
    one = "add a batch dimension with x.unsqueeze(0) if it is one image" if ndim == 3 else ""
    if other is None:
        return one or "pass a batch of images"
    return (f"{one + '; ' if one else ''}{other} have no pictures to draw, so image sets, reports and heatmaps "
            "do not take them: use attach, fit, materialize and extract_chains directly")


def validate_images(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a non-empty, finite, floating-point (N, C, H, W) batch.

    Checked at the API boundary so a wrong input fails with a sentence instead of deep inside
    a hooked forward pass.

    Example:
        >>> validate_images(torch.zeros(2, 3, 224, 224))
        >>> validate_images(torch.zeros(3, 224, 224))
        Traceback (most recent call last):
        ValueError: images must be a batch of shape (N, C, H, W), got shape (3, 224, 224): add a batch ...
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"images must be a batch of shape (N, C, H, W), got shape {tuple(x.shape)}: {_not_images(x.ndim)}")
    if x.numel() == 0:
        raise ValueError(f"images is an empty batch (shape {tuple(x.shape)}): pass at least one image")
    if not x.is_floating_point():
        raise ValueError(
            f"images must be floating point, got {x.dtype}: normalise them as the model expects "
            "(hookchains.inputs.models.preprocessing does this)"
        )
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"images contain {bad} NaN or infinite values")


@dataclasses.dataclass
class ImageSet:
    """A labelled batch of images, ready for the model and for drawing.

    Attributes:
        images: float32 tensor (N, 3, H, W), normalised for the model.
        labels: int64 tensor N, an index into ``class_names``.
        class_names: the class of each label index.
        paths: the file each image came from (repeated for augmented views of one photo).
        raw: the same N pictures as RGB PIL images at the model's resolution, not normalised.
        skipped: unreadable files left out because ``skip_bad_images`` was set, each as
            ``"path (reason)"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    paths: list[str]
    raw: list[Image.Image]
    skipped: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        validate_images(self.images)
        count = self.images.shape[0]
        if self.labels.shape != (count,) or len(self.paths) != count or len(self.raw) != count:
            raise ValueError(
                f"ImageSet parts disagree: {count} images, labels of shape {tuple(self.labels.shape)}, "
                f"{len(self.paths)} paths, {len(self.raw)} raw pictures"
            )
        if count and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.class_names):
            raise ValueError(f"labels must index class_names (0..{len(self.class_names) - 1})")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_image_folder(
    root: str | Path,
    classes: Sequence[str] | None,
    per_class: int,
    transform: Preprocess,
    *,
    seed: int = 0,
    skip_bad_images: bool = False,
) -> ImageSet:
    """Load ``per_class`` images of each class from an ImageFolder tree (one sub-folder per class).

    Images are chosen by a seeded shuffle of the sorted listing (``IMAGE_EXTENSIONS``, searched
    recursively), per class, so the same seed always picks the same files and adding a class does
    not change another's picks. ``classes=None`` takes every sub-folder, sorted; otherwise labels
    follow the order given. Each error is a one-line ``ValueError`` that names the fix; an unreadable
    file is replaced by the next one in seeded order, and unless ``skip_bad_images`` every unreadable
    file met is named in the error (with it, they are listed in ``ImageSet.skipped``).

    Example:
        >>> from hookchains.inputs.models import create_model, preprocessing
        >>> prep = preprocessing(create_model("hookchains:mobilenet_v2")[0], image_size=160)
        >>> data = load_image_folder("photos", ["cat", "dog"], per_class=10, transform=prep)  # doctest: +SKIP
        >>> data.images.shape, data.class_names  # doctest: +SKIP
        (torch.Size([20, 3, 160, 160]), ['cat', 'dog'])
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    root = Path(root)
    class_names = class_folders(root, classes)
    bad: list[str] = []
    images, raw, labels, paths, short = [], [], [], [], []
    for label, name in enumerate(class_names):
        unreadable = len(bad)
        picked = _pick_images(root / name, per_class, seed, bad)
        if len(picked) < per_class:
            short.append((root / name, len(picked), len(bad) - unreadable))
        for path, picture in picked:
            view = transform.geometry(picture)
            raw.append(view)
            images.append(transform.normalize(view))
            labels.append(label)
            paths.append(str(path))
    if bad and not skip_bad_images:
        them = "it" if len(bad) == 1 else "them"
        raise ValueError(f"cannot read {count(len(bad), 'image')}: {'; '.join(bad)}: fix or remove {them}, or pass "
                         f"--skip-bad-images (skip_bad_images=True) to leave {them} out")
    if short:
        folder, found, unreadable = short[0]
        raise ValueError(f"class folder {folder} has {count(found, 'readable image')} ({unreadable} unreadable "
                         f"skipped), fewer than the {per_class} asked for: add images or ask for fewer per class")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), class_names, paths, raw, bad)


def count(number: int, noun: str) -> str:
    """``number`` and ``noun``, plural (``-s``, or ``-es`` after s, x, ch, sh) unless the number is 1.

    Example:
        >>> count(1, "image"), count(3, "image"), count(0, "class")
        ('1 image', '3 images', '0 classes')
    """
    if number == 1:
        return f"1 {noun}"
    return f"{number} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


def class_folders(root: str | Path, classes: Sequence[str] | None = None) -> list[str]:
    """The class sub-folders of ``root`` to read: all of them (sorted) or the requested ones, checked
    to exist (an unknown name gets close matches and the classes found)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"image folder {root} does not exist or is not a folder: pass a folder with one sub-folder "
            f"of images per class, e.g. {root / 'cat'}/*.jpg"
        )
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise ValueError(
            f"{root} has no class sub-folders: put each class's images in its own sub-folder, e.g. {root / 'cat'}/*.jpg"
        )
    if classes is None:
        return found
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be a non-empty list without repeats, got {list(classes)}")
    listing = ", ".join(found[:10]) + (f", ... ({len(found)} in all)" if len(found) > 10 else "")
    for name in classes:
        if name not in found:
            close = difflib.get_close_matches(name, found, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"class {name!r} not found in {root}{hint}; classes found: {listing}")
    return list(classes)


def _pick_images(folder: Path, per_class: int, seed: int, bad: list[str]) -> list[tuple[Path, Image.Image]]:
    """Read up to ``per_class`` readable images of one class folder in seeded order (listing order on
    return); each unreadable file read on the way is added to ``bad`` as ``"path (reason)"``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < per_class:
        raise ValueError(
            f"class folder {folder} has {count(len(files), 'image')}, fewer than the {per_class} asked for: "
            "add images or ask for fewer per class"
        )
    rank = {path: i for i, path in enumerate(files)}
    picked: list[tuple[Path, Image.Image]] = []
    for path in random.Random(_derived_seed(seed, folder.name)).sample(files, len(files)):
        if len(picked) == per_class:
            break
        try:
            picked.append((path, _read_image(path)))
        except ValueError as err:
            bad.append(f"{path} ({err})")
    return sorted(picked, key=lambda item: rank[item[0]])


def _read_image(path: Path) -> Image.Image:
    """Decode ``path`` fully as RGB; ``ValueError`` with the decoder's reason when it cannot."""
    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(" ".join(str(err).split())) from None


def _read_photo(path: Path) -> Image.Image:
    """A photo the views are made from: unreadable is a one-line ``ValueError`` naming it."""
    try:
        return _read_image(path)
    except ValueError as err:
        raise ValueError(f"cannot read image {path} ({err}): fix or replace it") from None


def _derived_seed(seed: int, name: str) -> int:
    """A 64-bit seed for one class, stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def augmented_views(
    photo_paths_by_class: Mapping[str, Sequence[str | Path]],
    per_class: int,
    transform: Preprocess,
    image_size: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """Make ``per_class`` deterministic augmented views per class from a few photos each.

    Each view is a random resized crop (0.5 to 1 of the photo's area), a coin-flip horizontal mirror
    and a slight colour jitter (±10 % brightness, contrast, saturation) of one photo, cycling
    through the class's photos. With one photo per class the views are augmentations of that one
    photo, not independent images: enough for the demo and tests, but a weaker test of what a
    sub-network generalises to than real images. ``image_size`` defaults to the transform's
    resolution. Each class draws from its own seed, and torch's global RNG is left untouched.

    Example:
        >>> from hookchains.assets import demo_photos
        >>> from hookchains.inputs.models import create_model, preprocessing
        >>> prep = preprocessing(create_model("hookchains:mobilenet_v2")[0])
        >>> cat = {"Egyptian cat": demo_photos()["Egyptian cat"]}
        >>> augmented_views(cat, per_class=4, transform=prep, image_size=128).images.shape
        torch.Size([4, 3, 128, 128])
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    size = (image_size, image_size) if image_size is not None else transform.input_size
    interpolation = InterpolationMode(transform.config["interpolation"])
    augment = transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
        ]
    )
    images, raw, labels, paths = [], [], [], []
    with torch.random.fork_rng(devices=[]):
        for label, (name, class_paths) in enumerate(photo_paths_by_class.items()):
            if not class_paths:
                raise ValueError(f"class {name!r} has no photos to make views from")
            photos = [_read_photo(Path(p)) for p in class_paths]
            torch.manual_seed(_derived_seed(seed, name))
            for i in range(per_class):
                view = augment(photos[i % len(photos)])
                raw.append(view)
                images.append(transform.normalize(view))
                labels.append(label)
                paths.append(str(class_paths[i % len(photos)]))
    labels_tensor = torch.tensor(labels, dtype=torch.int64)
    return ImageSet(torch.stack(images), labels_tensor, list(photo_paths_by_class), paths, raw)
