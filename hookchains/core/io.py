"""Atomic, pickle-free persistence: JSON, safetensors and PNG written via a temporary file + rename,
so an interrupted run never leaves a half-written file behind."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save
from torch import Tensor

__all__ = ["check_new_file", "atomic_write_bytes", "write_json", "read_json", "write_tensors", "read_tensors",
           "to_png_bytes", "save_png"]

PathLike = Union[str, os.PathLike]
_UMASK = os.umask(0)
os.umask(_UMASK)


def check_new_file(path: PathLike, overwrite: bool, option: str = "--out") -> Path:
    """Refuse to write ``path`` over an existing file unless ``overwrite`` (or over a folder at all).

    Raises:
        FileExistsError: ``path`` is a folder, or an existing file and ``overwrite`` is false.

    Example:
        >>> import tempfile
        >>> check_new_file(tempfile.mkstemp()[1], overwrite=False)
        Traceback (most recent call last):
        ...
        FileExistsError: ... already exists; choose another --out or pass --overwrite to replace it
    """
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"{path} is a folder; give a file name to {option}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another {option} or pass --overwrite to replace it")
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: PathLike, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: PathLike) -> Any:
    """Read JSON, naming the file in the error when it is truncated or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): "
                         "the file is truncated or was edited; re-create it") from None


def write_tensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Atomically write tensors as safetensors (contiguous CPU copies)."""
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(data, metadata=metadata))


def read_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a safetensors file, naming the file when it is truncated or corrupt."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several error types for bad files
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): "
                         "the file is truncated or corrupt; re-create it") from None


def to_png_bytes(img: Tensor) -> bytes:
    """Encode a (3, H, W) float image in [0, 1] as PNG bytes (values clamped).

    PNG is lossless and its encoding deterministic, so equal images give
    equal bytes.  Example: ``data = to_png_bytes(overlay)``.
    """
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"img must have shape (3, H, W), got {tuple(img.shape)}")
    pixels = (img.detach().float().cpu().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy())).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(img: Tensor, path: PathLike) -> Path:
    """Write ``img`` as a PNG at ``path`` atomically and return the path.

    The bytes go to a temporary sibling file that then replaces ``path``
    (:func:`atomic_write_bytes`, i.e. ``os.replace``), so
    readers never see a half-written image.  Parent directories are created.

    Example: ``save_png(overlay, "report/img/features.4_17.png")``.
    """
    return atomic_write_bytes(path, to_png_bytes(img))
