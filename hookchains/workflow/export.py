"""Export the pruned module of a run folder in a format other tools load.

* ``safetensors`` (default, safe): ``pruned.safetensors`` (weights) next to ``model.json`` (base model
  reference + checkpoint sha256) and the sub-network files; :func:`hookchains.workflow.runs.load` rebuilds the
  module from them without unpickling anything.
* ``torchscript``: ``torch.jit.trace`` of the module (loads with ``torch.jit.load``, no Python pickle).
* ``onnx``: ``torch.onnx.export`` with a dynamic batch axis (input ``images``, output ``logits``, any
  batch size); needs the ``onnx`` package: ``pip install hookchains[onnx]`` (the extra also brings
  ``onnxruntime`` to run the file).
* ``pt``: a pickled whole module -- loading it (``torch.load`` without ``weights_only``) runs arbitrary code, so it is
  written only with ``unsafe_pickle=True`` and a warning.
"""
from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from hookchains.core.io import atomic_write_bytes, check_new_file
from hookchains.workflow.runs import load, load_run

__all__ = ["export_run", "check_onnx", "EXPORT_FORMATS"]

EXPORT_FORMATS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx", "pt": ".pickle.pt"}


def check_onnx() -> None:
    """Raise a one-line ``RuntimeError`` unless the ``onnx`` package (torch's ONNX exporter needs it) is
    installed; it comes with the ``onnx`` extra: ``pip install hookchains[onnx]``."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise RuntimeError("--format onnx needs the onnx package: pip install 'hookchains[onnx]' "
                           "(or pip install onnx)") from None


def export_run(run_dir, fmt: str = "safetensors", out: Optional[str] = None, *, unsafe_pickle: bool = False,
               checkpoint: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the pruned module of ``run_dir`` as ``fmt``; returns the file written.

    The default target inside the run folder is replaced freely; an ``out`` that exists elsewhere is
    written over only with ``overwrite`` (``FileExistsError`` otherwise).

    Example:
        >>> from hookchains.core.fit import preset_for
        >>> from hookchains.workflow.demo import demo_task
        >>> from hookchains.workflow.extract import extract
        >>> model, ref, task = demo_task(image_size=64, per_class=2)     # embedded MobileNetV2, 4 photos
        >>> quick = preset_for("mobilenet", steps=2, progress=False)     # a real run: the preset's steps
        >>> sub = extract(model, ref, task, "runs/demo", config=quick, graph_format=None, report=False)
        >>> export_run("runs/demo")
        PosixPath('runs/demo/pruned.safetensors')
        >>> export_run("runs/demo", "torchscript")      # doctest: +SKIP
        PosixPath('runs/demo/pruned.torchscript.pt')
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {sorted(EXPORT_FORMATS)}")
    if fmt == "onnx":
        check_onnx()
    if fmt == "pt" and not unsafe_pickle:
        raise ValueError("--format pt writes a pickled module that runs arbitrary code when loaded; "
                         "pass --unsafe-pickle to confirm, or use the safe default --format safetensors")
    run_dir = Path(run_dir)
    if load_run(run_dir).is_token_run:
        raise ValueError(f"{run_dir} is a token run (ViT): its module is the base model plus per-image token masks, "
                         "with no weights of its own to export; rebuild it with hookchains.load(RUN_DIR)")
    target = check_new_file(out, overwrite) if out else run_dir / f"pruned{EXPORT_FORMATS[fmt]}"
    module = load(run_dir, checkpoint)  # verifies every file and the rebuilt weights
    if fmt == "safetensors":
        if target.resolve() != (run_dir / "pruned.safetensors").resolve():
            shutil.copyfile(run_dir / "pruned.safetensors", target)
        return target
    example = load_run(run_dir).images[:1]
    buffer = io.BytesIO()
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(module, example), buffer)
    elif fmt == "onnx":
        torch.onnx.export(module, (example,), buffer, input_names=["images"], output_names=["logits"], dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    else:
        warnings.warn("writing a pickled module: only unpickle it if you trust "
                      "the file, since loading runs arbitrary code", stacklevel=2)
        torch.save(module, buffer)
    return atomic_write_bytes(target, buffer.getvalue())
