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
    if "fidelity" in h:
        f = h["fidelity"]
        ours = {"neurochains": f, **h.get("baselines", {})}
        paper = PAPER["vgg19"]["kl_le_0.8"]
        shares = [f"{name} {100 * ours[name]['kl_le_0.8']:.1f} % (paper, VGG-19: {100 * paper[name]:.1f} %)"
                  for name in paper if name in ours]
        lines.append(f"KL <= 0.8: {', '.join(shares)}; mean KL {f['kl_mean']:.3f}")
    if "faithfulness" in h:
        r = h["faithfulness"]
        lines.append(f"faithfulness: Spearman(score, degradation) median {r['spearman_median']:.2f}, "
                     f"positive in {100 * r['spearman_positive']:.0f} % of tasks")
    if "held_out" in h:
        g = h["held_out"]
        lines.append(f"held-out accuracy: original {100 * g['accuracy_original']:.1f} %, "
                     f"sub-network {100 * g['accuracy_subnetwork']:.1f} %")
    return "\n".join(lines)
