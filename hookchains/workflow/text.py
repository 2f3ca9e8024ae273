"""NeuroChains on a Hugging Face text model: task -> fit -> sliced sub-network -> run folder.

``hookchains extract --model hf:PATH --text-data DIR`` and ``hookchains demo --text`` run this. The
objective depends on the model (:mod:`hookchains.core.objectives`): an embedding model (MiniLM) becomes a
zero-shot classifier over fixed class prototypes (the original's mean embedding of each class's
sentences), a model with a classification head keeps its logits, a causal LM its next-token
distribution at the last position. The fit is :func:`hookchains.fit` (one loop for every model); the
result is sliced physically (:func:`hookchains.core.slicing.materialize_transformer`) and checked exact.

A text run folder holds ``subnetwork.json`` + ``scores.safetensors`` (the result), ``text_task.json``
(model, classes, sentences, labels, objective), ``pruned.safetensors`` (the sliced module's weights),
``materialize.json`` (the :class:`~hookchains.core.slicing.SlicedReport`), ``summary.txt``, ``report.html``
and ``manifest.json``; it is written atomically (:mod:`hookchains.workflow.runs`).

With ``curve`` (``extract --curve``) it also holds ``curve.json``: the size-fidelity trade-off, one real
fit per value of one fit option (``kl_target`` or ``lam``), and beside it the random-weights control --
the same fits on a re-initialised copy of the model (:func:`random_twin`) -- with both models' output
spreads (:func:`text_curve`, :func:`curve_table`).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from hookchains.core.attach import attach
from hookchains.core.fit import fit
from hookchains.core.io import atomic_write_bytes, write_json, write_tensors
from hookchains.core.objectives import ZERO_SHOT_TEMPERATURE, OutputLogits, ZeroShotClassifier, class_prototypes
from hookchains.core.slicing import SlicedReport, materialize_transformer
from hookchains.core.subnetwork import Subnetwork
from hookchains.evaluation.controls import kept_overlap, output_spread, randomized_copy
from hookchains.inputs.text import TextData, TextInputError, load_hf, load_text_data, load_tokenizer, tokenize
from hookchains.tokens.fit import TOKEN_DEFAULTS, fit_tokens
from hookchains.tokens.materialize import materialize_tokens
from hookchains.tokens.result import TokenSubnetwork
from hookchains.viz.text_report import text_report_html, text_token_report_html
from hookchains.workflow.runs import RUN_KIND, discard_staging, finish_run_dir, prepare_run_dir

__all__ = ["TextTask", "text_task", "zero_shot", "demo_text_data", "fit_text", "text_summary", "extract_text",
           "random_weights_text_control", "extract_text_tokens", "token_summary", "random_twin", "filter_point",
           "token_point", "text_curve", "curve_table", "CURVE_DEFAULTS"]

CURVE_DEFAULTS = {"filters": ("kl_target", (0.01, 0.1, 0.3)), "tokens": ("lam", (0.005, 0.08, 1.0))}
"""What ``extract --curve`` varies without a list (one fit per value, on the real model and on its
random-weights copy). Tokens vary ``lam``: on MiniLM and the demo task a token fit stops on a stable kept
set with KL ~0 whatever ``kl_target`` (0.01, 0.1, 0.3: 45.1, 44.8, 43.8 of 68.8 slots, KL <= 0.001)."""


@dataclass
class TextTask:
    """A text task ready to fit: the objective-wrapped ``model``, the tokenised ``inputs`` (N x L ids
    and mask), the sentences, the model ``kind`` and where it was loaded from, the tokenizer."""

    model: nn.Module
    inputs: Dict[str, torch.Tensor]
    data: TextData
    kind: str
    source: str
    tokenizer: Any
    temperature: float = ZERO_SHOT_TEMPERATURE

    def example(self) -> Dict[str, torch.Tensor]:
        """The first example as a one-row batch (attach's probe)."""
        return {k: v[:1] for k, v in self.inputs.items()}

    @torch.no_grad()
    def accuracy(self) -> Optional[float]:
        """The original's zero-shot accuracy on the task (embedding models; ``None`` for the others,
        whose outputs are not the task's classes)."""
        if self.kind != "embedding":
            return None
        return float((self.model(**self.inputs).argmax(-1) == torch.tensor(self.data.labels)).float().mean())


def zero_shot(hf: nn.Module, inputs: Dict[str, torch.Tensor], labels: List[int], classes: int,
              temperature: float = ZERO_SHOT_TEMPERATURE) -> ZeroShotClassifier:
    """The zero-shot objective of ``hf`` with prototypes from its own embeddings of each class's sentences."""
    label = torch.tensor(labels)
    batches = [{k: v[label == c] for k, v in inputs.items()} for c in range(classes)]
    return ZeroShotClassifier(hf, class_prototypes(hf, batches), temperature).eval()


def text_task(spec: str, data: TextData, temperature: float = ZERO_SHOT_TEMPERATURE) -> TextTask:
    """Load ``hf:PATH`` and its tokenizer offline and wrap the model in its objective.

    Raises:
        TextInputError: transformers missing, no model or tokenizer at ``spec``, or an image model.
    """
    hf, kind, where = load_hf(spec)
    if kind == "image-classifier":
        raise TextInputError(f"hf:{where} is an image model: give it images (hookchains extract --images), "
                             "not --text-data")
    tokenizer = load_tokenizer(where)
    inputs = tokenize(tokenizer, data.texts)
    model = (zero_shot(hf, inputs, data.labels, len(data.classes), temperature) if kind == "embedding"
             else OutputLogits(hf, "last" if kind == "causal-lm" else None).eval())
    return TextTask(model, inputs, data, kind, where, tokenizer, temperature)


def demo_text_data() -> TextData:
    """The bundled demo task: 10 short sentences each of ``cooking``, ``sport``, ``weather``."""
    return load_text_data(Path(__file__).resolve().parents[1] / "assets" / "text_demo.jsonl")


def fit_text(task: TextTask, **options) -> Subnetwork:
    """:func:`hookchains.fit` on the task (hooks attached and removed here); ``options``: FitConfig fields."""
    with attach(task.model, example=task.example()) as hooks:
        return fit(hooks, task.inputs, **options)


def text_summary(sub: Subnetwork, report: Optional[SlicedReport] = None, accuracy: Optional[float] = None) -> List[str]:
    """The lines the CLI prints: kept heads / neurons / layers, fidelity, the fit's steps, the slicing."""
    kept = sub.kept_filters()
    totals = {kind: sum(s.channels for s in sub.sites.filters if s.kind == kind) for kind in ("head", "neuron")}
    counts = {kind: sum(len(kept.get(s.name, ())) for s in sub.sites.filters if s.kind == kind) for kind in totals}
    fid, cfg = sub.fidelity, sub.config
    lines = [f"heads {counts['head']}/{totals['head']}, MLP neurons {counts['neuron']}/{totals['neuron']}, "
             f"layers {len(sub.sites.gates) - len(sub.removed_gates)}/{len(sub.sites.gates)}; "
             f"top-1 agreement {fid.get('agree')}/{fid.get('positions')}, KL {fid.get('kl', float('nan')):.4f}; "
             f"{cfg.get('steps_run')} steps ({cfg.get('ended')})"]
    if accuracy is not None:
        lines.append(f"original zero-shot accuracy on the task: {accuracy:.3f}")
    if report is not None:
        lines.append(f"materialised ({report.method}): {report.params_before:,} -> {report.params_after:,} parameters "
                     f"(transformer layers {report.layer_params_before:,} -> {report.layer_params_after:,}), "
                     f"max abs diff {report.max_abs_diff:.3g} (tolerance {report.tolerance:.3g})")
    return lines


def random_twin(task: TextTask, seed: int = 0) -> TextTask:
    """The task on a re-initialised copy of its model (:func:`hookchains.evaluation.controls.randomized_copy`);
    an embedding model's prototypes are recomputed with the random weights, so the task stays a task of
    that model."""
    inner = randomized_copy(task.model.model, seed)
    model = (zero_shot(inner, task.inputs, task.data.labels, len(task.data.classes), task.temperature)
             if task.kind == "embedding" else OutputLogits(inner, getattr(task.model, "position", None)).eval())
    return dataclasses.replace(task, model=model)


def random_weights_text_control(task: TextTask, sub: Subnetwork, seed: int = 0, **options) -> Dict[str, Any]:
    """The same fit on :func:`random_twin`. Returns its summary lines, counts, fidelity, kept overlap and
    output spreads."""
    twin = random_twin(task, seed)
    with attach(twin.model, sites=sub.sites, tau=sub.tau, temperature=sub.temperature, score_max=None) as hooks:
        control = fit(hooks, task.inputs, **options)
    with torch.no_grad():
        spread = {"real": output_spread(task.model(**task.inputs)), "random": output_spread(twin.model(**task.inputs))}
    return {"summary": text_summary(control), "counts": control.counts(), "fidelity": dict(control.fidelity),
            "overlap": kept_overlap(sub, control), "output_spread": spread}


def filter_point(sub: Subnetwork) -> Dict[str, Any]:
    """One point of a filter curve: kept/total heads, MLP neurons and layers, KL, top-1 agreement, steps."""
    kept = sub.kept_filters()
    point: Dict[str, Any] = {}
    for kind, name in (("head", "heads"), ("neuron", "neurons")):
        sites = [s for s in sub.sites.filters if s.kind == kind]
        point[name] = [sum(len(kept.get(s.name, ())) for s in sites), sum(s.channels for s in sites)]
    point["layers"] = [len(sub.sites.gates) - len(sub.removed_gates), len(sub.sites.gates)]
    return {**point, **_fidelity_point(sub.fidelity, sub.config)}


def token_point(tsub: TokenSubnetwork) -> Dict[str, Any]:
    """One point of a token curve: kept token slots per sentence (mean) of the total, tokens left after the
    last layer (mean), KL, top-1 agreement, steps."""
    counts = tsub.counts()
    last = sum(counts["patches_in_last_block"]) / counts["images"]
    return {"slots": [counts["slots_kept_mean"], counts["slots_total"]], "last_layer_tokens": last,
            **_fidelity_point(tsub.fidelity, tsub.config)}


def _fidelity_point(fid: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, Any]:
    return {"kl": fid.get("kl"), "agree": [fid.get("agree"), fid.get("images", fid.get("positions"))],
            "steps": config.get("steps_run")}


def text_curve(task: TextTask, parameter: str, values: Sequence[float],
               fit_point: Callable[[TextTask, Dict[str, float]], Dict[str, Any]], *,
               seed: int = 0, known: Optional[Dict[float, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The size-fidelity trade-off by refitting at each value of the fit option ``parameter``
    (``"kl_target"`` or ``"lam"``), on the real model and on :func:`random_twin` (the random-weights
    control, same fits).

    Args:
        fit_point: fits a task with one option override (``{parameter: value}``) and returns its point
            (:func:`filter_point` or :func:`token_point` of the result).
        known: points of the real model already fitted, by value (not refitted).

    Returns:
        ``{"parameter", "values", "seed", "real": [points], "random_weights": [points],
        "output_spread": {"real", "random_weights"}}`` -- each point also holds its ``parameter`` value;
        the output spread (:func:`hookchains.evaluation.controls.output_spread`) says how much each
        model's outputs vary over the sentences (a control that barely varies is trivially matched).
    """
    twin = random_twin(task, seed)
    known = known or {}
    curves = {name: [{parameter: v, **(known[v] if name == "real" and v in known else fit_point(t, {parameter: v}))}
                     for v in values] for name, t in (("real", task), ("random_weights", twin))}
    with torch.no_grad():
        spread = {name: output_spread(t.model(**t.inputs)) for name, t in (("real", task), ("random_weights", twin))}
    return {"parameter": parameter, "values": list(values), "seed": seed, **curves, "output_spread": spread}


def _cell(point: Dict[str, Any]) -> str:
    if "slots" in point:
        kept, total = point["slots"]
        size = f"slots {kept:.1f}/{total:.1f}, last layer {point['last_layer_tokens']:.1f}"
    else:
        size = ", ".join(f"{name} {point[name][0]}/{point[name][1]}" for name in ("heads", "neurons", "layers"))
    return f"{size}; KL {point['kl']:.3f}, agree {point['agree'][0]}/{point['agree'][1]}"


def curve_table(curve: Dict[str, Any]) -> List[str]:
    """The printed lines of a :func:`text_curve`: one per value, the real fit beside the control."""
    spread, name = curve["output_spread"], curve["parameter"]
    lines = [f"size-fidelity trade-off (one fit per {name}) | random-weights control (same fits; output spread "
             f"real {spread['real']:.3f}, random {spread['random_weights']:.3f})"]
    for real, random in zip(curve["real"], curve["random_weights"]):
        lines.append(f"  {name} {real[name]:g}: {_cell(real)} | {_cell(random)}")
    return lines


def _write_task(folder: Path, task: TextTask, result, lines: List[str]) -> None:
    """The result, ``text_task.json`` and ``summary.txt`` of a text run (filters or tokens)."""
    result.task = {"class_names": list(task.data.classes), "labels": list(task.data.labels),
                   "texts": list(task.data.texts)}
    result.save(folder)
    write_json(folder / "text_task.json", {"model": task.source, "kind": task.kind, "classes": task.data.classes,
                                           "texts": task.data.texts, "labels": task.data.labels,
                                           "temperature": task.temperature, "original_accuracy": task.accuracy()})
    atomic_write_bytes(folder / "summary.txt", ("\n".join(lines) + "\n").encode())


def _write(folder: Path, task: TextTask, sub: Subnetwork, small: nn.Module, report: SlicedReport,
           lines: List[str], html: Optional[str]) -> None:
    _write_task(folder, task, sub, lines)
    write_tensors(folder / "pruned.safetensors", {k: v.contiguous() for k, v in small.state_dict().items()})
    write_json(folder / "materialize.json", report.to_json())
    _write_manifest(folder, html)


def _write_manifest(folder: Path, html: Optional[str]) -> None:
    if html is not None:
        atomic_write_bytes(folder / "report.html", html.encode())
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    write_json(folder / "manifest.json", {"kind": RUN_KIND, "version": 1, "modality": "text",
                                          "files": {n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
                                                    for n in files}})


def _with_curve(folder: Path, task: TextTask, lines: List[str], curve_spec: Optional[Tuple[str, Sequence[float]]],
                fit_point: Callable[[TextTask, Dict[str, float]], Dict[str, Any]], fitted, point,
                seed: int) -> Optional[Dict[str, Any]]:
    """With ``curve_spec`` (parameter, values): :func:`text_curve` (the main result ``fitted`` reused at its
    own value) written to ``curve.json`` and its table appended to ``lines``."""
    if not curve_spec:
        return None
    parameter, values = curve_spec
    known = {fitted.config[parameter]: point(fitted)}
    curve = text_curve(task, parameter, values, fit_point, seed=seed, known=known)
    write_json(folder / "curve.json", curve)
    lines += curve_table(curve)
    return curve


def extract_text(task: TextTask, out, *, overwrite: bool = False, report: bool = True,
                 curve: Optional[Tuple[str, Sequence[float]]] = None, **options):
    """Fit, slice, check and write a text run folder atomically (module doc).

    Args:
        task: from :func:`text_task`.
        out: the run folder (must not exist unless ``overwrite`` and it is an earlier run).
        report: write ``report.html`` (:func:`hookchains.viz.text_report.text_report_html`).
        curve: ``(parameter, values)``: the fit option (``"kl_target"`` or ``"lam"``) and values of the
            trade-off and its random-weights control (``curve.json``, :func:`text_curve`; the main fit's
            point is reused); ``None``: no curve.
        **options: :class:`~hookchains.core.fit.FitConfig` fields.

    Returns:
        ``(sub, sliced module, SlicedReport, summary lines, run folder)``; with ``curve`` the lines end
        with :func:`curve_table`.
    """
    staging = prepare_run_dir(Path(out), overwrite)
    try:
        sub = fit_text(task, **options)
        small, sliced = materialize_transformer(sub, task.model, task.inputs)
        lines = text_summary(sub, sliced, task.accuracy())
        _with_curve(staging, task, lines, curve, lambda t, o: filter_point(fit_text(t, **{**options, **o})),
                    sub, filter_point, options.get("seed", 0))
        html = text_report_html(sub, task.model, task.inputs, task.tokenizer, lines, [
            ("Parameters (sliced / original)", f"{sliced.params_after:,} / {sliced.params_before:,}"),
            ("Parameters of the transformer layers (sliced / original)",
             f"{sliced.layer_params_after:,} / {sliced.layer_params_before:,}"),
            ("Sliced vs thresholded network, max |difference|", f"{sliced.max_abs_diff:.3g}"),
            ("Original zero-shot accuracy", "n/a" if task.accuracy() is None else f"{task.accuracy():.3f}")])
        _write(staging, task, sub, small, sliced, lines, html if report else None)
        folder = finish_run_dir(staging, Path(out))
    except BaseException:
        discard_staging(staging)
        raise
    return sub, small, sliced, lines, folder


def token_summary(tsub: TokenSubnetwork, max_abs_diff: float, accuracy: Optional[float] = None) -> List[str]:
    """The lines the CLI prints for a token run: kept slots, tokens kept per layer, fidelity, steps, the check."""
    per_layer = ", ".join(f"{s.label} {v:.1f}" for s, v in zip(tsub.sites, tsub.counts()["tokens_per_block_mean"]))
    lines = [tsub.summary(), f"tokens kept per layer (mean per sentence): {per_layer}; "
             f"{tsub.config.get('steps_run')} steps"]
    if accuracy is not None:
        lines.append(f"original zero-shot accuracy on the task: {accuracy:.3f}")
    lines.append(f"materialised (tokens dropped): max abs diff {max_abs_diff:.3g} against the thresholded network")
    return lines


def extract_text_tokens(task: TextTask, out, *, overwrite: bool = False, report: bool = True,
                        tau: float = 0.1, curve: Optional[Tuple[str, Sequence[float]]] = None, **options):
    """Per-sentence token scores (:func:`hookchains.tokens.fit.fit_tokens` on the task's objective), the
    token-dropping module checked exact, and a run folder written atomically: ``tokens.json`` +
    ``token_scores.safetensors``, ``text_task.json``, ``summary.txt``, ``report.html``, ``manifest.json``
    (and ``curve.json`` with ``curve``, as in :func:`extract_text`).

    Args:
        task: from :func:`text_task` (an encoder: a causal LM is refused in one line).
        curve: ``(parameter, values)`` of the trade-off and its random-weights control (:func:`text_curve`).
        **options: :class:`~hookchains.core.fit.FitConfig` fields over :data:`~hookchains.tokens.fit.TOKEN_DEFAULTS`.

    Returns:
        ``(token result, summary lines, run folder)``.
    """
    staging = prepare_run_dir(Path(out), overwrite)

    def fit_at(t: TextTask, extra: Optional[Dict[str, float]] = None) -> TokenSubnetwork:
        return fit_tokens(t.model, t.inputs, tau=tau, config=TOKEN_DEFAULTS, **{**options, **(extra or {})})
    try:
        tsub = fit_at(task)
        dropped = materialize_tokens(tsub, task.model, task.inputs, check=True)
        lines = token_summary(tsub, float(dropped.max_abs_diff or 0.0), task.accuracy())
        _with_curve(staging, task, lines, curve, lambda t, o: token_point(fit_at(t, o)), tsub, token_point,
                    options.get("seed", 0))
        _write_task(staging, task, tsub, lines)
        html = text_token_report_html(tsub, task.model, task.inputs, task.tokenizer, lines) if report else None
        _write_manifest(staging, html)
        folder = finish_run_dir(staging, Path(out))
    except BaseException:
        discard_staging(staging)
        raise
    return tsub, lines, folder
