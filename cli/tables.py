"""Plain-text tables for ``hookchains inspect``."""
from __future__ import annotations

from typing import Mapping, Optional

from hookchains.sites import SiteMap

_LABELS = {"mha_params": "MHA params", "ffn_params": "FFN params"}  # as in the paper's Table 1


def site_table(sites: SiteMap, title: str, extra: Optional[Mapping[str, int]] = None) -> str:
    """One row per filter/gate/token site in network order, then the totals (with ``extra`` ones).

    Example: ``site_table(sites, "deit_small_patch16_224", {"mha_params": 7096320})`` ends in
    ``totals: ..., token slots 2,364, ..., MHA params 7,096,320``."""
    gate_of = {f: g.label for g in sites.gates for f in g.filter_sites}
    lines = [f"{title}: adapter {sites.adapter}, graph from {sites.discovery}"]
    lines += [f"  note: {n}" for n in sites.notes]
    lines.append(f"{'label':<22} {'kind':<9} {'channels':>8}  {'gate':<10} module")
    for f in sites.filters:
        kind = "dw-conv" if f.depthwise else f.kind
        lines.append(f"{f.label:<22} {kind:<9} {f.channels:>8}  {gate_of.get(f.name, ''):<10} {f.name}")
    for g in sites.gates:
        lines.append(f"{g.label:<22} {'gate':<9} {'':>8}  {'':<10} {' + '.join(g.members)}")
    for t in sites.tokens:
        lines.append(f"{t.label:<22} {'tokens':<9} {t.tokens:>8}  {'':<10} {t.name} ({t.prefix_tokens} never pruned)")
    totals = {**sites.totals(), **(extra or {})}
    lines.append("totals: " + ", ".join(f"{_LABELS.get(k, k.replace('_', ' '))} {v:,}" for k, v in totals.items()))
    return "\n".join(lines)
