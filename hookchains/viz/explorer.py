"""The interactive explorer page: one self-contained HTML file whose spine is the sub-network graph.

The page holds one JSON document (``<script type="application/json" id="explorer-data">``) and one
inline script (``explorer_script.js`` next to this module) that draws it as inline SVG: layers as
columns (wrapped into up to 6 rows, in order, when that shows them larger on the screen), nodes coloured by a value in [0, 1] on the ``jet`` map, pan (drag), zoom (wheel, +/-, the
buttons) and fit-to-screen on load; "Chain filters only" redraws the graph with just the filters
the chains use (each layer then says "k of K kept"). The graph is one Tab stop (a roving tabindex: the arrow keys move
between nodes, Enter opens one). A click (or Enter) on a node opens the side panel; an image, a
class or a pair of classes can be picked to light up their chains. The script is allowed by a
``sha256`` hash in the page's Content-Security-Policy, which forbids every request (``default-src
'none'``; pictures are ``data:`` URIs), so the page works from ``file://`` and offline.

The data model is generic; each kind of run fills it in with its own nodes and panels: filter runs
(:mod:`hookchains.viz.report`: filters, chains, feature visualisations, heatmaps), token runs of a ViT
or a text encoder (:mod:`hookchains.viz.token_report`: a cell per image and block, the image's row is
its "chain") and text filter runs (:mod:`hookchains.viz.text_report`: kept heads and neurons):

* ``title``: the graph's title; ``note`` (optional): a warning shown under it; ``colour``: ``{"by": what the colour encodes, "low": ..., "high": ...}``;
* ``views``: which controls the run has: ``{"chains": what an image's highlighted path is called in
  its panel ("" for none), "highlight": the legend's word for it, "unit": what an item of the task is
  ("Image", "Sentence"), "compare", "compact", "classes" (bools)}``;
* ``columns``: ``[{"label", "kind" ("layer", "skipped" or "output"), "kept" (units the column keeps),
  "more" (kept units not drawn), "nodes" (node ids, top to bottom), optional "detail" (the line under
  the label, instead of "K kept")}]`` in network order;
* ``nodes``: ``[{"id", "label", "kind" ("unit", "cell" or "output"), "column", "value" (colour in [0, 1] or
  null), "aria" (the screen-reader label), "facts" ([[name, value text], ...], shown in the panel),
  "featvis" (picture id or null), "featvisFailed" (why the feature visualisation is not shown, or
  null), "maps" ([[image, picture id or null, peak activation], ...])}]``; optional: "pictures"
  ([[title, picture id or null, alt text or why there is none]]), "words" ([[word, activation]]),
  "image" (the image a cell belongs to), "title" (the panel's title, default "label");
* ``edges``: ``[[from node id, to node id, width in [0, 1]]]``;
* ``images``: ``[{"label", "caption", "pic" (or null: a sentence), "wrong" (misclassified by the
  original model)}]``, optional "rows" (``[{"title", "pics": [[label, picture id or null, alt]]}]``:
  Fig. 7's rows) and "grid" (``{"title", "words", "layers", "kept" (layers x words bools),
  "attribution" (per word), "attributionLabel"}``: a sentence's token-by-layer grid);
  ``groups``: ``[{"name", "images": [image indices]}]`` (the task's classes);
* ``chains``: ``[{"image", "nodes" (node ids from input side to output), "strength", "title"}]``;
* ``pics``: picture id -> ``data:image/png;base64,...``: every picture stored once and referenced by id.

When the script has drawn the graph it sets ``document.body.dataset.ready`` to
``performance.now()`` (milliseconds since navigation: the time to interactive) and fires
``explorer-ready`` on ``document``.

Example:
    >>> pics = Pictures()
    >>> data = {"title": "t", "colour": {"by": "score", "low": "0", "high": "1"}, "views": FILTER_VIEWS,
    ...         "columns": [], "nodes": [], "edges": [], "images": [], "groups": [], "chains": []}
    >>> page = explorer_page(data, pics, [("summary", "Summary", "<p>text</p>")])
    >>> "script-src 'sha256-" in page and page.count("<script") == 2
    True
"""
from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import os
import sys
import webbrowser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

from hookchains.viz.html import CSS, IMAGE_PX

__all__ = ["Pictures", "explorer_page", "image_buttons", "open_in_browser", "script_hash", "serve_page", "FILTER_VIEWS"]

FILTER_VIEWS = {"chains": "chains", "highlight": "highlighted chains", "unit": "Image", "compare": True,
                "compact": True, "classes": True}
"""The controls of a run with chains (a filter run): image, class, compare, chain filters only."""


class Pictures:
    """PNG pictures stored once: :meth:`add` returns the same id for the same bytes.

    Example:
        >>> pics = Pictures()
        >>> pics.add(b"png") == pics.add(b"png") and len(pics.table()) == 1
        True
    """

    def __init__(self) -> None:
        self._ids: Dict[bytes, str] = {}

    def add(self, png: bytes) -> str:
        """The id of ``png`` in the page's picture table (added on first use)."""
        return self._ids.setdefault(png, f"p{len(self._ids)}")

    def table(self) -> Dict[str, str]:
        """Picture id -> ``data:`` URI."""
        return {key: "data:image/png;base64," + base64.b64encode(png).decode() for png, key in self._ids.items()}


@functools.lru_cache(maxsize=1)
def _script() -> str:
    return resources.files("hookchains.viz").joinpath("explorer_script.js").read_text(encoding="utf-8")


def script_hash() -> str:
    """The CSP source (``'sha256-...'``) that allows the explorer's inline script and nothing else."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(_script().encode()).digest()).decode() + "'"


_EXPLORER_CSS = """
body{overflow-x:hidden}main{max-width:none}
.explorer{display:grid;grid-template-columns:minmax(0,1fr) 360px;gap:.75rem;height:calc(100vh - 5.5rem);min-height:420px}
.stage{position:relative;border:1px solid #ccc;border-radius:4px;min-width:0;overflow:hidden;background:#fcfcfc}
#graph{width:100%;height:100%;display:block;cursor:grab;touch-action:none}
.legend{position:absolute;left:.5rem;top:.4rem;right:.5rem;background:#ffffffe6;padding:.25rem .5rem;border-radius:4px;
font-size:.85rem;pointer-events:none}
.legend strong{display:block}.bar{display:inline-block;width:120px;height:10px;vertical-align:middle;margin:0 .3rem;
background:linear-gradient(90deg,#000080,#0000ff,#0080ff,#00ffff,#80ff80,#ffff00,#ff8000,#ff0000,#800000)}
.tools{position:absolute;left:.5rem;bottom:.4rem;display:flex;flex-wrap:wrap;gap:.3rem;align-items:center;font-size:.85rem;
background:#ffffffe6;padding:.25rem;border-radius:4px}
.tools select,.tools button{font-size:.85rem}.tools button[aria-pressed=true]{background:#d4008f;color:#fff}
#panel{border:1px solid #ccc;border-radius:4px;padding:.5rem .75rem;overflow-y:auto;overflow-x:hidden;min-width:0}
#panel h2{margin-top:0;font-size:1.15rem}#panel h3{font-size:.95rem;margin:.8rem 0 .3rem}
.facts th,.facts td{font-size:.85rem;padding:.1rem .4rem}
.maps{display:flex;flex-wrap:wrap;gap:.3rem}.map{margin:0;font-size:.68rem;text-align:center;width:74px;line-height:1.2}
.map img{display:block;width:72px;height:auto}.featvis{width:128px;image-rendering:auto}
.chains{padding-left:1.2rem;font-size:.82rem}.path{color:#444;word-break:break-word}
.linkish{background:none;border:none;padding:0;color:#0645ad;text-decoration:underline;cursor:pointer;font:inherit;text-align:left}
.classnet{display:flex;flex-wrap:wrap;gap:.4rem}.classcol{display:flex;flex-direction:column;gap:.2rem}
.classcol .colhead{font-size:.7rem;color:#555}.inline{display:flex;flex-wrap:wrap;gap:.2rem .6rem;padding:0;list-style:none}
#graph .colhead{font-size:10px;text-anchor:middle;fill:#333;font-weight:600}
#graph .colsub,#graph .more{font-size:9px;text-anchor:middle;fill:#555}
#graph .node text{font-size:9px;text-anchor:middle;font-family:ui-monospace,Menlo,Consolas,monospace;pointer-events:none}
#graph .node rect{stroke:#555;stroke-width:.6}#graph .node{cursor:pointer}
#graph .node:focus{outline:none}#graph .node:focus rect{stroke:#000;stroke-width:2.5}
#graph .edge{fill:none;stroke:#40404066}
#graph .chainline{fill:none;stroke:#d4008f;stroke-width:3;opacity:.85}
#graph.focus .node:not(.hl){opacity:.25}#graph.focus .edge{opacity:.15}
#graph .node.hl rect{stroke:#d4008f;stroke-width:2.2}#graph .node.sel rect{stroke:#000;stroke-width:3}
#graph .node.cmp-a rect{stroke:#0057d9;stroke-width:3}#graph .node.cmp-b rect{stroke:#e07000;stroke-width:3}
#graph .node.cmp-both rect{stroke:#7a00c2;stroke-width:3}
.cmp-a li{border-left:4px solid #0057d9;padding-left:.2rem}.cmp-b li{border-left:4px solid #e07000;padding-left:.2rem}
.cmp-both li{border-left:4px solid #7a00c2;padding-left:.2rem}
.grid button{background:none;border:1px solid transparent;padding:0;cursor:pointer}
.grid button:focus{border-color:#000}.grid img{display:block}.grid .sentence{max-width:22rem;text-align:left;font:inherit}
.wide{max-width:100%}.words{padding-left:1.4rem;font-size:.85rem;margin:0}
.wordgrid{font-size:.72rem;display:block;overflow-x:auto;max-width:100%}.wordgrid th,.wordgrid td{padding:.1rem .25rem}
.wordgrid .pruned{color:#aaa;background:#f3f3f3}
@media (max-width:900px){.explorer{grid-template-columns:1fr;height:auto}.stage{height:70vh}}
"""

_CONTROLS = """<div class="tools" role="toolbar" aria-label="Graph controls">
<button type="button" id="zoom-in" aria-label="Zoom in">+</button><button type="button" id="zoom-out"
aria-label="Zoom out">−</button><button type="button" id="zoom-fit">Fit</button><button type="button"
id="compact" aria-pressed="false" title="Draw only the filters the chains use">Chain filters only</button>
<label><span id="pick-unit">Image</span> <select id="pick-image"><option value="">–</option></select></label>
<label>Class <select id="pick-class"><option value="">–</option></select></label>
<label>Compare <select id="cmp-a" aria-label="First class"></select></label><select id="cmp-b"
aria-label="Second class"></select><button type="button" id="cmp-go">Compare</button>
<button type="button" id="reset">Clear</button><span id="graph-status" role="status" class="muted"></span></div>"""


def _json(data: Mapping[str, Any]) -> str:
    """JSON that cannot end its ``<script>`` element."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def explorer_page(data: Mapping[str, Any], pictures: Pictures, sections: Sequence[Tuple[str, str, str]],
                  heading: str = "NeuroChains explorer") -> str:
    """The whole page: the explorer (graph, legend, controls, side panel), then static ``sections``.

    Args:
        data: the data model of the module docstring, without ``pics``.
        pictures: every picture the data refers to by id.
        sections: ``(id, title, html)`` of the static parts below the explorer (summary, images).

    Example: ``explorer_page(data, pics, [("summary", "Sub-network", "<p>...</p>")])``.
    """
    colour = data["colour"]
    legend = (f'<div class="legend"><strong id="graph-title">{html.escape(data["title"])}</strong>'
              f'colour: {html.escape(colour["by"])} {html.escape(colour["low"])}<span class="bar"></span>'
              f'{html.escape(colour["high"])} · <span style="color:#d4008f">magenta</span>: '
              f'{html.escape(data["views"]["highlight"])} · '
              "click or Tab + Enter a node; arrows move; drag to pan, wheel or +/− to zoom"
              + (f'<br><span class="bad">{html.escape(data["note"])}</span>' if data.get("note") else "") + "</div>")
    explorer = (f'<div class="explorer"><div class="stage">{legend}<svg id="graph" role="group" '
                f'aria-labelledby="graph-title" preserveAspectRatio="xMidYMid meet"></svg>{_CONTROLS}</div>'
                '<aside id="panel" aria-live="polite" aria-label="Details"><h2>Details</h2><p>Click a node of the '
                "graph, or pick an image below it.</p></aside></div>")
    body = "".join(f'<section aria-labelledby="{key}"><h2 id="{key}">{title}</h2>{content}</section>'
                   for key, title, content in sections)
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {script_hash()}"
    payload = _json({**data, "pics": pictures.table()})
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{csp}"><meta name="viewport" content="width=device-width, initial-scale=1"><title>'
            f'{html.escape(heading)}</title><style>{CSS}{_EXPLORER_CSS}</style></head><body><main>'
            f'<h1>{html.escape(heading)}</h1>{explorer}{body}</main>'
            f'<script type="application/json" id="explorer-data">{payload}</script>'
            f"<script>{_script()}</script></body></html>")


def image_buttons(data: Mapping[str, Any], note: str = "") -> str:
    """The task's images (or sentences) as buttons that open their panel (pictures filled in from the
    table by the script), with ``note`` above them when given."""
    figures = []
    for i, image in enumerate(data["images"]):
        bad = ' class="bad"' if image["wrong"] else ""
        caption = html.escape(image["caption"])
        if image["pic"] is None:
            figures.append(f'<button type="button" class="sentence" data-image="{i}">{caption}</button>')
            continue
        figures.append(f'<figure><button type="button" data-image="{i}" aria-label="Show {caption}">'
                       f'<img data-pic="{image["pic"]}" alt="{caption}" width="{IMAGE_PX}"></button>'
                       f"<figcaption{bad}>{caption}</figcaption></figure>")
    return (f"<p>{html.escape(note)}</p>" if note else "") + f'<div class="grid">{"".join(figures)}</div>'


def serve_page(page: Path, port: int = 0) -> ThreadingHTTPServer:
    """A server on ``127.0.0.1:port`` (0: any free port) that answers ``/`` with ``page`` and 404 otherwise.

    The page is read once; call ``serve_forever()`` on the result and ``server_close()`` when done.

    Example:
        >>> import threading, urllib.request
        >>> _ = Path("runs").mkdir(exist_ok=True), Path("runs/p.html").write_text("<p>hi</p>")
        >>> server = serve_page(Path("runs/p.html"))
        >>> threading.Thread(target=server.serve_forever, daemon=True).start()
        >>> urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/").read()
        b'<p>hi</p>'
        >>> server.shutdown(); server.server_close()
    """
    body = Path(page).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 -- the http.server name
            found = self.path in ("/", "/index.html")
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8" if found else "text/plain")
            self.send_header("Content-Length", str(len(body) if found else 9))
            self.end_headers()
            self.wfile.write(body if found else b"not found")

        def log_message(self, *args: Any) -> None:  # quiet: the CLI prints the URL once
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def open_in_browser(page: Path) -> bool:
    """Open ``page`` (a file) in the user's web browser; False when none can be opened (no display on
    Linux, or :mod:`webbrowser` finds no browser)."""
    graphical = sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    return bool(graphical) and webbrowser.open(Path(page).resolve().as_uri())
