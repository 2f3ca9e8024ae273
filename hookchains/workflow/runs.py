"""A run folder: everything one extraction writes, written atomically, loadable without pickle.

Layout of ``RUN_DIR``::

    subnetwork.json      counts, fidelity, kept filters, sites, fit config   (Subnetwork.save)
    scores.safetensors   learned filter scores and gate logits               (Subnetwork.save)
    model.json           how to rebuild the base model (ModelRef: spec + checkpoint sha256)
    task.safetensors     the preprocessed task images, labels and the pictures as shown (uint8)
    pruned.safetensors   the materialised module's state_dict (checked on load)
    materialize.json     what materialise did (MaterializeReport: channels/parameters before and after, notes)
    manifest.json        sha256 of every file above (tampering / truncation is detected on load)
    summary.txt          the paper-style summary line, then one "warning: ..." line per problem of the
                         task (random weights, constant or near-uniform predictions: hookchains.degenerate)

A token run (a ViT with per-image token scores, :mod:`hookchains.tokens`) has ``tokens.json`` and
``token_scores.safetensors`` (``TokenSubnetwork.save``) instead of the first two files, and
``token_logits.safetensors`` (the token-dropping module's logits on the task images, compared on load)
instead of ``pruned.safetensors``: that module borrows the base model's weights, so it has none of its own.

The folder is assembled in ``.RUN_DIR.partial`` beside it and renamed into place at the end, so an
interrupted run leaves no half-written ``RUN_DIR``; the next run starts clean. ``manifest.json`` says
``"kind": "hookchains-run"``: ``--overwrite`` replaces only a folder whose manifest says so, and only
once the new run is complete.
"""
from __future__ import annotations

import hashlib
import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, NoReturn, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from hookchains.core.io import atomic_write_bytes, read_json, read_tensors, write_json, write_tensors
from hookchains.core.materialize import TOLERANCE, materialize
from hookchains.core.subnetwork import Subnetwork
from hookchains.inputs.data import ImageSet
from hookchains.inputs.models import ModelRef
from hookchains.tokens.materialize import materialize_tokens
from hookchains.tokens.result import TOKEN_FILES, TokenSubnetwork

__all__ = ["RunFolder", "save_run", "load_run", "load", "read_physical", "is_run_folder", "prepare_run_dir", "discard_staging",
           "finish_run_dir", "RUN_KIND"]

TOKEN_LOGITS = "token_logits.safetensors"
PHYSICAL = "materialize.json"
_CHECKED = ("subnetwork.json", "scores.safetensors", *TOKEN_FILES, "model.json", "task.safetensors",
            "pruned.safetensors", PHYSICAL, TOKEN_LOGITS)
Result = Union[Subnetwork, TokenSubnetwork]


@dataclass
class RunFolder:
    """What :func:`load_run` reads back: the result, the model reference and the task images.

    ``sub`` is a :class:`~hookchains.core.subnetwork.Subnetwork` (filter run) or a
    :class:`~hookchains.tokens.TokenSubnetwork` (token run, see :attr:`is_token_run`).
    """

    path: Path
    sub: Result
    model_ref: ModelRef
    task: ImageSet

    @property
    def images(self) -> torch.Tensor:
        """The preprocessed task images."""
        return self.task.images

    def base_model(self, checkpoint: Optional[str] = None) -> nn.Module:
        """Rebuild the model the run was fitted on; refuses a randomly initialised timm/torchvision
        model, whose weights cannot be rebuilt (the drawing would silently use other weights)."""
        ref = self.model_ref
        if ref.random_init and checkpoint is None:
            raise ValueError(f"{self.path} was made with randomly initialised {ref.spec} weights, which cannot be "
                             "rebuilt; re-run extract with --checkpoint FILE (or --pretrained)")
        return ref.build(checkpoint)

    @property
    def physical(self) -> Optional[Dict[str, Any]]:
        """What materialise did for a filter run (see :func:`read_physical`), else ``None``."""
        return read_physical(self.path)

    def _repr_html_(self) -> str:
        """Jupyter shows the run's page inline (``report.html`` in an ``<iframe srcdoc>``: the explorer,
        its script allowed by the page's own Content-Security-Policy), else the summary line."""
        page = self.path / "report.html"
        line = f"<p><strong>{html.escape(str(self.path))}</strong>: {html.escape(self.sub.summary())}</p>"
        if not page.is_file():
            return line + f"<p>No report yet: <code>hookchains report {html.escape(str(self.path))}</code></p>"
        return (line + f'<iframe title="hookchains explorer of {html.escape(str(self.path))}" style="width:100%;'
                f'height:820px;border:1px solid #ccc" srcdoc="{html.escape(page.read_text(encoding="utf-8"))}">'
                "</iframe>")

    @property
    def is_token_run(self) -> bool:
        """Whether the run holds per-image token scores of a ViT. Example: ``load_run(d).is_token_run``."""
        return isinstance(self.sub, TokenSubnetwork)


def read_physical(folder) -> Optional[Dict[str, Any]]:
    """A filter run's ``materialize.json`` (channels, parameters, MACs before/after, notes), without
    reading the rest of the run; ``None`` for a token run."""
    path = Path(folder) / PHYSICAL
    return read_json(path) if path.is_file() else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


RUN_KIND = "hookchains-run"  # manifest.json's "kind": what lets --overwrite replace a folder
_STAGING_MARK = ".hookchains-staging"  # inside a staging folder: only such a folder is ever removed


def is_run_folder(path) -> bool:
    """Whether ``path`` is a folder that hookchains wrote as a run (its manifest says so).

    Only such a folder may be replaced by ``--overwrite``; anything else (a dataset, notes, the
    current directory) is refused, whatever it contains.

    Example:
        >>> import tempfile
        >>> is_run_folder(tempfile.mkdtemp())
        False
    """
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == RUN_KIND


def _sibling(out: Path, suffix: str) -> Path:
    return out.parent / f".{out.name}.{suffix}"


def _remove_own_staging(staging: Path) -> None:
    """Remove a staging folder left by an interrupted run; refuse a folder hookchains did not make."""
    if not staging.exists():
        return
    if not (staging / _STAGING_MARK).is_file():
        raise FileExistsError(f"{staging} exists and was not made by hookchains; move it away or choose another --out")
    shutil.rmtree(staging)


def prepare_run_dir(out: Path, overwrite: bool) -> Path:
    """Check ``out`` may be written and return a clean staging folder beside it.

    ``out`` must not exist, or (with ``overwrite``) be an earlier run (:func:`is_run_folder`); the old
    run stays in place until :func:`finish_run_dir` swaps the finished new one in.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false, or it is not a hookchains run,
            or it is a file.

    Example:
        >>> import tempfile
        >>> prepare_run_dir(Path(tempfile.mkdtemp()), overwrite=True)
        Traceback (most recent call last):
        ...
        FileExistsError: ... is not a hookchains run (no run manifest): --overwrite replaces only an earlier run; choose another --out
    """
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
        if not is_run_folder(out):
            raise FileExistsError(f"{out} is not a hookchains run (no run manifest): --overwrite replaces only an "
                                  "earlier run; choose another --out")
    staging = _sibling(out, "partial")
    _remove_own_staging(staging)  # a run interrupted earlier: start clean
    staging.mkdir(parents=True)
    (staging / _STAGING_MARK).touch()
    return staging


def discard_staging(staging: Path) -> None:
    """Remove a staging folder made by :func:`prepare_run_dir` (after an error or Ctrl-C)."""
    if (Path(staging) / _STAGING_MARK).is_file():
        shutil.rmtree(staging, ignore_errors=True)


def finish_run_dir(staging: Path, out: Path) -> Path:
    """Move the finished staging folder to ``out``; an earlier run there is replaced only now.

    Raises:
        FileExistsError: ``out`` appeared meanwhile and is not a hookchains run.
    """
    out = Path(out).absolute()
    if out.exists() and not is_run_folder(out):
        raise FileExistsError(f"{out} is not a hookchains run (no run manifest); the new run stays in {staging}")
    (staging / _STAGING_MARK).unlink()
    old = _sibling(out, "old")
    if out.exists():
        if is_run_folder(old):  # left by a crash between the two renames below
            shutil.rmtree(old)
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def save_run(folder: Path, sub: Result, model_ref: ModelRef, task: ImageSet,
             pruned: Optional[nn.Module] = None, logits: Optional[torch.Tensor] = None,
             physical: Optional[Dict[str, Any]] = None) -> Path:
    """Write a run folder's files into ``folder`` (use :func:`prepare_run_dir` for atomicity).

    ``pruned``: a filter run's materialised module (its weights are saved) and ``physical`` its
    :class:`~hookchains.core.materialize.MaterializeReport` as a dict; ``logits``: a token run's
    token-dropping module's logits on ``task`` (compared by :func:`load`).

    Example: ``save_run(staging, tsub, ref, task, logits=dropped(task.images))``."""
    folder = Path(folder)
    json_ref = model_ref.to_json()
    sub.model_ref = json.loads(json_ref)
    sub.task = {**sub.task, "class_names": list(task.class_names), "labels": task.labels.tolist(),
                "paths": list(task.paths)}
    sub.save(folder)
    atomic_write_bytes(folder / "model.json", (json_ref + "\n").encode())
    raw = torch.stack([torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1) for img in task.raw])
    write_tensors(folder / "task.safetensors", {"images": task.images, "labels": task.labels, "raw": raw})
    if pruned is not None:
        write_tensors(folder / "pruned.safetensors", dict(pruned.state_dict()))
    if physical is not None:
        write_json(folder / PHYSICAL, physical)
    if logits is not None:
        write_tensors(folder / TOKEN_LOGITS, {"logits": logits})
    summary = [sub.summary(), *(f"warning: {line}" for line in sub.task.get("warnings", []))]
    atomic_write_bytes(folder / "summary.txt", ("\n".join(summary) + "\n").encode())
    write_json(folder / "manifest.json", {"kind": RUN_KIND, "version": 1,
                                          "files": {n: _sha256(folder / n) for n in _CHECKED if (folder / n).exists()}})
    return folder


def _verify(folder: Path) -> None:
    if not (folder / "manifest.json").is_file():
        for meta, kind, rebuild in (("subnetwork.json", "Subnetwork", "materialize"),
                                    (TOKEN_FILES[0], "TokenSubnetwork", "materialize_tokens")):
            if (folder / meta).is_file():  # written by result.save: a result, not a run folder
                raise FileNotFoundError(
                    f"{folder} holds a result saved with result.save, not a run folder: read it with "
                    f"hookchains.{kind}.load({str(folder)!r}), then hookchains.{rebuild}(result, model, images) "
                    "gives the module")
        raise FileNotFoundError(f"{folder} is not a hookchains run folder (no manifest.json); "
                                "make one with `hookchains extract`")
    manifest = read_json(folder / "manifest.json")
    if not is_run_folder(folder):
        raise ValueError(f"{folder}/manifest.json is not a hookchains run manifest; re-run the extraction")
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the run folder; re-run the extraction")
        if _sha256(path) != digest:
            raise ValueError(f"{path} does not match its sha256 in manifest.json: the file was truncated "
                             "or modified; re-run the extraction")


def load_run(folder) -> RunFolder:
    """Read a run folder (filter or token run) after checking every file against its manifest.

    Example: ``run = load_run("runs/cat-espresso"); run.sub.summary()``."""
    folder = Path(folder)
    _verify(folder)
    if (folder / "text_task.json").is_file():  # written by hookchains.workflow.text
        raise ValueError(f"{folder} is a text run: its report is {folder / 'report.html'}, its result "
                         f"hookchains.Subnetwork.load({str(folder)!r}); render/report/export/load take image runs")
    token_run = all((folder / name).is_file() for name in TOKEN_FILES)
    sub = TokenSubnetwork.load(folder) if token_run else Subnetwork.load(folder)
    ref = ModelRef.from_json((folder / "model.json").read_text())
    saved = read_tensors(folder / "task.safetensors")
    raw = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in saved["raw"]]
    task = ImageSet(saved["images"], saved["labels"], list(sub.task.get("class_names", [])),
                    list(sub.task.get("paths", [""] * len(raw))), raw)
    return RunFolder(folder, sub, ref, task)


def load(folder, checkpoint: Optional[str] = None) -> nn.Module:
    """Rebuild the pruned module of a run folder without unpickling anything.

    The base model is rebuilt from its reference (timm/torchvision name, ``module:factory`` or the
    embedded weights; a checkpoint must have the recorded sha256) and the result re-materialised. A
    filter run's module has its weights compared with the saved ``pruned.safetensors``; a token run
    gives the :class:`~hookchains.tokens.TokenDroppedViT` (checked against the masked network on the
    task images), whose logits are compared with the saved ``token_logits.safetensors``.

    Example:
        >>> import hookchains
        >>> from hookchains.core.fit import preset_for
        >>> from hookchains.workflow.demo import demo_task
        >>> from hookchains.workflow.extract import extract
        >>> model, ref, task = demo_task(image_size=64, per_class=2)
        >>> quick = preset_for("mobilenet", steps=2, progress=False)
        >>> sub = extract(model, ref, task, "runs/cat-espresso", config=quick, graph_format=None, report=False)
        >>> small = hookchains.load("runs/cat-espresso")
        >>> small(task.images[:2]).shape
        torch.Size([2, 1000])
        >>> dropped = hookchains.load("runs/deit-cat")          # token run  # doctest: +SKIP
        >>> dropped(images[:2], rows=[0, 1])     # row j is task image rows[j]  # doctest: +SKIP
    """
    run = load_run(folder)
    base = run.base_model(checkpoint)
    if run.is_token_run:
        return _load_tokens(run, base)
    module, _ = materialize(run.sub, base, run.images[:4])
    saved = read_tensors(Path(folder) / "pruned.safetensors")
    state = module.state_dict()
    if set(saved) != set(state) or any(saved[k].shape != state[k].shape or not torch.equal(saved[k], state[k].cpu())
                                       for k in saved):
        _wrong_base(run, "pruned.safetensors")
    return module


def _load_tokens(run: RunFolder, base: nn.Module) -> nn.Module:
    """The token-dropping module of a token run, its logits checked against the saved ones."""
    module = materialize_tokens(run.sub, base, run.images, check=True)
    saved = read_tensors(run.path / TOKEN_LOGITS)["logits"]
    with torch.no_grad():
        logits = module(run.images.to(next(base.parameters()).device)).float().cpu()
    if logits.shape != saved.shape or float((logits - saved).abs().max()) > TOLERANCE * max(
            float(saved.abs().max()), 1e-12):
        _wrong_base(run, TOKEN_LOGITS)
    return module


def _wrong_base(run: RunFolder, name: str) -> NoReturn:
    raise ValueError(f"{run.path}: the rebuilt module differs from {name}; the base model "
                     f"({run.model_ref.spec}) is not the one this result was computed for")
