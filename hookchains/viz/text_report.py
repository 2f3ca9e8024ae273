"""The HTML report of a text run: summary and fidelity, kept heads and MLP neurons per layer, and per
kept neuron the words of the task's sentences that activate it most (the text analogue of feature
visualisation: dataset examples, as in Olah et al. 2017's "dataset examples" and neuron-view tools).

A token run (``--mode tokens``, :func:`text_token_report_html`) gets, per sentence, the tokens kept at
each layer (a token-by-layer grid, words shown, pruned ones greyed) and the Eq. 10 attribution of the
first token over the words (:func:`hookchains.tokens.attribution.text_token_attribution`).

Built from the shared page toolkit (:mod:`hookchains.viz.html`); nothing here runs a fit.

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
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from hookchains.core.state import capture_featuremaps
from hookchains.core.subnetwork import Subnetwork
from hookchains.tokens.attribution import text_token_attribution
from hookchains.tokens.result import TokenSubnetwork
from hookchains.viz.html import Sprites, document, fidelity_rows

__all__ = ["layer_rows", "top_words", "text_report_html", "NEURONS_PER_LAYER", "WORDS_PER_NEURON",
           "token_grid_html", "text_token_report_html"]

NEURONS_PER_LAYER = 8  # kept neurons shown per layer (highest scores first)
WORDS_PER_NEURON = 5


def layer_rows(sub: Subnetwork) -> List[Tuple[str, str, str, str]]:
    """Per layer ``(label, "open"/"removed", kept heads "3/12: 0 4 7", kept neurons "410/1536")``."""
    kept = sub.kept_filters()
    rows = []
    for gate in sub.sites.gates:
        head = next(s for s in sub.sites.filters if s.kind == "head" and s.name in gate.filter_sites)
        mlp = next(s for s in sub.sites.filters if s.kind == "neuron" and s.name in gate.filter_sites)
        on = gate.name not in sub.removed_gates
        h, n = (kept.get(head.name, []), kept.get(mlp.name, [])) if on else ([], [])
        rows.append((gate.label, "open" if on else "removed (pass-through)",
                     f"{len(h)}/{head.channels}" + (f": {' '.join(map(str, h))}" if h else ""), f"{len(n)}/{mlp.channels}"))
    return rows


def top_words(sub: Subnetwork, model: nn.Module, inputs: Dict[str, torch.Tensor], tokenizer,
              per_layer: int = NEURONS_PER_LAYER, words: int = WORDS_PER_NEURON) -> Dict[str, List[Tuple[int, List[Tuple[str, float]]]]]:
    """Per layer label, up to ``per_layer`` kept neurons (highest score first), each with the ``words``
    task tokens (special and padding tokens excluded) where the original model activates it most.

    Returns ``{label: [(neuron, [(word, activation), ...]), ...]}``."""
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
        result[site.label.split(".")[0]] = shown
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


def text_report_html(sub: Subnetwork, model: nn.Module, inputs: Dict[str, torch.Tensor], tokenizer,
                     lines: Sequence[str] = (), extra_rows: Sequence[Tuple[str, str]] = ()) -> str:
    """The whole page (module doc). ``model``: the objective-wrapped original (no hooks attached);
    ``lines``: the summary lines (:func:`hookchains.workflow.text.text_summary`); ``extra_rows``: further
    (label, value) rows of the summary table (e.g. the sliced module's size)."""
    layers = _table(["Layer", "Gate", "Heads kept", "MLP neurons kept"], layer_rows(sub),
                    "Kept attention heads (indices) and MLP neurons per layer; a removed layer passes its input through")
    words = top_words(sub, model, inputs, tokenizer)
    neuron_rows = [(label, f"N{n}", ", ".join(f"{w} ({a:.2f})" for w, a in pairs))
                   for label, shown in words.items() for n, pairs in shown]
    neurons = _table(["Layer", "Neuron", "Words of the task that activate it most (activation)"], neuron_rows,
                     f"Up to {NEURONS_PER_LAYER} kept neurons per layer, highest score first")
    return document(Sprites(), [("summary", "Sub-network", _summary(sub, lines, extra_rows)),
                                ("layers", "Heads and neurons per layer", layers),
                                ("neurons", "What the kept neurons respond to", neurons)])


def token_grid_html(words: Sequence[str], kept: torch.Tensor, labels: Sequence[str], attribution: torch.Tensor,
                    caption: str) -> str:
    """One sentence's token-by-layer grid: a row per layer (``kept``: layers x words, bool), pruned words
    greyed and struck through, then a row with the first token's Eq. 10 attribution over the words
    (``attribution``: words, shaded by value relative to the largest over the other words, since the
    first token's share of itself dominates).

    Example:
        >>> '<s>' in token_grid_html(["[CLS]", "rain"], torch.tensor([[True, False]]), ["L1"],
        ...                          torch.tensor([0.7, 0.3]), "sentence 1")
        True
    """
    head = "".join(f'<th scope="col">{html.escape(w)}</th>' for w in words)
    rows = []
    for label, row in zip(labels, kept.tolist()):
        cells = "".join(f"<td>{html.escape(w)}</td>" if k else
                        f'<td style="color:#bbb;background:#f3f3f3"><s>{html.escape(w)}</s></td>'
                        for w, k in zip(words, row))
        rows.append(f'<tr><th scope="row">{html.escape(label)}</th>{cells}</tr>')
    top = max(float(attribution[1:].max()) if len(attribution) > 1 else 0.0, 1e-12)  # the words, not [CLS] itself
    shade = "".join(f'<td style="background:rgba(200,60,0,{min(float(a) / top, 1.0):.2f})">{float(a):.2f}</td>'
                    for a in attribution)
    rows.append(f'<tr><th scope="row">[CLS] draws on (Eq. 10)</th>{shade}</tr>')
    return (f"<table><caption>{html.escape(caption)}</caption><tr><th scope=\"col\">Layer</th>{head}</tr>"
            + "".join(rows) + "</table>")


def text_token_report_html(tsub: TokenSubnetwork, model: nn.Module, inputs: Dict[str, torch.Tensor], tokenizer,
                           lines: Sequence[str] = ()) -> str:
    """The page of a text token run: the summary and fidelity, then per sentence its token-by-layer grid
    and the first token's Eq. 10 attribution after the last layer (:func:`token_grid_html`)."""
    attribution = text_token_attribution(model, inputs, tsub)[:, -1, 0]  # N x T: the first token, last layer
    labels = [site.label for site in tsub.sites]
    valid = inputs["attention_mask"].bool().cpu()
    texts = tsub.task.get("texts") or [""] * len(valid)
    grids = []
    for n in range(len(valid)):
        real = torch.nonzero(valid[n]).flatten()
        words = tokenizer.convert_ids_to_tokens(inputs["input_ids"][n, real].tolist())
        kept = tsub.masks[n][:, real]
        grids.append(token_grid_html(words, kept, labels, attribution[n, real],
                                     f"Sentence {n + 1}: {texts[n]} ({int(kept.sum())}/{kept.numel()} token slots kept)"))
    return document(Sprites(), [("summary", "Token sub-network", _summary(tsub, lines, [])),
                                ("tokens", "Tokens kept at each layer, and what the first token draws on",
                                 "".join(grids))])
