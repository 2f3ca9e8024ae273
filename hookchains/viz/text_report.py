"""The explorer page of a text run (:mod:`hookchains.viz.explorer`: the same shell, keyboard and views
as an image run, with a text run's own spine and panels).

* A filter run (:func:`text_report_html`): the graph of kept attention heads and MLP neurons, two
  columns per layer (heads, then neurons; a removed layer says "pass-through"), up to
  :data:`NEURONS_PER_LAYER` neurons drawn per layer, highest score first, with "+N more". A click on a
  head shows its layer and score; on a neuron, also the words of the task's sentences that activate it
  most (the text analogue of feature visualisation: dataset examples, as in Olah et al. 2017's
  "dataset examples" and neuron-view tools, :func:`top_words`).
* A token run (``--sites tokens``, :func:`text_token_report_html`): the token-by-layer view of
  :func:`hookchains.viz.token_report.token_explorer_data`, a cell per sentence and layer; picking a
  sentence shows its word grid (the word pieces each layer keeps, pruned ones struck through) and the
  first token's Eq. 10 attribution over the words
  (:func:`hookchains.tokens.attribution.text_token_attribution`).

Nothing here runs a fit.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hookchains.core.objectives import OutputLogits
    >>> from hookchains.core.testing import random_subnetwork
    >>> bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                                                 intermediate_size=8, vocab_size=20))
    >>> model = OutputLogits(bert.eval())
    >>> sub = random_subnetwork(model, {"input_ids": torch.ones(1, 4, dtype=torch.long)}, keep=0.5, gates_open=True)
    >>> [row[:2] for row in layer_rows(sub)]
    [('L1', 'open'), ('L2', 'open')]
"""
from __future__ import annotations

import html
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from hookchains.core.sites import FilterSite
from hookchains.core.state import capture_featuremaps, eval_mode
from hookchains.core.subnetwork import Subnetwork
from hookchains.tokens.attribution import text_token_attribution
from hookchains.tokens.result import TokenSubnetwork
from hookchains.viz.explorer import Pictures, explorer_page, image_buttons
from hookchains.viz.html import fidelity_rows
from hookchains.viz.token_report import token_explorer_data

__all__ = ["layer_rows", "top_words", "text_report_html", "NEURONS_PER_LAYER", "WORDS_PER_NEURON",
           "text_token_report_html"]

NEURONS_PER_LAYER = 8  # kept neurons drawn per layer (highest scores first)
WORDS_PER_NEURON = 5
Words = List[Tuple[str, float]]


def _layer_sites(sub: Subnetwork, gate) -> Tuple[FilterSite, FilterSite]:
    """The (heads, MLP neurons) filter sites of one transformer layer."""
    head = next(s for s in sub.sites.filters if s.kind == "head" and s.name in gate.filter_sites)
    mlp = next(s for s in sub.sites.filters if s.kind == "neuron" and s.name in gate.filter_sites)
    return head, mlp


def layer_rows(sub: Subnetwork) -> List[Tuple[str, str, str, str]]:
    """Per layer ``(label, "open"/"removed", kept heads "3/12: 0 4 7", kept neurons "410/1536")``."""
    kept = sub.kept_filters()
    rows = []
    for gate in sub.sites.gates:
        head, mlp = _layer_sites(sub, gate)
        on = gate.name not in sub.removed_gates
        h, n = (kept.get(head.name, []), kept.get(mlp.name, [])) if on else ([], [])
        rows.append((gate.label, "open" if on else "removed (pass-through)",
                     f"{len(h)}/{head.channels}" + (f": {' '.join(map(str, h))}" if h else ""), f"{len(n)}/{mlp.channels}"))
    return rows


def top_words(sub: Subnetwork, model: nn.Module, inputs: Dict[str, torch.Tensor], tokenizer,
              per_layer: int = NEURONS_PER_LAYER, words: int = WORDS_PER_NEURON) -> Dict[str, List[Tuple[int, Words]]]:
    """For the ``per_layer`` highest-scoring kept MLP neurons of each layer, the ``words`` distinct
    task tokens (special and padding tokens excluded) where the original model activates it most.

    Returns ``{neuron site name: [(neuron, [(word, activation), ...]), ...]}``."""
    kept = sub.kept_filters()
    sites = [s for s in sub.sites.filters if s.kind == "neuron" and kept.get(s.name)]
    maps = capture_featuremaps(model, inputs, sorted({s.hook_module for s in sites})) if sites else {}
    special = set(getattr(tokenizer, "all_special_ids", []))
    ids = inputs["input_ids"]
    real = inputs["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(special) or [-1]))
    tokens = tokenizer.convert_ids_to_tokens(ids[real].tolist())
    result: Dict[str, List[Tuple[int, List[Tuple[str, float]]]]] = {}
    for site in sites:
        acts = maps[site.hook_module][real].float()  # tokens x neurons
        order = sorted(kept[site.name], key=lambda i: -float(sub.scores[site.name][i]))[:per_layer]
        shown = []
        for neuron in order:
            best: Dict[str, float] = {}
            for k in torch.argsort(acts[:, neuron], descending=True).tolist():
                best.setdefault(tokens[k], float(acts[k, neuron]))
                if len(best) == words:
                    break
            shown.append((neuron, list(best.items())))
        result[site.name] = shown
    return result


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str) -> str:
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def _summary(sub, lines: Sequence[str], extra_rows: Sequence[Tuple[str, str]]) -> str:
    """The summary lines and the fidelity table, in the words of a text task (sentences, not images)."""
    fid = {k: v for k, v in sub.fidelity.items() if k not in ("positions", "images")}
    agree = f"{fid.pop('agree')}/{sub.fidelity.get('images', '?')}" if "agree" in fid else None
    rows = [("Top-1 agreement with the original model (sentences)", agree)] if agree else []
    rows += [(label.replace("Images", "Sentences"), value) for label, value in fidelity_rows(fid)]
    rows += list(extra_rows)
    return "".join(f"<p>{html.escape(line)}</p>" for line in lines) + _table(
        ["Figure", "Value"], rows, f"The thresholded sub-network on the task sentences (τ = {sub.tau:g})")


def _sentences(sub, model: nn.Module, inputs: Dict[str, torch.Tensor], tokenizer) -> Tuple[List[Dict[str, Any]],
                                                                                          List[Dict[str, Any]]]:
    """The explorer's ``images`` (the task's sentences, with the original model's prediction) and
    ``groups`` (the task's classes: empty when the result does not carry the sentences' labels)."""
    texts = sub.task.get("texts") or tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
    names, labels = list(sub.task.get("class_names", [])), sub.task.get("labels")
    with torch.no_grad(), eval_mode(model):
        probs = model(**inputs).float().softmax(-1).cpu()
    items = []
    for n, text in enumerate(texts):
        p = int(probs[n].argmax())
        said = names[p] if len(names) == probs.shape[-1] else f"output {p}"
        true = f"true {names[labels[n]]}, " if labels is not None and names else ""
        wrong = bool(labels is not None and len(names) == probs.shape[-1] and p != labels[n])
        items.append({"label": f"{n + 1}: {text[:40]}", "pic": None, "wrong": wrong,
                      "caption": f"Sentence {n + 1}: {text} ({true}predicted {said}, {float(probs[n, p]):.2f})"
                                 + (" (misclassified)" if wrong else "")})
    groups = [{"name": name, "images": [n for n, y in enumerate(labels) if y == g]}
              for g, name in enumerate(names)] if labels is not None else []
    return items, groups


def _unit_node(sub: Subnetwork, site: FilterSite, j: int, column: int, top: float, layer: str,
               words: Dict[Tuple[str, int], Words]) -> Dict[str, Any]:
    """One kept head (``H{j}``) or MLP neuron (``N{j}``) as an explorer node."""
    score, head = float(sub.scores[site.name][j]), site.kind == "head"
    label = f"{layer}.{'H' if head else 'N'}{j}"
    node = {"id": f"{site.name}:{j}", "label": label, "kind": "unit", "column": column, "value": score / top,
            "aria": f"{'attention head' if head else 'MLP neuron'} {j} of layer {layer}, score {score:.3g}",
            "facts": [("Layer", f"{layer} ({site.name})"), ("Kind", "attention head" if head else "MLP neuron"),
                      ("Score", f"{score:.4g}")], "featvis": None, "featvisFailed": None, "maps": []}
    if (site.name, j) in words:
        node["words"] = words[(site.name, j)]
    return node


def _graph(sub: Subnetwork, words: Dict[Tuple[str, int], Words]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Columns (heads, then neurons, per layer) and nodes of the kept units."""
    kept, columns, nodes = sub.kept_filters(), [], []
    top = max((float(sub.scores[n][j]) for n, idx in kept.items() for j in idx), default=1.0) or 1.0
    for gate in sub.sites.gates:
        removed = gate.name in sub.removed_gates
        for site in _layer_sites(sub, gate):
            units = [] if removed else sorted(kept.get(site.name, []), key=lambda j: -float(sub.scores[site.name][j]))
            shown = units if site.kind == "head" else units[:NEURONS_PER_LAYER]
            nodes += [_unit_node(sub, site, j, len(columns), top, gate.label, words) for j in shown]
            kind = "heads" if site.kind == "head" else "MLP"
            columns.append({"label": f"{gate.label} {kind}", "kind": "layer", "kept": len(units),
                            "more": len(units) - len(shown), "nodes": [f"{site.name}:{j}" for j in shown],
                            "detail": "removed (pass-through)" if removed else f"{len(units)}/{site.channels} kept"})
    return columns, nodes


def text_report_html(sub: Subnetwork, model: nn.Module, inputs: Dict[str, torch.Tensor], tokenizer,
                     lines: Sequence[str] = (), extra_rows: Sequence[Tuple[str, str]] = ()) -> str:
    """The explorer page of a text filter run (module doc). ``model``: the objective-wrapped original (no
    hooks attached); ``lines``: the summary lines (:func:`hookchains.workflow.text.text_summary`);
    ``extra_rows``: further (label, value) rows of the summary table (e.g. the sliced module's size)."""
    words = {(name, n): pairs for name, shown in top_words(sub, model, inputs, tokenizer).items() for n, pairs in shown}
    columns, nodes = _graph(sub, words)
    items, groups = _sentences(sub, model, inputs, tokenizer)
    c = sub.counts()
    data = {"title": f"{c['filters_kept']}/{c['filters_total']} heads and MLP neurons kept, "
                     f"{c['gates_total'] - c['gates_kept']}/{c['gates_total']} layers removed",
            "colour": {"by": "score relative to the highest kept", "low": "0", "high": "1"},
            "views": {"chains": "", "highlight": "the picked unit", "unit": "Sentence", "compare": False,
                      "compact": False, "classes": False},
            "columns": columns, "nodes": nodes, "edges": [], "images": items, "groups": groups, "chains": []}
    layers = _table(["Layer", "Gate", "Heads kept", "MLP neurons kept"], layer_rows(sub),
                    "Kept attention heads (indices) and MLP neurons per layer; a removed layer passes its input through")
    return explorer_page(data, Pictures(), [("summary", "Sub-network", _summary(sub, lines, extra_rows) + layers),
                                            ("images", "Task sentences", image_buttons(data))],
                         heading="NeuroChains explorer: text run")


def text_token_report_html(tsub: TokenSubnetwork, model: nn.Module, inputs: Dict[str, torch.Tensor], tokenizer,
                           lines: Sequence[str] = ()) -> str:
    """The explorer page of a text token run (module doc): a cell per sentence and layer; a sentence's
    panel shows its token-by-layer word grid and the first token's Eq. 10 attribution after the last layer."""
    attribution = text_token_attribution(model, inputs, tsub)[:, -1, 0]  # N x T: the first token, last layer
    labels = [site.label for site in tsub.sites]
    valid = inputs["attention_mask"].bool().cpu()
    items, groups = _sentences(tsub, model, inputs, tokenizer)
    positions, words = [], []
    for n, item in enumerate(items):
        real = torch.nonzero(valid[n]).flatten()
        positions.append(real.tolist())
        words.append(tokenizer.convert_ids_to_tokens(inputs["input_ids"][n, real].tolist()))
        kept = tsub.masks[n][:, real]
        item["grid"] = {"title": f"{int(kept.sum())}/{kept.numel()} token slots kept", "words": words[n],
                        "layers": labels, "kept": kept.tolist(), "attribution": attribution[n, real].tolist(),
                        "attributionLabel": f"{words[n][0]} draws on (Eq. 10)"}

    def cell(n: int, b: int) -> Dict[str, Any]:
        kept = [w for w, k in zip(words[n], tsub.masks[n, b, positions[n]].tolist()) if k]
        return {"facts": [("Word pieces kept", " ".join(kept) or "none")]}

    data = token_explorer_data(tsub, items, groups, positions, cell, "sentence")
    return explorer_page(data, Pictures(), [("summary", "Token sub-network", _summary(tsub, lines, [])),
                                            ("images", "Task sentences", image_buttons(data))],
                         heading="NeuroChains explorer: text token run")
