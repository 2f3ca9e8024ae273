"""Many case studies in one command: extract and evaluate a sub-network per task (paper 4.2, A.2-A.5).

:func:`run_sweep` draws tasks (:func:`hookchains.inputs.tasks.plan_tasks`), and for each one loads its
images, fits the sub-network (Eq. 8), measures it (:func:`hookchains.evaluation.evaluate.evaluate`) and appends
one JSON line to ``OUT/results.jsonl``. At the end it draws the paper's summary plots and the HTML
report (:mod:`hookchains.viz.sweep_report`).

It never loses or repeats work:

* every line is appended with one ``write`` + ``fsync`` once its task is done, so a sweep killed at
  any instant leaves whole lines (a line torn by a crash inside the write is dropped on resume);
* a rerun with the same settings skips the tasks already in the results (``--tasks`` may grow: the
  plan for a seed is one fixed order, so the first tasks stay the same); other settings are refused;
* under ``torchrun --nproc-per-node=K [--nnodes ...]`` the tasks still to do are split across the
  processes with ``torch.distributed`` (gloo on CPU, nccl on GPU; process ``r`` takes tasks
  ``r, r+K, ...`` and uses GPU ``LOCAL_RANK``); each appends to its own ``results.rank-R.jsonl``,
  and rank 0 merges them into ``results.jsonl`` once all are done.

Each task is also saved as a run folder (``OUT/tasks/<id>/``, the layout of
:mod:`hookchains.workflow.runs`, written atomically before its line is appended) with its explorer page
(``report.html``, :func:`hookchains.viz.report.write_report`; ``explorers=False`` leaves it out), so the
sweep report's scatter opens a task's explorer and any case can be loaded, rendered or materialised later.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from hookchains.core.attach import attach
from hookchains.core.fit import FitConfig, fit, fit_tasks
from hookchains.core.io import atomic_write_bytes, read_json, write_json
from hookchains.core.progress import Progress
from hookchains.core.sites import SiteMap
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.evaluate import EvalOptions, evaluate, summary_line
from hookchains.inputs.data import ImageSet, class_folders
from hookchains.inputs.forward import class_scores
from hookchains.inputs.models import ModelRef, Preprocess, create_model, preprocessing
from hookchains.inputs.tasks import SweepTask, TaskImages, class_indices, load_task, plan_tasks
from hookchains.viz.report import write_report
from hookchains.workflow.extract import fit_config, resolve_device
from hookchains.workflow.runs import discard_staging, finish_run_dir, prepare_run_dir, save_run

__all__ = ["SweepConfig", "run_sweep", "read_results", "append_record", "shown_images", "RESULTS"]

RESULTS = "results.jsonl"
_SETTINGS = "sweep.json"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What a sweep studies and how (everything that changes its results is saved in ``sweep.json``).

    Attributes:
        model, pretrained, checkpoint: the model, as for :func:`hookchains.inputs.models.create_model`.
        data: ImageFolder-style folder, one sub-folder per class.
        tasks: how many tasks to run (all of them when there are fewer).
        classes_per_task: classes per task (2: pairs, as in the paper; more: multi-class, A.2).
        one_vs_rest: tasks of one class against images of all the others (A.2, Fig. 10).
        classes: restrict the tasks to these class folders (default: all).
        per_class: fitting images per class (paper: 10).
        held_out: further images per class for the generalisation check (A.3); 0 skips it.
        image_size: input resolution (default: the model's).
        seed: seeds the task plan, the images, the fit and the evaluations.
        fit: :class:`~hookchains.core.fit.FitConfig` overrides (``steps``, ``lam``, ...).
        tau, temperature: threshold and gate temperature.
        evaluation: which evaluations run (:class:`~hookchains.evaluation.evaluate.EvalOptions`).
        batch_tasks: tasks fitted together in one forward pass (:func:`hookchains.core.fit.fit_tasks`).
        skip_bad_images: leave out unreadable images instead of stopping.
        output: where the class scores are in a dict/tuple/list output (a key or an index).
        explorers: write each task's explorer page (chains, feature visualisations, heatmaps: seconds
            per task on a small CNN, a minute or more on an ImageNet model on CPU).
    """

    model: str
    data: str
    tasks: int
    classes_per_task: int = 2
    one_vs_rest: bool = False
    classes: Optional[Tuple[str, ...]] = None
    per_class: int = 10
    held_out: int = 10
    image_size: Optional[int] = None
    seed: int = 0
    pretrained: bool = False
    checkpoint: Optional[str] = None
    output: Optional[Union[str, int]] = None
    fit: Dict[str, Any] = dataclasses.field(default_factory=dict)
    tau: float = 0.1
    temperature: float = 0.2
    evaluation: EvalOptions = EvalOptions()
    batch_tasks: int = 1
    skip_bad_images: bool = False
    explorers: bool = True

    def settings(self) -> Dict[str, Any]:
        """What must match for a rerun to continue a sweep (all but the task count and batching)."""
        data = dataclasses.asdict(self)
        for key in ("tasks", "batch_tasks", "explorers"):
            data.pop(key)
        data["data"] = str(Path(self.data).resolve())
        data["checkpoint"] = str(Path(self.checkpoint).resolve()) if self.checkpoint else None
        data["classes"] = list(self.classes) if self.classes else None
        return json.loads(json.dumps(data))


def run_sweep(config: SweepConfig, out: str | Path, *, device: Optional[str] = None, progress: bool = True,
              log: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Run (or resume) a sweep into ``out``; returns every task's record on rank 0 ([] elsewhere).

    Example:
        >>> config = SweepConfig("benchmarks.digits:build", "digits/images", tasks=45,
        ...                      checkpoint="digits/digits_cnn.safetensors")
        >>> records = run_sweep(config, "digits/sweep")     # doctest: +SKIP
        >>> sum(r["fidelity"]["kl"] <= 0.8 for r in records) / len(records)     # doctest: +SKIP
    """
    out = Path(out)
    rank, world, created = _init_distributed()
    try:
        dev = _device(device, world)
        model, ref = create_model(config.model, config.pretrained, config.checkpoint)
        model = model.to(dev).eval()
        prep = preprocessing(model, config.image_size)
        classes = class_folders(config.data, config.classes)
        plan = plan_tasks(classes, config.tasks, config.classes_per_task, one_vs_rest=config.one_vs_rest,
                          seed=config.seed)
        if rank == 0:
            _check_settings(out, config, ref.to_json())
        _barrier(world)
        done = {r["task"] for r in read_results(out)}
        _barrier(world)  # every process has read what is done before anyone appends
        mine = [t for t in plan if t.id not in done][rank::world]
        example = torch.zeros(1, 3, *prep.input_size, device=dev)
        with attach(model, example=example, output=config.output) as checked:  # discovered and checked once
            sites = checked.sites
        with torch.no_grad():
            outputs = class_scores(model(example), sites.output).shape[-1]
        study = _Study(config, model, sites, prep, classes, outputs, out, rank, world, dev, log, ref)
        study.run(mine, progress)
        _barrier(world)
        return _finish(out, config, ref.spec, len(plan)) if rank == 0 else []
    finally:
        if created:
            dist.destroy_process_group()


@dataclasses.dataclass
class _Study:
    """One process's share of a sweep: fit and evaluate its tasks, append their records."""

    config: SweepConfig
    model: torch.nn.Module
    sites: SiteMap
    prep: Any
    classes: List[str]
    outputs: int
    out: Path
    rank: int
    world: int
    device: torch.device
    log: Optional[Callable[[str], None]]
    ref: ModelRef

    def run(self, tasks: List[SweepTask], progress: bool) -> None:
        results = self.out / (RESULTS if self.world == 1 else f"results.rank-{self.rank}.jsonl")
        cfg = fit_config(self.model, "filters", **self.config.fit)
        size = max(1, self.config.batch_tasks)
        bar = tqdm(total=len(tasks), desc=f"sweep (rank {self.rank})" if self.world > 1 else "sweep",
                   disable=not progress, position=self.rank, unit="task")
        for start in range(0, len(tasks), size):
            group = tasks[start:start + size]
            data = [self._load(t) for t in group]
            if self.log:
                for task, images in zip(group, data):
                    for entry in images.skipped:
                        self.log(f"{task.id}: skipped unreadable image {entry}")
            begin = time.perf_counter()
            subs = self._fit(data, dataclasses.replace(cfg, progress=progress and size == 1))
            fit_seconds = (time.perf_counter() - begin) / len(group)
            for task, images, sub in zip(group, data, subs):
                record = self._evaluate(task, images, sub, fit_seconds)
                self._save_task(task, images, sub)
                append_record(results, record)
                if self.log:
                    self.log(summary_line(task.id, task.classes, record))
                bar.update()
        bar.close()

    def _load(self, task: SweepTask) -> TaskImages:
        c = self.config
        return load_task(c.data, task, c.per_class, c.held_out, self.prep, all_classes=self.classes, seed=c.seed,
                         skip_bad_images=c.skip_bad_images)

    def _fit(self, data: List[TaskImages], cfg: FitConfig) -> List[Subnetwork]:
        """One task alone, or several in one forward pass when their image counts agree."""
        images = [d.images.to(self.device) for d in data]
        options = dict(sites=self.sites, tau=self.config.tau, temperature=self.config.temperature)
        if len(images) > 1 and len({x.shape for x in images}) == 1:
            with attach(self.model, tasks=len(images), **options) as chains:
                return fit_tasks(chains, images, cfg)
        subs = []
        for x in images:
            with attach(self.model, **options) as chains:
                subs.append(fit(chains, x, cfg))
        return subs

    def _save_task(self, task: SweepTask, data: TaskImages, sub: Subnetwork) -> None:
        """The task's run folder (``OUT/tasks/<id>``, atomically) with its explorer page."""
        folder = self.out / "tasks" / task.id
        staging = prepare_run_dir(folder, overwrite=True)
        try:
            images = shown_images(data, self.prep)
            save_run(staging, sub, self.ref, images)
            if self.config.explorers:
                indices = None if task.one_vs_rest else class_indices(data.class_names, self.outputs)
                write_report(staging, sub, self.model, images, progress=Progress(enabled=False),
                             class_indices=None if indices is None else dict(zip(data.class_names, indices)))
            finish_run_dir(staging, folder)
        except BaseException:
            discard_staging(staging)
            raise

    def _evaluate(self, task: SweepTask, data: TaskImages, sub: Subnetwork, fit_seconds: float) -> Dict[str, Any]:
        begin = time.perf_counter()
        with attach(self.model, sites=self.sites, tau=self.config.tau, temperature=self.config.temperature) as chains:
            record = evaluate(chains, sub, data, self.config.evaluation, seed_offset=task.index,
                              output_index=None if task.one_vs_rest else class_indices(data.class_names, self.outputs))
        sub.task = {"classes": data.class_names, "true_classes": data.true_classes}
        return {"task": task.id, "index": task.index, "classes": list(task.classes), "kind": task.kind,
                "images": int(data.images.shape[0]), "held_out_images": int(data.held_images.shape[0]), **record,
                "steps": sub.config["steps_run"], "fit_seconds": round(fit_seconds, 3),
                "seconds": round(fit_seconds + time.perf_counter() - begin, 3),
                "rank": self.rank, "device": str(self.device)}


def shown_images(data: TaskImages, prep: Preprocess) -> ImageSet:
    """A task's fitting images as an :class:`~hookchains.inputs.data.ImageSet`, the pictures rebuilt from
    the normalised batch (``x * std + mean``, at the model's resolution: what the model saw).

    Example: ``shown_images(load_task(...), preprocessing(model)).raw[0]`` is a PIL image."""
    mean = torch.tensor(prep.config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(prep.config["std"]).view(1, -1, 1, 1)
    pixels = ((data.images.cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    raw = [Image.fromarray(p.permute(1, 2, 0).numpy()).convert("RGB") for p in pixels]
    return ImageSet(data.images.cpu(), data.labels.cpu(), list(data.class_names), list(data.true_classes), raw)


def _init_distributed() -> Tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group) from torchrun's environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size(), created


def _device(device: Optional[str], world: int) -> torch.device:
    """The device asked for; under torchrun with ``auto`` and GPUs, this process's GPU (``LOCAL_RANK``)."""
    dev = resolve_device(device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _check_settings(out: Path, config: SweepConfig, model_ref: str) -> None:
    """Write ``sweep.json`` for a new sweep; refuse to continue one made with other settings, and refuse
    a folder that holds anything but a sweep (a sweep never writes among the user's files)."""
    settings = {"settings": config.settings(), "model_ref": json.loads(model_ref)}
    path = out / _SETTINGS
    if not path.exists() and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not a sweep folder (no {_SETTINGS}); a sweep writes only into "
                              "a new or empty folder: choose another --out")
    if path.exists():
        saved = read_json(path)
        if saved != settings:
            diff = sorted(k for k in {**saved["settings"], **settings["settings"]}
                          if saved["settings"].get(k) != settings["settings"].get(k))
            what = ", ".join(diff) or "the model's checkpoint"
            raise ValueError(f"{out} holds a sweep with other settings ({what} differ): rerun with the same "
                             "options to resume it, or pass another --out")
        return
    write_json(path, settings)


def append_record(path: Path, record: Dict[str, Any]) -> None:
    """Append one JSON line to ``path`` with a single ``write`` and ``fsync``.

    A line is either whole or, if the machine died inside the write, a torn tail without its
    newline: that tail is cut off here before appending and ignored by :func:`read_results`, so the
    file only ever holds whole records (rewriting the file per line would cost O(tasks^2) bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _cut_torn_tail(path)
    with open(path, "ab") as fh:
        fh.write((json.dumps(record, sort_keys=True) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


def _cut_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last newline (drops a line whose write was interrupted)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def read_results(out: str | Path) -> List[Dict[str, Any]]:
    """Every finished task's record in ``out`` (merged and per-rank files), one per task, by task order.

    Example:
        >>> records = read_results("digits/sweep")        # doctest: +SKIP
        >>> [r["task"] for r in records][:3]              # doctest: +SKIP
        ['00000', '00001', '00002']
    """
    out, records = Path(out), {}
    for path in [out / RESULTS, *sorted(out.glob("results.rank-*.jsonl"))]:
        if not path.exists():
            continue
        whole = path.read_text().split("\n")[:-1]  # the part after the last newline is empty or torn
        for number, line in enumerate(whole, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {number} is not JSON: the file was edited; remove that line "
                                 "and rerun to redo the task") from None
            records.setdefault(record["task"], record)
    return sorted(records.values(), key=lambda r: r["index"])


def _finish(out: Path, config: SweepConfig, model: str, planned: int) -> List[Dict[str, Any]]:
    """Merge the per-rank files into ``results.jsonl`` (then remove them), and write the report."""
    from hookchains.viz.sweep_report import write_sweep_report
    records = read_results(out)
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write_bytes(out / RESULTS, lines.encode())
    for path in out.glob("results.rank-*.jsonl"):
        path.unlink()
    meta = {"model": model, "data": config.data, "tasks": len(records), "planned": planned,
            "classes_per_task": "1 vs rest" if config.one_vs_rest else config.classes_per_task,
            "per_class": config.per_class, "held_out": config.held_out, "seed": config.seed}
    write_sweep_report(out, records, meta)
    return records
