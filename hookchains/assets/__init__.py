"""The files hookchains ships so its demo runs with no network: real MobileNetV2 weights and photos.

Every file is listed in ``manifest.json`` with its sha256; :func:`asset_path` checks the file
against that digest before handing out its path, so a truncated download or an edited copy is
caught where it is loaded instead of surfacing later as strange model outputs. Where each file
comes from and under which licence is written in ``LICENSES.md`` next to this module.

Example:
    >>> from hookchains.assets import asset_path, demo_photos
    >>> asset_path("mobilenet_v2-b0353104.pth").name
    'mobilenet_v2-b0353104.pth'
    >>> list(demo_photos())[:2]
    ['Egyptian cat', 'espresso']
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["ASSETS_DIR", "AssetIntegrityError", "asset_path", "demo_photos", "manifest", "sha256_file"]

ASSETS_DIR = Path(__file__).resolve().parent
"""Folder of the shipped assets (inside the installed package)."""

_MANIFEST_NAME = "manifest.json"

# (resolved path, size, mtime_ns) of files whose digest already matched: a file is hashed once per
# process, and again only if it changes on disk.
_verified: set[tuple[str, int, int]] = set()


class AssetIntegrityError(RuntimeError):
    """A shipped asset's sha256 differs from the digest recorded in ``manifest.json``."""


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks so large checkpoints need little memory.

    Example:
        >>> len(sha256_file(asset_path("chelsea.png")))
        64
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def manifest() -> dict[str, Any]:
    """Return the parsed ``manifest.json``: ``files`` (name -> sha256) and ``photos`` (name -> details).

    Example:
        >>> manifest()["photos"]["coffee.png"]["imagenet_index"]
        967
    """
    return json.loads((ASSETS_DIR / _MANIFEST_NAME).read_text(encoding="utf-8"))


def asset_path(name: str, directory: str | Path | None = None) -> Path:
    """Return the path of the shipped asset ``name`` after checking its sha256 against the manifest.

    ``directory`` checks a copy of the assets elsewhere (for instance a vendored or tampered copy)
    against the same manifest; by default the package's own folder is used.

    Raises:
        ValueError: ``name`` is not in the manifest.
        FileNotFoundError: the file is missing from the installed package.
        AssetIntegrityError: the file's sha256 differs from the manifest.

    Example:
        >>> asset_path("coffee.png").suffix
        '.png'
    """
    expected = manifest()["files"].get(name)
    if expected is None:
        known = ", ".join(sorted(manifest()["files"]))
        raise ValueError(f"unknown hookchains asset {name!r}; shipped assets: {known}")
    path = (Path(directory) if directory is not None else ASSETS_DIR).resolve() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"hookchains asset {name!r} is missing at {path}: reinstall hookchains "
            "(pip install --force-reinstall hookchains)"
        )
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        actual = sha256_file(path)
        if actual != expected:
            raise AssetIntegrityError(
                f"hookchains asset {path} has sha256 {actual}, expected {expected}: the file is "
                "corrupt or was modified; reinstall hookchains (pip install --force-reinstall hookchains)"
            )
        _verified.add(key)
    return path


def demo_photos(directory: str | Path | None = None) -> dict[str, list[Path]]:
    """Return the shipped photos grouped by class name, each path verified by :func:`asset_path`.

    Classes keep the manifest's order, which puts the two clean demo classes first ('Egyptian cat'
    and 'espresso', on which MobileNetV2 is confident); the others are extra classes whose teacher
    confidence is lower (see ``mobilenet_v2_top1`` in the manifest).

    Example:
        >>> list(demo_photos())[:2]
        ['Egyptian cat', 'espresso']
    """
    by_class: dict[str, list[Path]] = {}
    for name, details in manifest()["photos"].items():
        by_class.setdefault(details["class"], []).append(asset_path(name, directory))
    return by_class
