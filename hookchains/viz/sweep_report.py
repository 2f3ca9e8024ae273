"""The summary of a sweep -- many NeuroChains case studies -- as headline numbers, plots and one HTML page.

The paper's quantitative analyses (section 4.2, appendix A.3) summarise hundreds of case studies
(783 for Fig. 2, 3 and 11; 1500 for Fig. 1). This module draws the same summaries from a sweep's
per-task records (one JSON object per task, as ``hookchains sweep`` writes them):

* :func:`headline`: sub-network size (all scored units, and conv filters / conv layers only as the
  paper counts them), fidelity (KL shares at the paper's 0.8 and 1.5 marks, per task and per image),
  the same shares for the magnitude / random baselines, faithfulness (the paper's binned, pooled
  degradation per score interval; per-network Spearman of score vs degradation, also over untied
  filters, beside a gradient x activation baseline), held-out accuracy, robustness (ground-truth
  probability, accuracy, attack success rate) and the random-weights control, next to :data:`PAPER`,
  the figures the paper states, with notes where this sweep's setting differs from the paper's;
* one ``plot_<name>(records, path)`` per figure: size (Fig. 1 top), fidelity, baselines (Fig. 3),
  faithfulness (Fig. 2), quotient (Fig. 11 left), faithfulness of the sign (Fig. 11 right),
  robustness (Fig. 12) and held-out accuracy (Fig. 9, per task);
* :func:`write_sweep_report`: the plots as PNG files, ``headline.json`` and a self-contained
  ``report.html`` (images embedded as base64, the Content-Security-Policy of
  :mod:`hookchains.viz.report`, no script).

A record may lack any evaluation that was switched off (``held_out``, ``faithfulness``,
``baselines``, ``robustness``); every number, plot and table cell that needs it is then left out.
Plots use matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), never pyplot, so the caller's
global figure state and backend are untouched.

Example:
    >>> records = [json.loads(line) for line in open("sweep/tasks.jsonl")]  # doctest: +SKIP
    >>> write_sweep_report("sweep", records, {"model": "benchmarks.digits:build", "tasks": 45})  # doctest: +SKIP
    PosixPath('sweep/report.html')
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hookchains.core.io import PathLike, atomic_write_bytes, write_json
from hookchains.viz.html import Sprites, document

__all__ = ["PAPER", "PAPER_SETTING", "headline", "score_bins", "plot_size", "plot_fidelity", "plot_baselines", "plot_faithfulness",
           "plot_quotients", "plot_sign", "plot_robustness", "plot_held_out", "write_sweep_report"]

Record = Mapping[str, Any]
KL_GOOD, KL_BAD = 0.8, 1.5
"""The paper's KL marks (section 4.2, Fig. 3): shares of cases with KL <= 0.8 and with KL >= 1.5."""
BASELINES = ("magnitude", "random")
ATTACKS = ("clean", "fgsm", "pgd")
NETWORKS = {"original": "original model", "subnetwork": "sub-network",
            "transfer": "sub-network, attacks made on the original"}
_DPI = 110

PAPER: Mapping[str, Any] = {
    "case_studies": {"section_4_2": 1500, "fig2_3_11": 783},  # Fig. 1 and the text: 1500; Fig. 2, 3, 11: 783
    "vgg19": {
        "filters_total": 5504, "filters_total_stated": 4480,  # conv filters of the architecture / the paper's text
        "filters_kept_mean": 157, "filters_kept_std": 43,  # section 4.2 and A.5 (783 sub-networks)
        "filters_kept_case_studies": (107, 158), "layers_kept_case_studies": (7, 10), "layers_total": 16,
        "baseline_filters": 180,  # magnitude / random pruning budget (section 4.2)
        "kl_le_0.8": {"neurochains": 0.543, "magnitude": 0.388, "random": 0.211},
        "kl_ge_1.5": {"neurochains": 0.093, "magnitude": 0.194, "random": 0.388},
        "most_keep_at_most": 0.05,  # "most sub-networks only retain <= 5 %" (Fig. 1)
    },
    "resnet50": {
        "filters_total": 26560,
        "filters_kept_case_studies": (77, 133), "layers_kept_case_studies": (13, 16),
        "layers_total": 53, "layers_total_stated": 67,  # conv layers of the architecture / the paper's captions
        "most_keep_at_most": 0.01,  # "<= 1 %" (Fig. 1)
    },
}
"""What the paper states (VGG-19 and ResNet-50 on ImageNet; section 4.2, appendix A.3 and A.5): the
case-study ranges come from the captions of Fig. 4-6, 10, 17-19; the KL shares are "cases" over
783 x 20 samples (Fig. 3). The paper gives no number for faithfulness (Fig. 2, 11 right: "strongly
and positively correlated"), held-out accuracy (Fig. 9) or robustness (Fig. 12): those are plots only.
Totals are the architectures' conv filters and conv layers (VGG-19: 5,504 filters in 16 conv layers,
plus 8,192 fully-connected units; ResNet-50: 26,560 filters in 53 conv layers); the paper's "4,480"
VGG-19 filters and "/67" ResNet-50 layers (``*_stated``) cannot be reproduced from the architectures
and are never printed as a total."""
PAPER_SETTING = {"outputs": 1000, "kept_percent_at_most": 5.0}
"""The paper's setting (ImageNet's 1000 classes; VGG-19 sub-networks keep < 5 % of the conv filters)."""


# ------------------------------------------------------------------------------------------ numbers
def _get(record: Record, *keys: str) -> Any:
    """``record[k1][k2]...``, or None where any level is missing."""
    for key in keys:
        if not isinstance(record, Mapping) or key not in record:
            return None
        record = record[key]
    return record


def _numbers(records: Sequence[Record], *keys: str) -> np.ndarray:
    """The finite numbers at ``keys`` across records (missing and NaN ones left out)."""
    values = [_get(r, *keys) for r in records]
    return np.array([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], dtype=float)


def _pooled(records: Sequence[Record], *keys: str) -> np.ndarray:
    """The lists at ``keys`` of every record, concatenated (e.g. every image's quotient)."""
    lists = [_get(r, *keys) for r in records]
    pooled = np.array([v for values in lists if values for v in values], dtype=float)
    return pooled[np.isfinite(pooled)]


def _pairs(records: Sequence[Record], x: str, y: str) -> Tuple[np.ndarray, np.ndarray]:
    """Pooled finite (faithfulness[x], faithfulness[y]) pairs of the records where both lists match."""
    xs, ys = [], []
    for record in records:
        a, b = _get(record, "faithfulness", x), _get(record, "faithfulness", y)
        if a and b and len(a) == len(b):
            xs.extend(a)
            ys.extend(b)
    xs, ys = np.array(xs, dtype=float), np.array(ys, dtype=float)
    finite = np.isfinite(xs) & np.isfinite(ys)
    return xs[finite], ys[finite]


def _largest(values: np.ndarray) -> Optional[float]:
    """The largest value, None when there is none (JSON null: e.g. totals missing from every record)."""
    return float(values.max()) if values.size else None


def _mean(values: np.ndarray) -> Optional[float]:
    """The mean, None when there are no values."""
    return float(values.mean()) if values.size else None


def _kl_shares(kls: np.ndarray, unit: str = "tasks") -> Dict[str, float]:
    """Count and mean of ``kls`` and the shares at the paper's marks (``unit``: what one value is)."""
    return {unit: int(kls.size), "kl_mean": float(kls.mean()), "kl_le_0.8": float((kls <= KL_GOOD).mean()),
            "kl_ge_1.5": float((kls >= KL_BAD).mean())}


def _with_per_image(shares: Dict[str, Any], records: Sequence[Record], *keys: str) -> Dict[str, Any]:
    """``shares`` plus ``per_image``: the same shares over every image's KL (the paper's count), when known."""
    kls = _pooled(records, *keys, "kls")
    return {**shares, "per_image": _kl_shares(kls, "images")} if kls.size else shares


_CONV_COUNTS = ("conv_filters", "conv_layers", "linear_units")
"""Paper-comparable counts of ``Subnetwork.counts()``: conv filters and conv layers only, FC units apart."""


def _conv_size(records: Sequence[Record]) -> Dict[str, Optional[float]]:
    """Mean kept and total of each paper-comparable count (empty for records without them)."""
    result: Dict[str, Optional[float]] = {}
    for name in _CONV_COUNTS:
        if _numbers(records, "size", f"{name}_kept").size:
            result.update({f"{name}_kept_mean": _mean(_numbers(records, "size", f"{name}_kept")),
                           f"{name}_total": _largest(_numbers(records, "size", f"{name}_total"))})
    return result


def _size(records: Sequence[Record]) -> Dict[str, Optional[float]]:
    kept = _numbers(records, "size", "filters_kept")
    shares = [r["size"]["filters_kept"] / r["size"]["filters_total"] for r in records
              if _get(r, "size", "filters_total") and _get(r, "size", "filters_kept") is not None]
    return {"filters_kept_mean": float(kept.mean()), "filters_kept_std": float(kept.std()),
            "filters_kept_min": float(kept.min()), "filters_kept_max": float(kept.max()),
            "filters_kept_percent": 100 * float(np.mean(shares)) if shares else None,
            "filters_total": _largest(_numbers(records, "size", "filters_total")),
            "layers_kept_mean": _mean(_numbers(records, "size", "layers_kept")),
            "layers_total": _largest(_numbers(records, "size", "layers_total")), **_conv_size(records)}


def _fidelity(records: Sequence[Record]) -> Dict[str, Optional[float]]:
    agree = [r["fidelity"]["agree"] == r["fidelity"].get("images") for r in records
             if _get(r, "fidelity", "agree") is not None]
    counted = [r for r in records if _get(r, "fidelity", "negative_quotients") is not None]
    images = _numbers(counted, "fidelity", "images").sum()
    negative = _numbers(counted, "fidelity", "negative_quotients").sum()
    shares = {**_kl_shares(_numbers(records, "fidelity", "kl")), "all_agree": float(np.mean(agree)) if agree else None,
              "negative_q_images": float(negative / images) if images else None}
    return _with_per_image(shares, records, "fidelity")


def score_bins(scores: np.ndarray, degradation: np.ndarray, intervals: int = 8) -> List[Dict[str, float]]:
    """The paper's Fig. 2 as numbers: the scores' range cut into ``intervals`` equal intervals, and for
    each interval holding a filter its bounds, filter count and mean degradation.

    Example:
        >>> score_bins(np.array([0.1, 0.2, 1.0]), np.array([0.0, 0.2, 0.4]), intervals=2)[1]["degradation"]
        0.4
    """
    edges = np.linspace(scores.min(), scores.max() + 1e-9, intervals + 1)
    which = np.clip(np.digitize(scores, edges) - 1, 0, intervals - 1)
    return [{"low": float(edges[i]), "high": float(edges[i + 1]), "filters": int((which == i).sum()),
             "degradation": float(degradation[which == i].mean())} for i in range(intervals) if (which == i).any()]


def _faithfulness(records: Sequence[Record]) -> Dict[str, Any]:
    rho = _numbers(records, "faithfulness", "spearman")
    result: Dict[str, Any] = {"tasks": int(rho.size), "spearman_mean": float(rho.mean()),
                              "spearman_median": float(np.median(rho)), "spearman_positive": float((rho > 0).mean())}
    for key in ("spearman_untied", "spearman_taylor"):
        values = _numbers(records, "faithfulness", key)
        if values.size:
            result.update({f"{key}_median": float(np.median(values)), f"{key}_tasks": int(values.size)})
    scores, degradation = _pairs(records, "scores", "degradation")
    if scores.size:
        result["bins"] = score_bins(scores, degradation)
    return result


def _held_out(records: Sequence[Record]) -> Dict[str, float]:
    original = _numbers(records, "held_out", "accuracy_original")
    return {"tasks": int(original.size), "accuracy_original": float(original.mean()),
            "accuracy_subnetwork": _mean(_numbers(records, "held_out", "accuracy_subnetwork"))}


def _attack_counts(record: Record, network: str, attack: str) -> np.ndarray:
    """[images, correct under ``attack``, correct when clean, correct when clean and wrong under ``attack``]
    of one record (zeros when unknown); the transfer network's clean images are the sub-network's."""
    correct = _get(record, "robustness", "correct") or {}
    clean = (correct.get(network) or {}).get("clean") or (correct.get("subnetwork") or {}).get("clean")
    attacked = (correct.get(network) or {}).get(attack)
    if not attacked or not clean or len(clean) != len(attacked):
        return np.zeros(4, dtype=int)
    return np.array([len(attacked), sum(map(bool, attacked)), sum(map(bool, clean)),
                     sum(bool(c) and not a for c, a in zip(clean, attacked))])


def _robustness(records: Sequence[Record]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Per network and attack, over every image of every task: the mean ground-truth probability,
    the accuracy, and the attack success rate (images correct when clean that the attack makes wrong,
    over the images correct when clean)."""
    result: Dict[str, Dict[str, Dict[str, float]]] = {"probability": {}, "accuracy": {}, "attack_success": {}}
    for network in NETWORKS:
        means = {attack: float(p.mean()) for attack in ATTACKS
                 if (p := _pooled(records, "robustness", network, attack)).size}
        counts = {attack: sum((_attack_counts(r, network, attack) for r in records), np.zeros(4, dtype=int))
                  for attack in ATTACKS}
        for key, values in (("probability", means),
                            ("accuracy", {a: float(c[1] / c[0]) for a, c in counts.items() if c[0]}),
                            ("attack_success", {a: float(c[3] / c[2]) for a, c in counts.items()
                                                if a != "clean" and c[2]})):
            if values:
                result[key][network] = values
    return {k: v for k, v in result.items() if v}


def _random_weights(records: Sequence[Record]) -> Dict[str, Optional[float]]:
    """Means over tasks of the random-weights control beside the real sub-networks' (Adebayo et al.)."""
    real = [r for r in records if _get(r, "random_weights", "overlap") is not None]
    return {"tasks": len(real),
            "filters_kept_mean": _mean(_numbers(real, "random_weights", "size", "filters_kept")),
            "real_filters_kept_mean": _mean(_numbers(real, "size", "filters_kept")),
            "kl_mean": _mean(_numbers(real, "random_weights", "fidelity", "kl")),
            "real_kl_mean": _mean(_numbers(real, "fidelity", "kl")),
            "shared_mean": _mean(_numbers(real, "random_weights", "overlap", "shared")),
            "shared_by_chance_mean": _mean(_numbers(real, "random_weights", "overlap", "shared_by_chance")),
            "jaccard_mean": _mean(_numbers(real, "random_weights", "overlap", "jaccard")),
            "output_spread_mean": _mean(_numbers(real, "random_weights", "output_spread", "random")),
            "real_output_spread_mean": _mean(_numbers(real, "random_weights", "output_spread", "real"))}


def _notes(result: Mapping[str, Any]) -> List[str]:
    """Where this sweep's setting differs from the paper's (the per-image KL shares are compared anyway)."""
    notes = []
    outputs = _get(result, "fidelity", "outputs")
    if outputs is not None and outputs != PAPER_SETTING["outputs"]:
        notes.append(f"the model has {outputs:.0f} outputs where the paper's ImageNet models have "
                     f"{PAPER_SETTING['outputs']}: KL values are not on the same scale")
    size = result.get("size", {})
    kept, total = size.get("conv_filters_kept_mean"), size.get("conv_filters_total")
    percent = 100 * kept / total if kept is not None and total else size.get("filters_kept_percent")
    if percent is not None and percent > PAPER_SETTING["kept_percent_at_most"]:
        notes.append(f"sub-networks keep {percent:.1f} % of the conv filters where the paper's keep "
                     f"< {PAPER_SETTING['kept_percent_at_most']:.0f} %")
    return notes


def headline(records: Sequence[Record]) -> Dict[str, Any]:
    """The sweep's headline numbers (shares are fractions in [0, 1]); sections without data are left out.

    Keys: ``tasks``; ``size`` (filters kept mean / std / min / max, mean % of the model's filters,
    layers kept mean; ``conv_filters_*``, ``conv_layers_*``, ``linear_units_*``: the paper-comparable
    counts); ``fidelity`` (mean KL, shares of tasks with KL <= 0.8 and >= 1.5, share of tasks whose
    top-1 agrees on every image, share of images with Q < 0, the model's ``outputs``, and
    ``per_image``: the KL shares over every image, which is how the paper counts Fig. 3's "cases");
    ``baselines`` (per method: the same KL shares per task and ``per_image``, the mean filters kept,
    the protocol: allocation, gates, mean fine-tuning steps); ``faithfulness`` (mean / median
    Spearman of score vs degradation, share of tasks where it is positive, median Spearman over
    untied filters and of the Taylor importance, ``bins``: the pooled Fig. 2 bars of
    :func:`score_bins`); ``held_out`` (mean accuracy of the original and of the sub-network);
    ``robustness`` (per network and attack: mean ground-truth ``probability``, ``accuracy``,
    ``attack_success``; Fig. 12); ``random_weights`` (the control's size, KL and overlap beside the
    real sub-networks'); ``notes`` (where the setting differs from the paper's).

    Example:
        >>> headline([{"size": {"filters_kept": 10, "filters_total": 100, "layers_kept": 3},
        ...            "fidelity": {"kl": 0.5, "agree": 20, "images": 20, "negative_quotients": 0}}])["fidelity"]
        {'tasks': 1, 'kl_mean': 0.5, 'kl_le_0.8': 1.0, 'kl_ge_1.5': 0.0, 'all_agree': 1.0, 'negative_q_images': 0.0}
    """
    result: Dict[str, Any] = {"tasks": len(records)}
    if _numbers(records, "size", "filters_kept").size:
        result["size"] = _size(records)
    if _numbers(records, "fidelity", "kl").size:
        result["fidelity"] = _fidelity(records)
        outputs = _largest(_numbers(records, "fidelity", "outputs"))
        if outputs is not None:
            result["fidelity"]["outputs"] = outputs
    baselines = {name: _with_per_image({**_kl_shares(kls), **_protocol(records, name),
                                        "filters_kept_mean": _mean(_numbers(records, "baselines", name, "filters_kept"))},
                                       records, "baselines", name)
                 for name in BASELINES if (kls := _numbers(records, "baselines", name, "kl")).size}
    if baselines:
        result["baselines"] = baselines
    if _numbers(records, "faithfulness", "spearman").size:
        result["faithfulness"] = _faithfulness(records)
    if _numbers(records, "held_out", "accuracy_original").size:
        result["held_out"] = _held_out(records)
    robustness = _robustness(records)
    if robustness:
        result["robustness"] = robustness
    if any(_get(r, "random_weights", "overlap") for r in records):
        result["random_weights"] = _random_weights(records)
    notes = _notes(result)
    if notes:
        result["notes"] = notes
    return result


def _protocol(records: Sequence[Record], name: str) -> Dict[str, Any]:
    """The baseline protocol(s) of the records: allocations and gates used, mean steps, and how many tasks
    could not run it (``skipped``: fewer filters kept than layers); empty if unknown."""
    protocols = [p for r in records if (p := _get(r, "baselines", name, "protocol"))]
    if not protocols:
        return {}
    return {"allocation": sorted({p["allocation"] for p in protocols}), "gates": sorted({p["gates"] for p in protocols}),
            "steps_mean": float(np.mean([p["steps"] for p in protocols])),
            "skipped": sum(1 for r in records if _get(r, "baselines", name, "error"))}


# ------------------------------------------------------------------------------------------ plots
def _figure(columns: int = 1) -> Tuple[Figure, List[Any]]:
    """A pyplot-free figure with ``columns`` side-by-side axes."""
    figure = Figure(figsize=(4.2 * columns + 1.2, 3.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(np.atleast_1d(figure.subplots(1, columns)))


def _save(figure: Figure, path: PathLike) -> Path:
    """The figure as a PNG at ``path``, written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return atomic_write_bytes(path, buffer.getvalue())


def _histogram(values: np.ndarray, path: PathLike, xlabel: str, title: str,
               marks: Sequence[Tuple[float, str]] = (), bins: Any = 20) -> Path:
    """One histogram of ``values`` (count of tasks / images) with labelled vertical marks."""
    figure, (ax,) = _figure()
    ax.hist(values, bins=bins, color="#4477aa", edgecolor="white")
    for x, label in marks:
        ax.axvline(x, color="#cc3311", linestyle="--", label=label)
    if marks:
        ax.legend(fontsize="small")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    return _save(figure, path)


def plot_size(records: Sequence[Record], path: PathLike) -> Optional[Path]:
    """Histogram of the filters kept per task (paper Fig. 1 top); None without size data.

    Example: ``plot_size(records, "plots/size.png")``."""
    kept = _numbers(records, "size", "filters_kept")
    if not kept.size:
        return None
    return _histogram(kept, path, "filters kept", f"Sub-network size ({kept.size} tasks)",
                      [(kept.mean(), f"mean {kept.mean():.0f}")])


def plot_fidelity(records: Sequence[Record], path: PathLike) -> Optional[Path]:
    """Histogram of each task's mean KL(original ‖ sub-network) with the paper's 0.8 and 1.5 marks.

    Example: ``plot_fidelity(records, "plots/fidelity.png")``."""
    kls = _numbers(records, "fidelity", "kl")
    if not kls.size:
        return None
    return _histogram(kls, path, "mean KL per task (nats)", f"Fidelity ({kls.size} tasks)",
                      [(KL_GOOD, f"KL = {KL_GOOD}"), (KL_BAD, f"KL = {KL_BAD}")])


def plot_baselines(records: Sequence[Record], path: PathLike) -> Optional[Path]:
    """NeuroChains vs magnitude vs random pruning: per-task KL histograms on shared bins (Fig. 3).

    Example: ``plot_baselines(records, "plots/baselines.png")``."""
    series = {"NeuroChains": _numbers(records, "fidelity", "kl"),
              **{name: _numbers(records, "baselines", name, "kl") for name in BASELINES}}
    series = {name: kls for name, kls in series.items() if kls.size}
    if len(series) < 2 or "NeuroChains" not in series:
        return None
    top = max(KL_BAD, max(float(k.max()) for k in series.values()))
    figure, (ax,) = _figure()
    ax.hist(list(series.values()), bins=np.linspace(0, top, 16), label=list(series))
    ax.axvline(KL_GOOD, color="grey", linestyle="--")
    ax.axvline(KL_BAD, color="grey", linestyle=":")
    ax.legend(fontsize="small")
    ax.set(xlabel="mean KL per task (nats)", ylabel="tasks", title="Fidelity of NeuroChains vs baselines")
    return _save(figure, path)


def plot_faithfulness(records: Sequence[Record], path: PathLike, intervals: int = 8) -> Optional[Path]:
    """Mean fidelity degradation after removing one filter, per interval of its score (Fig. 2).

    All tasks' (score, degradation) pairs are pooled; the scores' range is cut into ``intervals``
    equal intervals, each bar is the mean degradation of the filters in it, labelled with their count.

    Example: ``plot_faithfulness(records, "plots/faithfulness.png")``."""
    scores, degradation = _pairs(records, "scores", "degradation")
    if not scores.size:
        return None
    bins = score_bins(scores, degradation, intervals)
    figure, (ax,) = _figure()
    bars = ax.bar(range(len(bins)), [b["degradation"] for b in bins], color="#4477aa")
    ax.bar_label(bars, labels=[f"n={b['filters']}" for b in bins], fontsize="x-small")
    ax.set_xticks(range(len(bins)), [f"{b['low']:.2f}–{b['high']:.2f}" for b in bins], rotation=45,
                  fontsize="small")
    ax.set(xlabel="score of the removed filter", ylabel="mean degradation",
           title=f"Faithfulness ({scores.size} filters)")
    return _save(figure, path)


def plot_quotients(records: Sequence[Record], path: PathLike) -> Optional[Path]:
    """Histogram of every image's quotient Q of Eq. 9 (Fig. 11 left); Q < 0: the prediction changed.
    Values beyond [-1, 2] are counted in the end bins.

    Example: ``plot_quotients(records, "plots/quotients.png")``."""
    q = _pooled(records, "fidelity", "quotients")
    if not q.size:
        return None
    return _histogram(np.clip(q, -1, 2), path, "quotient Q (clipped to [-1, 2])",
                      f"Quotient ({q.size} images, {int((q < 0).sum())} with Q < 0)", [(0.0, "Q = 0")],
                      bins=np.linspace(-1, 2, 31))


def plot_sign(records: Sequence[Record], path: PathLike) -> Optional[Path]:
    """Score of a removed filter vs the share of images whose prediction then changes (Fig. 11 right).

    Example: ``plot_sign(records, "plots/sign.png")``."""
    scores, share = _pairs(records, "scores", "negative_share")
    if not scores.size:
        return None
    figure, (ax,) = _figure()
    ax.scatter(scores, share, s=10, alpha=0.4, color="#4477aa", edgecolors="none")
    ax.set(xlabel="score of the removed filter", ylabel="share of images with Q < 0",
           title=f"Faithfulness of the sign ({scores.size} filters)")
    return _save(figure, path)


def plot_robustness(records: Sequence[Record], path: PathLike) -> Optional[Path]:
    """Ground-truth probability under no attack, FGSM and PGD, one panel per network (Fig. 12).

    Example: ``plot_robustness(records, "plots/robustness.png")``."""
    panels = {network: {attack: p for attack in ATTACKS if (p := _pooled(records, "robustness", network, attack)).size}
              for network in NETWORKS}
    panels = {network: series for network, series in panels.items() if series}
    if not panels:
        return None
    figure, axes = _figure(len(panels))
    for ax, (network, series) in zip(axes, panels.items()):
        ax.hist(list(series.values()), bins=np.linspace(0, 1, 11), label=[a.upper() for a in series])
        ax.legend(fontsize="small")
        ax.set(xlabel="ground-truth probability", ylabel="images", title=NETWORKS[network])
    return _save(figure, path)


def plot_held_out(records: Sequence[Record], path: PathLike) -> Optional[Path]:
    """Held-out accuracy of the sub-network vs the original model, one point per task (cf. Fig. 9).

    Example: ``plot_held_out(records, "plots/held_out.png")``."""
    pairs = [(r["held_out"]["accuracy_original"], r["held_out"]["accuracy_subnetwork"]) for r in records
             if _get(r, "held_out", "accuracy_original") is not None
             and _get(r, "held_out", "accuracy_subnetwork") is not None]
    if not pairs:
        return None
    original, sub = np.array(pairs, dtype=float).T
    figure, (ax,) = _figure()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="equal accuracy")
    ax.scatter(original, sub, s=18, alpha=0.5, color="#4477aa", edgecolors="none", label="task")
    ax.legend(fontsize="small")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="original model", ylabel="sub-network",
           title=f"Held-out accuracy ({len(pairs)} tasks)")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------ HTML
_PLOTS: Tuple[Tuple[str, Callable[[Sequence[Record], PathLike], Optional[Path]], str, str, str], ...] = (
    ("size", plot_size, "Sub-network size", "Histogram of the filters kept per task",
     "Each bar counts the tasks whose thresholded sub-network kept that many filters (paper Fig. 1 top); "
     "the dashed line is the mean."),
    ("fidelity", plot_fidelity, "Fidelity", "Histogram of the mean KL divergence per task",
     "Each bar counts the tasks whose sub-network reached that mean KL(original ‖ sub-network) on the task's "
     "images; left of the 0.8 line is the paper's good fidelity, right of 1.5 its poor fidelity."),
    ("baselines", plot_baselines, "NeuroChains vs magnitude and random pruning",
     "Grouped histogram of the per-task KL of NeuroChains and of the baselines",
     "Like the paper's Fig. 3: the same bins for each method; more mass on the left (small KL) means the "
     "method preserves the original outputs better (dashed: KL 0.8, dotted: KL 1.5)."),
    ("faithfulness", plot_faithfulness, "Faithfulness", "Bar chart of mean degradation per score interval",
     "Like the paper's Fig. 2: every kept filter of every task is removed in turn; a bar is the mean drop of "
     "the original class's probability for the filters whose score falls in that interval (n: how many). "
     "Faithful scores give taller bars to the right."),
    ("quotients", plot_quotients, "Quotient Q", "Histogram of the quotient Q of every image",
     "Like the paper's Fig. 11 left: Q (Eq. 9) near 1 keeps the original margin, Q < 0 (left of the line) "
     "means the sub-network changed the image's prediction."),
    ("sign", plot_sign, "Faithfulness of the sign", "Scatter of filter score vs share of images with Q < 0",
     "Like the paper's Fig. 11 right: a point per removed filter; if scores are faithful, removing a "
     "higher-scored filter flips more predictions (points rise to the right)."),
    ("robustness", plot_robustness, "Robustness", "Histograms of the ground-truth probability under attacks",
     "Like the paper's Fig. 12: the probability of each image's true class without attack, under FGSM and "
     "under PGD, for the original model and the sub-network; mass near 1 means robust."),
    ("held_out", plot_held_out, "Held-out accuracy", "Scatter of sub-network vs original held-out accuracy",
     "A point per task, on images of the task's classes not used for fitting (cf. paper Fig. 9): points on "
     "the dashed line generalise as well as the original model, points below lose accuracy."),
)
"""(file name, plot function, heading, alt text, caption saying how to read the plot)."""


def _pct(share: Optional[float]) -> str:
    """A share in [0, 1] as a percentage, "—" when unknown."""
    return "—" if share is None else f"{100 * share:.1f} %"


def _size_rows(numbers: Mapping[str, Any]) -> List[Tuple[str, str, str]]:
    size = numbers.get("size")
    if not size:
        return []
    vgg, resnet = PAPER["vgg19"], PAPER["resnet50"]
    of_total = _cell(size["filters_total"], " of {:.0f}", "") + _cell(size["filters_kept_percent"], " ({:.1f} %)", "")
    layers = _cell(size["layers_kept_mean"], "{:.1f}") + _cell(size["layers_total"], " of {:.0f}", "")
    rows = [("Filters kept (all scored units), mean ± std",
             f"{size['filters_kept_mean']:.1f} ± {size['filters_kept_std']:.1f}{of_total}",
             f"VGG-19: {vgg['filters_kept_mean']} ± {vgg['filters_kept_std']} of {vgg['filters_total']:,} conv filters "
             f"({PAPER['case_studies']['fig2_3_11']} tasks); ResNet-50 case studies: "
             "{}–{} of {:,}".format(*resnet["filters_kept_case_studies"], resnet["filters_total"])),
            ("Filters kept, range", f"{size['filters_kept_min']:.0f}–{size['filters_kept_max']:.0f}",
             "VGG-19 case studies: {}–{}".format(*vgg["filters_kept_case_studies"])),
            ("Layers kept, mean", layers,
             "case studies: VGG-19 {}–{} of {}, ResNet-50 {}–{} of {} conv layers".format(
                 *vgg["layers_kept_case_studies"], vgg["layers_total"], *resnet["layers_kept_case_studies"],
                 resnet["layers_total"]))]
    if size.get("conv_filters_kept_mean") is not None:
        rows.append(("Conv filters kept, mean (conv layers kept, mean)",
                     f"{size['conv_filters_kept_mean']:.1f} of {size['conv_filters_total']:.0f} "
                     f"({_cell(size.get('conv_layers_kept_mean'), '{:.1f}')} of {_cell(size.get('conv_layers_total'), '{:.0f}')})",
                     "the paper counts conv filters and conv layers; its stated VGG-19 total and ResNet-50 layer "
                     "total do not follow from the architectures (totals here are the architectures')"))
    if size.get("linear_units_total"):
        rows.append(("Fully-connected units kept, mean (counted apart)",
                     f"{size['linear_units_kept_mean']:.1f} of {size['linear_units_total']:.0f}", "—"))
    return rows


def _kl_rows(who: str, shares: Mapping[str, Any], method: str) -> List[Tuple[str, str, str]]:
    """Rows of the shares of tasks, and of images, with KL <= 0.8 and >= 1.5; the paper's (Fig. 3,
    VGG-19) stand only next to the per-image share, which is how the paper counts."""
    paper = PAPER["vgg19"]
    rows = []
    for mark, key in (("≤ 0.8", "kl_le_0.8"), ("≥ 1.5", "kl_ge_1.5")):
        rows.append((f"{who}: tasks with KL {mark}", _pct(shares[key]), "— (the paper counts images)"))
        if "per_image" in shares:
            rows.append((f"{who}: images with KL {mark}", _pct(shares["per_image"][key]),
                         f"{_pct(paper[key][method])} (VGG-19)"))
    return rows


def _fidelity_rows(numbers: Mapping[str, Any]) -> List[Tuple[str, str, str]]:
    rows = []
    if "fidelity" in numbers:
        fid = numbers["fidelity"]
        rows += [("Mean KL(original ‖ sub-network)", f"{fid['kl_mean']:.3f}", "—"),
                 *_kl_rows("NeuroChains", fid, "neurochains"),
                 ("Tasks with top-1 agreement on every image", _pct(fid["all_agree"]), "—"),
                 ("Images with Q < 0 (prediction changed)", _pct(fid["negative_q_images"]),
                  "“most samples keep the original predicted label” (Fig. 11)")]
    for name, base in numbers.get("baselines", {}).items():
        protocol = (f" ({'/'.join(base['allocation'])}, gates {'/'.join(base['gates'])}, "
                    f"{base['steps_mean']:.0f} fine-tuning steps)") if "allocation" in base else ""
        rows += [*_kl_rows(f"{name.capitalize()} pruning", base, name),
                 (f"{name.capitalize()} pruning: filters kept, mean{protocol}", _cell(base["filters_kept_mean"], "{:.1f}"),
                  f"{PAPER['vgg19']['baseline_filters']} (VGG-19, proportional, scores fine-tuned)")]
    return rows


def _bins_text(bins: Sequence[Mapping[str, float]]) -> str:
    """The Fig. 2 bars as text: mean degradation per score interval, low to high."""
    return " → ".join(f"{b['degradation']:.4f}" for b in bins)


def _faithfulness_rows(faith: Mapping[str, Any]) -> List[Tuple[str, str, str]]:
    rows = [("Mean degradation per score interval (pooled, low → high score)",
             _bins_text(faith["bins"]) if "bins" in faith else "—", "rises with the score (Fig. 2, plot only)"),
            ("Spearman(score, degradation) per network, mean / median",
             f"{faith['spearman_mean']:.2f} / {faith['spearman_median']:.2f}",
             "“strongly and positively correlated” (Fig. 2, no number)"),
            ("Tasks with Spearman > 0", _pct(faith["spearman_positive"]), "—")]
    if "spearman_untied_median" in faith:
        rows.append(("Spearman over untied filters (score below the top), median",
                     f"{faith['spearman_untied_median']:.2f} ({faith['spearman_untied_tasks']} tasks)", "—"))
    if "spearman_taylor_median" in faith:
        rows.append(("Gradient × activation (Taylor) importance: Spearman with degradation, median",
                     f"{faith['spearman_taylor_median']:.2f}", "— (a baseline the scores should match or beat)"))
    return rows


def _robustness_rows(robust: Mapping[str, Any]) -> List[Tuple[str, str, str]]:
    rows = []
    for key, what in (("probability", "Ground-truth probability"), ("accuracy", "Accuracy"),
                      ("attack_success", "Attack success rate")):
        for network, values in robust.get(key, {}).items():
            form = "{:.2f}" if key == "probability" else "{:.1%}"
            rows.append((f"{what}, {NETWORKS[network]}: {' / '.join(a.upper() for a in values)}",
                         " / ".join(form.format(v) for v in values.values()), "Fig. 12 (plot only)"))
    return rows


def _control_rows(control: Mapping[str, Any]) -> List[Tuple[str, str, str]]:
    return [("Random-weights control: filters kept, real / random weights",
             f"{_cell(control['real_filters_kept_mean'], '{:.1f}')} / {_cell(control['filters_kept_mean'], '{:.1f}')}",
             "— (Adebayo et al., 2018)"),
            ("Random-weights control: mean KL, real / random weights",
             f"{_cell(control['real_kl_mean'])} / {_cell(control['kl_mean'])}", "—"),
            ("Random-weights control: kept filters shared with the real sub-network, mean (by chance)",
             f"{_cell(control['shared_mean'], '{:.1f}')} ({_cell(control['shared_by_chance_mean'], '{:.1f}')}); "
             f"Jaccard {_cell(control['jaccard_mean'], '{:.2f}')}", "—"),
            ("Output spread over the images (mean KL to the mean output), real / random weights",
             f"{_cell(control.get('real_output_spread_mean'))} / {_cell(control.get('output_spread_mean'))}",
             "— (near 0: the model ignores its input, and an empty sub-network reproduces it)")]


def _other_rows(numbers: Mapping[str, Any]) -> List[Tuple[str, str, str]]:
    rows = _faithfulness_rows(numbers["faithfulness"]) if "faithfulness" in numbers else []
    if "held_out" in numbers:
        held = numbers["held_out"]
        rows.append(("Held-out accuracy, original / sub-network",
                     f"{_pct(held['accuracy_original'])} / {_pct(held['accuracy_subnetwork'])}", "Fig. 9 (plot only)"))
    rows += _robustness_rows(numbers.get("robustness", {}))
    if "random_weights" in numbers:
        rows += _control_rows(numbers["random_weights"])
    return rows


def _table(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]],
           ids: Optional[Sequence[str]] = None) -> str:
    """An HTML table; the first cell of each row is its header; ``ids``: each row's anchor."""
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in header)
    anchors = [f' id="{html.escape(i)}"' for i in ids] if ids is not None else [""] * len(rows)
    body = "".join(f'<tr{anchor}><th scope="row">{html.escape(row[0])}</th>'
                   + "".join(f"<td>{html.escape(cell)}</td>" for cell in row[1:]) + "</tr>"
                   for row, anchor in zip(rows, anchors))
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def _headline_html(numbers: Mapping[str, Any]) -> str:
    cases = PAPER["case_studies"]
    rows = [("Case studies (tasks)", str(numbers["tasks"]), f"{cases['fig2_3_11']} (Fig. 2, 3, 11); "
             f"{cases['section_4_2']} (Fig. 1)"),
            *_size_rows(numbers), *_fidelity_rows(numbers), *_other_rows(numbers)]
    notes = "".join(f"<p>Note: {html.escape(n)}.</p>" for n in numbers.get("notes", []))
    return _table("This sweep vs the numbers the paper states (VGG-19 / ResNet-50 on ImageNet). Shares of "
                  "tasks use each task's mean KL; shares of images count every image, as the paper counts "
                  "“cases” over 783 × 20 samples.", ["", "This sweep", "Paper"], rows) + notes


def _cell(value: Any, form: str = "{:.3f}", missing: str = "—") -> str:
    """``value`` formatted, or ``missing`` when it is None."""
    return missing if value is None else form.format(value)


def _tasks_html(records: Sequence[Record]) -> str:
    rows = []
    for r in records:
        agree = _get(r, "fidelity", "agree")
        rows.append((str(r.get("task", "")), ", ".join(map(str, r.get("classes", []))),
                     _cell(_get(r, "size", "filters_kept"), "{}"), _cell(_get(r, "fidelity", "kl")),
                     "—" if agree is None else f"{agree}/{_get(r, 'fidelity', 'images')}",
                     *(_cell(_get(r, "baselines", name, "kl")) for name in BASELINES),
                     _cell(_get(r, "faithfulness", "spearman"), "{:.2f}")))
    return _table("One row per task: filters kept, mean KL and top-1 agreement on the fitting images, the "
                  "baselines' KL, and the Spearman correlation of filter score and degradation.",
                  ["Task", "Classes", "Filters kept", "KL", "Agreement", "Magnitude KL", "Random KL", "Spearman"],
                  rows, [f"task-{r.get('task', '')}" for r in records])


_SCATTER_CSS = ("<style>.scatter{max-width:100%;height:auto}.scatter a circle{fill:#4477aa;opacity:.75}"
                ".scatter a:hover circle,.scatter a:focus circle{fill:#d4008f;opacity:1;r:7px}"
                ".scatter text{font-size:11px;fill:#333}tr:target{background:#ffe0f4}</style>")


def _task_link(out_dir: Path, task: str) -> str:
    """The relative link a task's point opens: its explorer page (``tasks/<id>/report.html``, written by
    the sweep) when it exists, else its row in the task table."""
    page = Path("tasks") / task / "report.html"
    return quote(page.as_posix()) if (out_dir / page).is_file() else f"#task-{quote(task)}"


def _scatter_html(records: Sequence[Record], out_dir: Path) -> str:
    """Size vs fidelity per task as an inline SVG scatter: each point a focusable link that opens its
    task's explorer (or its row), with a tooltip (classes, filters kept, KL); the paper's KL 0.8 mark
    dashed. Empty without data."""
    points = [(str(r.get("task", "")), ", ".join(map(str, r.get("classes", []))), _get(r, "size", "filters_kept"),
               _get(r, "fidelity", "kl")) for r in records]
    points = [p for p in points if p[2] is not None and p[3] is not None]
    if not points:
        return ""
    width, height, left, bottom = 640, 300, 56, 40
    top_x = max(p[2] for p in points) * 1.05 or 1.0
    top_y = max(max(p[3] for p in points), 0.8) * 1.1

    def xy(kept: float, kl: float) -> Tuple[float, float]:
        return (left + (width - left - 12) * kept / top_x, 10 + (height - bottom - 10) * (1 - kl / top_y))

    parts = [f'<line x1="{left}" y1="{height - bottom}" x2="{width - 12}" y2="{height - bottom}" stroke="#333"/>',
             f'<line x1="{left}" y1="10" x2="{left}" y2="{height - bottom}" stroke="#333"/>']
    for fraction in (0.0, 0.5, 1.0):
        x, _ = xy(fraction * top_x, 0)
        _, y = xy(0, fraction * top_y)
        parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">{fraction * top_x:.0f}</text>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{fraction * top_y:.2f}</text>')
    _, mark = xy(0, 0.8)
    parts.append(f'<line x1="{left}" y1="{mark:.1f}" x2="{width - 12}" y2="{mark:.1f}" stroke="#aa3377" '
                 'stroke-dasharray="4 3"/><text x="{0}" y="{1:.1f}" text-anchor="end">KL 0.8 (paper)</text>'
                 .format(width - 14, mark - 4))
    parts.append(f'<text x="{(left + width) / 2:.0f}" y="{height - 6}" text-anchor="middle">filters kept</text>'
                 f'<text x="14" y="{(height - bottom) / 2:.0f}" transform="rotate(-90 14 {(height - bottom) / 2:.0f})" '
                 'text-anchor="middle">mean KL</text>')
    for task, classes, kept, kl in points:
        x, y = xy(kept, kl)
        label = html.escape(f"task {task} ({classes}): {kept} filters kept, KL {kl:.3f}")
        parts.append(f'<a href="{html.escape(_task_link(out_dir, task))}" aria-label="{label}"><circle cx="{x:.1f}" cy="{y:.1f}" '
                     f'r="5"><title>{label}</title></circle></a>')
    return (f'{_SCATTER_CSS}<figure><h3>Size vs fidelity per task</h3><svg class="scatter" role="group" '
            f'aria-label="Filters kept vs mean KL, one point per task" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{"".join(parts)}</svg><figcaption>One point per task: hover or '
            "focus (Tab) a point for its classes, size and KL; click it to open that task's explorer (its row below when the sweep wrote none). "
            "Below the dashed line the sub-network keeps the model's outputs within the paper's KL 0.8."
            "</figcaption></figure>")


def _meta_html(meta: Mapping[str, Any], tasks: int) -> str:
    rows = [(str(key).replace("_", " ").capitalize(), str(value)) for key, value in meta.items()]
    return _table("What was swept", ["", "Value"], [*rows, ("Tasks in this report", str(tasks))])


def _plot_html(png: bytes, title: str, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure><h3>{html.escape(title)}</h3><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(alt)}" style="max-width:100%;height:auto">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_sweep_report(out_dir: PathLike, records: Sequence[Record], meta: Mapping[str, Any]) -> Path:
    """Write the sweep's plots (``out_dir/plots/*.png``), ``headline.json`` and ``report.html``.

    The page is self-contained (plots embedded as base64 PNG with alt text, inline CSS, no script, a
    Content-Security-Policy that forbids every request): the sweep's settings (``meta``, e.g. model
    spec, data folder, classes per task, seed), the headline table next to :data:`PAPER`, an inline
    SVG scatter of size vs fidelity whose points open their task's explorer (``tasks/<id>/report.html``,
    a relative link that works from ``file://``; the task's row when the sweep wrote none), each plot with a caption
    saying how to read it, and a table of the tasks. A plot whose data no record has
    is left out (and a stale PNG of it removed). Files are written atomically.

    Example:
        >>> write_sweep_report("sweep", records, {"model": "benchmarks.digits:build", "data": "digits/images",
        ...                    "classes_per_task": 2, "seed": 0})  # doctest: +SKIP
        PosixPath('sweep/report.html')
    """
    out_dir = Path(out_dir)
    numbers = headline(records)
    write_json(out_dir / "headline.json", numbers)
    figures = []
    for name, plot, title, alt, caption in _PLOTS:
        path = out_dir / "plots" / f"{name}.png"
        if plot(records, path) is None:
            path.unlink(missing_ok=True)
        else:
            figures.append(_plot_html(path.read_bytes(), title, alt, caption))
    sections = [("sweep", "Sweep", _meta_html(meta, len(records))),
                ("headline", "This sweep vs the paper", _headline_html(numbers)),
                ("plots", "Plots", _scatter_html(records, out_dir) + "".join(figures) or "<p>No evaluation data to plot.</p>"),
                ("tasks", "Tasks", _tasks_html(records))]
    return atomic_write_bytes(out_dir / "report.html", document(Sprites(), sections).encode())
