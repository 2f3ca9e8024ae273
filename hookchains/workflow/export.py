"""Export the pruned module of a run folder in a format other tools load.

* ``safetensors`` (default, safe): ``pruned.safetensors`` (weights) next to ``model.json`` (base model
  reference + checkpoint sha256) and the sub-network files; :func:`hookchains.workflow.runs.load` rebuilds the
  module from them without unpickling anything.
* ``torchscript``: ``torch.jit.trace`` of the module (loads with ``torch.jit.load``, no Python pickle);
  a dict/tuple/list output keeps its structure (the model's own, fixed for every input).
* ``onnx``: ``torch.onnx.export`` with a dynamic batch axis (input ``images``, output ``logits`` -- or one
  output per key/item of a dict/tuple/list output, :func:`onnx_output_names` -- any batch size); needs the ``onnx`` package: ``pip install hookchains[onnx]`` (the extra also brings
  ``onnxruntime`` to run the file).
* ``pt``: a pickled whole module -- loading it (``torch.load`` without ``weights_only``) runs arbitrary code, so it is
  written only with ``unsafe_pickle=True`` and a warning.
"""
from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path
from typing import List, Optional

import torch

from hookchains.core.io import atomic_write_bytes, check_new_file
from hookchains.workflow.runs import load, load_run

__all__ = ["export_run", "check_onnx", "onnx_output_names", "EXPORT_FORMATS"]

EXPORT_FORMATS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx", "pt": ".pickle.pt"}


def check_onnx() -> None:
    """Raise a one-line ``RuntimeError`` unless the ``onnx`` package (torch's ONNX exporter needs it) is
    installed; it comes with the ``onnx`` extra: ``pip install hookchains[onnx]``."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise RuntimeError("--format onnx needs the onnx package: pip install 'hookchains[onnx]' "
                           "(or pip install onnx)") from None


def onnx_output_names(output) -> List[str]:
    """ONNX output names for a module's ``output``, in the order the exporter flattens it: ``logits`` for
    one tensor, the keys of a dict, ``output0``, ``output1``, ... for a tuple/list of tensors.

    Raises:
        ValueError: a nested or non-tensor output (export it as torchscript or safetensors instead).

    Example:
        >>> onnx_output_names({"features": torch.zeros(1, 8), "logits": torch.zeros(1, 3)})
        ['features', 'logits']
        >>> onnx_output_names((torch.zeros(1, 3), torch.zeros(1, 8)))
        ['output0', 'output1']
    """
    if isinstance(output, torch.Tensor):
        return ["logits"]
    items = list(output.items()) if isinstance(output, dict) else list(enumerate(output))
    if not isinstance(output, (dict, tuple, list)) or not all(isinstance(v, torch.Tensor) for _, v in items):
        raise ValueError(f"--format onnx needs the module to return a tensor or a flat dict/tuple/list of tensors, "
                         f"not {type(output).__name__} of other things; use --format torchscript or safetensors")
    return [str(k) if isinstance(output, dict) else f"output{k}" for k, _ in items]


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
        torch.jit.save(torch.jit.trace(module, example, strict=False), buffer)  # strict: dict outputs too
    elif fmt == "onnx":
        with torch.no_grad():
            names = onnx_output_names(module(example))
        torch.onnx.export(module, (example,), buffer, input_names=["images"], output_names=names, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in names}})
    else:
        warnings.warn("writing a pickled module: only unpickle it if you trust "
                      "the file, since loading runs arbitrary code", stacklevel=2)
        torch.save(module, buffer)
    return atomic_write_bytes(target, buffer.getvalue())
