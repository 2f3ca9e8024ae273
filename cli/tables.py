"""Plain-text tables for ``hookchains inspect`` and ``hookchains sweep``."""
from __future__ import annotations

from typing import Mapping, Optional

from hookchains.core.sites import SiteMap

_LABELS = {"mha_params": "MHA params", "ffn_params": "FFN params"}  # as in the paper's Table 1


def site_table(sites: SiteMap, title: str, extra: Optional[Mapping[str, int]] = None) -> str:
    """One row per filter/gate/token site in network order, then the totals (with ``extra`` ones).
    Each column is as wide as its longest entry (convnext's labels and module names are long).

    Example: ``site_table(sites, "deit_small_patch16_224", {"mha_params": 7096320})`` ends in
    ``totals: ..., token slots 2,364, ..., MHA params 7,096,320``."""
    gate_of = {f: g.label for g in sites.gates for f in g.filter_sites}
    rows = [("label", "kind", "channels", "gate", "module")]
    rows += [(f.label, "dw-conv" if f.depthwise else f.kind, str(f.channels), gate_of.get(f.name, ""), f.name)
             for f in sites.filters]
    rows += [(g.label, "gate", "", "", " + ".join(g.members)) for g in sites.gates]
    rows += [(t.label, "tokens", str(t.tokens), "", f"{t.name} ({t.prefix_tokens} never pruned)") for t in sites.tokens]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]  # the last column is not padded
    lines = [f"{title}: adapter {sites.adapter}, graph from {sites.discovery}"]
    lines += [f"  note: {n}" for n in sites.notes]
    lines += [f"{r[0]:<{widths[0]}} {r[1]:<{widths[1]}} {r[2]:>{widths[2]}}  {r[3]:<{widths[3]}} {r[4]}"
              for r in rows]
    totals = {**sites.totals(), **(extra or {})}
    lines.append("totals: " + ", ".join(f"{_LABELS.get(k, k.replace('_', ' '))} {v:,}" for k, v in totals.items()))
    return "\n".join(lines)


def _share_line(name: str, shares: Mapping, paper: Mapping) -> str:
    """``name``'s shares of tasks and of images with KL <= 0.8; the paper's (per image) in brackets."""
    line = f"{name} {100 * shares['kl_le_0.8']:.1f} %"
    if "per_image" in shares:
        line += f" / {100 * shares['per_image']['kl_le_0.8']:.1f} %"
        line += f" ({100 * paper[name]:.1f} %)" if name in paper else ""
    return line


def _faithfulness_lines(r: Mapping) -> list:
    lines = [f"faithfulness: Spearman(score, degradation) median {r['spearman_median']:.2f}, "
             f"positive in {100 * r['spearman_positive']:.0f} % of tasks"]
    if "spearman_untied_median" in r:
        lines[0] += f"; untied filters {r['spearman_untied_median']:.2f}"
    if "spearman_taylor_median" in r:
        lines[0] += f"; gradient x activation {r['spearman_taylor_median']:.2f}"
    if "bins" in r:
        lines.append("degradation per score interval (pooled, low -> high): "
                     + " -> ".join(f"{b['degradation']:.4f}" for b in r["bins"]))
    return lines


def _robustness_lines(r: Mapping) -> list:
    lines = []
    for network, accuracy in r.get("accuracy", {}).items():
        success = r.get("attack_success", {}).get(network, {})
        probability = r.get("probability", {}).get(network, {})
        lines.append(f"robustness, {network}: accuracy " + ", ".join(f"{a} {100 * v:.0f} %" for a, v in accuracy.items())
                     + "; attack success " + ", ".join(f"{a} {100 * v:.0f} %" for a, v in success.items())
                     + "; P(true class) " + ", ".join(f"{a} {v:.2f}" for a, v in probability.items()))
    return lines


def sweep_headline(records) -> str:
    """The sweep's headline figures as a few lines, next to the paper's (``hookchains sweep``).

    Example: ``sweep_headline(records)`` starts with ``45 tasks; filters kept 31.2 ± 8.0 (9.75 %)``."""
    from hookchains.viz.sweep_report import PAPER, headline
    h = headline(records)
    lines = [f"{h['tasks']} tasks"]
    if "size" in h:
        s = h["size"]
        lines[0] += (f"; filters kept {s['filters_kept_mean']:.1f} ± {s['filters_kept_std']:.1f} "
                     f"({s['filters_kept_percent']:.2f} % of {s['filters_total']:.0f})")
        if s.get("conv_filters_kept_mean") is not None:
            lines[0] += (f"; conv filters {s['conv_filters_kept_mean']:.1f} of {s['conv_filters_total']:.0f} "
                         f"in {s['conv_layers_kept_mean']:.1f} of {s['conv_layers_total']:.0f} conv layers")
    if "fidelity" in h:
        f = h["fidelity"]
        ours = {"neurochains": f, **h.get("baselines", {})}
        paper = PAPER["vgg19"]["kl_le_0.8"]
        lines.append("KL <= 0.8, share of tasks / of images (paper, VGG-19, of images): "
                     f"{'; '.join(_share_line(name, ours[name], paper) for name in ours)}; mean KL {f['kl_mean']:.3f}")
    for name, base in h.get("baselines", {}).items():
        if "allocation" in base:
            lines.append(f"{name} baseline: {base['filters_kept_mean']:.1f} filters, {'/'.join(base['allocation'])} "
                         f"allocation, gates {'/'.join(base['gates'])}, {base['steps_mean']:.0f} fine-tuning steps")
    if "faithfulness" in h:
        lines += _faithfulness_lines(h["faithfulness"])
    if "held_out" in h:
        g = h["held_out"]
        lines.append(f"held-out accuracy: original {100 * g['accuracy_original']:.1f} %, "
                     f"sub-network {100 * g['accuracy_subnetwork']:.1f} %")
    lines += _robustness_lines(h.get("robustness", {}))
    if "random_weights" in h:
        c = h["random_weights"]
        lines.append(f"random-weights control: {c['filters_kept_mean']:.1f} filters kept (real {c['real_filters_kept_mean']:.1f}), "
                     f"KL {c['kl_mean']:.3f} (real {c['real_kl_mean']:.3f}), {c['shared_mean']:.1f} kept filters "
                     f"shared with the real sub-network ({c['shared_by_chance_mean']:.1f} by chance)")
        if c.get("output_spread_mean") is not None and c.get("real_output_spread_mean") is not None:
            lines[-1] += (f"; output spread {c['output_spread_mean']:.4f} (real {c['real_output_spread_mean']:.4f}, "
                          "near 0: the model ignores its input)")
    lines += [f"note: {n}" for n in h.get("notes", [])]
    return "\n".join(lines)
