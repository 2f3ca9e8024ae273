'use strict';
(function () {
  const D = JSON.parse(document.getElementById('explorer-data').textContent);
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.getElementById('graph');
  const panel = document.getElementById('panel');
  const nodes = new Map(D.nodes.map(n => [n.id, n]));
  const shapes = new Map();
  const COLW = 104, SKIPW = 64, ROWH = 24, NODEW = 86, NODEH = 19, TOP = 46;
  const JET = [[0, 0, .5], [0, 0, 1], [0, .5, 1], [0, 1, 1], [.5, 1, .5], [1, 1, 0], [1, .5, 0], [1, 0, 0], [.5, 0, 0]];

  function make(tag, attrs, parent, text) {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function html(tag, attrs, parent, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function jet(v) {
    const p = Math.min(Math.max(v, 0), 1) * (JET.length - 1), lo = Math.min(Math.floor(p), JET.length - 2), f = p - lo;
    const c = JET[lo].map((a, i) => a * (1 - f) + JET[lo + 1][i] * f);
    return {fill: 'rgb(' + c.map(a => Math.round(255 * a)).join(',') + ')',
            text: (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) < 0.5 ? '#fff' : '#000'};
  }
  function picture(id, alt, parent, cls) {
    const img = html('img', {alt: alt, class: cls || 'pic'}, parent);
    img.src = D.pics[id];
    return img;
  }

  // ------------------------------------------------------------------ the graph
  const edgeLayer = make('g', {class: 'edges'}, svg), chainLayer = make('g', {class: 'chainlines'}, svg);
  const nodeLayer = make('g', {class: 'nodes'}, svg);
  const pos = new Map(), colOf = new Map(), gapOf = new Map(), onChains = new Set(D.chains.flatMap(ch => ch.nodes));
  const BANDGAP = 36;
  let width = 0, height = 0, visible = [], compactNow = false;
  function area() {  // the part of the graph's box that the legend and the tools leave free
    const box = svg.getBoundingClientRect(), pad = 12;
    const top = document.querySelector('.legend').offsetHeight + pad, bottom = document.querySelector('.tools').offsetHeight + pad;
    return {box, pad, top, w: box.width - 2 * pad, h: Math.max(box.height - top - bottom, 50)};
  }
  function bands(entries) {  // wrap the columns into the number of rows that shows them largest
    const free = area(), total = entries.reduce((t, e) => t + e.w, 0);
    let best = null;
    for (let n = 1; n <= Math.min(6, entries.length); n++) {
      const rows = [[]];
      let used = 0;
      for (const e of entries) {
        if (used + e.w > total / n + 1 && rows[rows.length - 1].length && rows.length < n) { rows.push([]); used = 0; }
        rows[rows.length - 1].push(e);
        used += e.w;
      }
      const w = Math.max(...rows.map(r => r.reduce((t, e) => t + e.w, 0)));
      const h = rows.reduce((t, r) => t + Math.max(...r.map(e => e.h)), 0) + BANDGAP * (rows.length - 1);
      const scale = Math.min(free.w / w, free.h / h);
      if (!best || scale > best.scale * 1.05) best = {rows, w, h, scale};
    }
    return best;
  }
  function curve(a, b, attrs, parent) {
    const [x1, y1] = pos.get(a), [x2, y2] = pos.get(b);
    const sx = x1 + NODEW, sy = y1 + NODEH / 2, ex = x2, ey = y2 + NODEH / 2;
    const m = (sx + ex) / 2, gap = gapOf.get(a);  // a wrapped edge runs back along the gap under its row
    const d = ex > sx ? `M${sx},${sy} C${m},${sy} ${m},${ey} ${ex},${ey}`
      : `M${sx},${sy} C${sx + 30},${sy} ${sx + 30},${gap} ${sx},${gap} L${ex},${gap} C${ex - 30},${gap} ${ex - 30},${ey} ${ex},${ey}`;
    return make('path', Object.assign({d: d}, attrs), parent);
  }
  function draw(compact) {  // compact: only the filters the chains use
    compactNow = compact;
    for (const layer of [edgeLayer, chainLayer, nodeLayer]) layer.textContent = '';
    pos.clear(); colOf.clear(); gapOf.clear(); shapes.clear();
    visible = [];
    const entries = [];
    for (const col of D.columns) {
      const ids = compact ? col.nodes.filter(id => onChains.has(id)) : col.nodes;
      if (compact && col.kind === 'layer' && !ids.length) continue;
      entries.push({col, ids, w: col.kind === 'skipped' ? SKIPW : COLW, h: TOP + ids.length * ROWH + 24});
    }
    const layout = bands(entries);
    let top = 0;
    for (const row of layout.rows) {
      let x = 0;
      for (const {col, ids, w} of row) {
        const cx = x + (col.kind === 'skipped' ? SKIPW / 2 : NODEW / 2);
        const sub = col.kind !== 'layer' || col.detail ? (col.detail || '') : compact ? `${ids.length} of ${col.kept} kept`
          : col.kept + ' kept';
        make('text', {x: cx, y: top + 14, class: 'colhead'}, nodeLayer, col.label);
        make('text', {x: cx, y: top + 28, class: 'colsub'}, nodeLayer, sub);
        ids.forEach((id, k) => { pos.set(id, [x, top + TOP + k * ROWH]); colOf.set(id, visible.length); });
        visible.push(ids);
        const more = col.kind === 'layer' ? col.kept - ids.length : 0;
        if (more) make('text', {x: cx, y: top + TOP + ids.length * ROWH + 12, class: 'more'}, nodeLayer, '+' + more + ' more');
        x += w;
      }
      const bottom = top + Math.max(...row.map(e => e.h));
      for (const {ids} of row) for (const id of ids) gapOf.set(id, bottom + BANDGAP / 2 - 6);
      top = bottom + BANDGAP;
    }
    width = layout.w;
    height = top - BANDGAP;
    for (const [a, b, w] of D.edges.filter(([a, b]) => pos.has(a) && pos.has(b))) {
      curve(a, b, {'stroke-width': 0.4 + 3 * w, class: 'edge', 'data-from': a, 'data-to': b}, edgeLayer);
    }
    for (const n of D.nodes.filter(n => pos.has(n.id))) {
      const [nx, ny] = pos.get(n.id);
      const col = n.value === null ? {fill: '#fff', text: '#000'} : jet(n.value);
      const g = make('g', {class: 'node' + (n.kind === 'output' ? ' output' : ''), tabindex: shapes.size ? -1 : 0,
                           role: 'button', 'aria-label': n.aria, 'data-id': n.id, transform: `translate(${nx},${ny})`},
                     nodeLayer);
      make('rect', {width: NODEW, height: NODEH, rx: n.kind === 'output' ? 10 : 3, fill: col.fill}, g);
      make('text', {x: NODEW / 2, y: 14, fill: col.text}, g, n.label);
      make('title', {}, g, n.aria);
      shapes.set(n.id, g);
    }
  }
  draw(false);

  // ------------------------------------------------------------------ pan and zoom
  let view = {x: 0, y: 0, w: width, h: height};
  function apply() { svg.setAttribute('viewBox', `${view.x} ${view.y} ${view.w} ${view.h}`); }
  function fit() {
    const {box, top, w, h} = area();
    const scale = Math.min(w / width, h / height, 1.6) || 1;
    view = {w: box.width / scale, h: box.height / scale, x: (width - box.width / scale) / 2, y: -top / scale};
    apply();
  }
  function zoom(factor, cx, cy) {
    const box = svg.getBoundingClientRect();
    const px = view.x + view.w * ((cx === undefined ? box.width / 2 : cx - box.left) / box.width);
    const py = view.y + view.h * ((cy === undefined ? box.height / 2 : cy - box.top) / box.height);
    view = {x: px - (px - view.x) * factor, y: py - (py - view.y) * factor, w: view.w * factor, h: view.h * factor};
    apply();
  }
  svg.addEventListener('wheel', e => { e.preventDefault(); zoom(e.deltaY > 0 ? 1.15 : 1 / 1.15, e.clientX, e.clientY); },
                       {passive: false});
  let drag = null;
  svg.addEventListener('pointerdown', e => { if (!e.target.closest('.node')) drag = [e.clientX, e.clientY, view.x, view.y]; });
  window.addEventListener('pointerup', () => { drag = null; });
  svg.addEventListener('pointermove', e => {
    if (!drag) return;
    const box = svg.getBoundingClientRect();
    view.x = drag[2] - (e.clientX - drag[0]) * view.w / box.width;
    view.y = drag[3] - (e.clientY - drag[1]) * view.h / box.height;
    apply();
  });
  document.getElementById('zoom-in').addEventListener('click', () => zoom(1 / 1.3));
  document.getElementById('zoom-out').addEventListener('click', () => zoom(1.3));
  document.getElementById('zoom-fit').addEventListener('click', fit);
  window.addEventListener('resize', () => { draw(compactNow); fit(); if (last) highlight(...last); });

  // ------------------------------------------------------------------ highlighting
  function clear() {
    svg.classList.remove('focus');
    chainLayer.textContent = '';
    for (const g of shapes.values()) g.classList.remove('hl', 'sel', 'cmp-a', 'cmp-b', 'cmp-both');
    for (const e of edgeLayer.children) e.classList.remove('hl');
  }
  let last = null;
  function highlight(chains, selected) {
    last = [chains, selected];
    clear();
    svg.classList.add('focus');
    const seen = new Set();
    for (const ch of chains) {
      ch.nodes.forEach((id, k) => {
        shapes.get(id).classList.add('hl');
        if (k === 0) return;
        const key = ch.nodes[k - 1] + '>' + id;
        if (seen.has(key)) return;
        seen.add(key);
        curve(ch.nodes[k - 1], id, {class: 'chainline'}, chainLayer);
      });
    }
    if (selected && shapes.has(selected)) shapes.get(selected).classList.add('sel');
    document.getElementById('graph-status').textContent =
      chains.length ? `${chains.length} ${D.views.chains || 'row(s)'} highlighted` : 'nothing highlighted';
  }

  // ------------------------------------------------------------------ panels
  function start(title) {
    panel.textContent = '';
    html('h2', {id: 'panel-title', tabindex: -1}, panel, title);
    return panel;
  }
  function facts(rows, parent) {
    const t = html('table', {class: 'facts'}, parent);
    for (const [k, v] of rows) { const r = html('tr', {}, t); html('th', {scope: 'row'}, r, k); html('td', {}, r, v); }
  }
  function chainList(chains, parent) {
    const ol = html('ol', {class: 'chains'}, parent);
    for (const ch of chains) {
      const li = html('li', {}, ol);
      const b = html('button', {type: 'button', class: 'linkish'}, li, ch.title);
      b.addEventListener('click', () => highlight([ch]));
      html('div', {class: 'path'}, li, ch.nodes.map(id => nodes.get(id).label).join(' → '));
    }
    if (!chains.length) html('p', {class: 'muted'}, parent, 'No chain.');
  }
  function imageCaption(i) { return D.images[i].caption; }
  function words(rows, parent) {  // [[word, value], ...]: the words that activate a unit most
    html('h3', {}, parent, 'Words of the task that activate it most');
    const ol = html('ol', {class: 'words'}, parent);
    for (const [w, a] of rows) html('li', {}, ol, `${w} (${a.toFixed(2)})`);
  }
  function strip(row, parent) {  // {title, pics: [[label, picture id or null, alt]]}: one Fig. 7 row
    html('h3', {}, parent, row.title);
    if (row.pics.length === 1) {  // one wide picture (a sheet of every block)
      const [label, pic, alt] = row.pics[0];
      picture(pic, alt, parent, 'pic wide');
      html('p', {class: 'muted'}, parent, label);
      return;
    }
    const grid = html('div', {class: 'maps'}, parent);
    for (const [label, pic, alt] of row.pics) {
      const f = html('figure', {class: 'map'}, grid);
      if (pic === null) html('span', {class: 'muted'}, f, 'pruned'); else picture(pic, alt, f);
      html('figcaption', {}, f, label);
    }
  }
  function wordGrid(g, parent) {  // {words, layers, kept: layers x words, attribution: words, title}
    const t = html('table', {class: 'wordgrid'}, parent);
    html('caption', {}, t, g.title);
    const head = html('tr', {}, t);
    html('th', {scope: 'col'}, head, 'Layer');
    for (const w of g.words) html('th', {scope: 'col'}, head, w);
    g.layers.forEach((label, l) => {
      const r = html('tr', {}, t);
      html('th', {scope: 'row'}, r, label);
      g.words.forEach((w, k) => {
        const c = html('td', {class: g.kept[l][k] ? 'kept' : 'pruned'}, r);
        if (g.kept[l][k]) c.textContent = w; else html('s', {}, c, w);
      });
    });
    const r = html('tr', {class: 'attribution'}, t), top = Math.max(...g.attribution.slice(1), 1e-12);
    html('th', {scope: 'row'}, r, g.attributionLabel);
    for (const a of g.attribution) {
      html('td', {style: `background:rgba(200,60,0,${Math.min(a / top, 1).toFixed(2)})`}, r, a.toFixed(2));
    }
  }

  function showNode(id) {
    const n = nodes.get(id), p = start(n.title || n.label);
    p.dataset.view = 'node';
    facts(n.facts, p);
    if (n.featvis !== null) {
      html('h3', {}, p, 'Feature visualisation');
      if (n.featvisFailed) html('p', {class: 'bad featvis-failed'}, p, 'Failed: ' + n.featvisFailed + ' (not shown).');
      else picture(n.featvis, 'Feature visualisation of ' + n.label, p, 'pic featvis');
    }
    for (const [title, pic, alt] of n.pictures || []) {
      html('h3', {}, p, title);
      if (pic === null) html('p', {class: 'muted'}, p, alt); else picture(pic, alt, p, 'pic wide');
    }
    if (n.words) words(n.words, p);
    const through = D.chains.filter(ch => ch.nodes.includes(id));
    if (n.maps.length) {
      html('h3', {}, p, 'Heatmap on every task image, by peak activation');
      const grid = html('div', {class: 'maps'}, p);
      for (const [i, pic, peak] of [...n.maps].sort((a, b) => b[2] - a[2])) {
        const f = html('figure', {class: 'map'}, grid);
        const alt = `Heatmap of ${n.label} on ${imageCaption(i)} (peak ${peak.toPrecision(3)})`;
        if (pic === null) html('span', {class: 'muted'}, f, 'no spatial map'); else picture(pic, alt, f);
        html('figcaption', {}, f, `image ${i + 1} · peak ${peak.toPrecision(3)}`);
      }
    } else if (n.kind === 'unit' && D.chains.length) {
      html('p', {class: 'muted'}, p, 'No chain uses this filter: pictures are computed for chain filters only.');
    }
    if (D.chains.length && n.kind !== 'cell') {
      html('h3', {}, p, `Chains through ${n.label} (${through.length})`);
      chainList(through, p);
    }
    highlight(through, id);
  }
  function showImage(i) {
    const im = D.images[i], p = start(D.views.unit + ' ' + (i + 1));
    p.dataset.view = 'image';
    if (im.pic !== null) picture(im.pic, im.caption, p, 'pic');
    html('p', {class: im.wrong ? 'bad' : ''}, p, im.caption);
    for (const row of im.rows || []) strip(row, p);
    if (im.grid) wordGrid(im.grid, p);
    const chains = D.chains.filter(ch => ch.image === i);
    if (D.views.chains) {
      html('h3', {}, p, 'Its ' + D.views.chains);
      chainList(chains, p);
    }
    highlight(chains);
  }
  function groupChains(g) {
    const members = new Set(D.groups[g].images);
    return D.chains.filter(ch => members.has(ch.image));
  }
  function heatmaps(ids, image, parent) {
    const grid = html('div', {class: 'maps'}, parent);
    for (const id of ids) {
      const n = nodes.get(id), m = n.maps.find(x => x[0] === image);
      if (!m) continue;
      const f = html('figure', {class: 'map'}, grid);
      if (m[1] === null) html('span', {class: 'muted'}, f, 'no spatial map');
      else picture(m[1], `Heatmap of ${n.label} on image ${image + 1} (peak ${m[2].toPrecision(3)})`, f);
      const b = html('button', {type: 'button', class: 'linkish'}, html('figcaption', {}, f), n.label);
      b.addEventListener('click', () => showNode(id));
      html('div', {}, f, 'peak ' + m[2].toPrecision(3));
    }
  }
  function showGroup(g) {
    const group = D.groups[g], p = start('Class ' + group.name);
    p.dataset.view = 'class';
    const chains = groupChains(g);
    const used = new Set(chains.flatMap(ch => ch.nodes));
    const rep = group.images.find(i => !D.images[i].wrong && D.chains.some(ch => ch.image === i)) ?? group.images[0];
    html('p', {}, p, (D.views.chains ? `The class's sub-network: ${used.size} nodes on the ${chains.length} chains of its `
                      : `${used.size} cells of its `) + `${group.images.length} images` +
         (rep === undefined ? '.' : `; pictures of ${D.images[rep].caption}.`));
    const grid = html('div', {class: 'classnet'}, p);
    D.columns.forEach(col => {
      const ids = col.nodes.filter(id => used.has(id) && (nodes.get(id).image === undefined || nodes.get(id).image === rep));
      if (!ids.length) return;
      const c = html('div', {class: 'classcol'}, grid);
      html('div', {class: 'colhead'}, c, col.label);
      for (const id of ids) {
        const n = nodes.get(id), f = html('figure', {class: 'map'}, c);
        const m = n.maps.find(x => x[0] === rep) || (n.pictures || []).map(([t, pic]) => [rep, pic]).find(x => x[1] !== null);
        if (m && m[1] !== null) picture(m[1], `${n.pictures ? n.pictures[0][0] : 'Heatmap of ' + n.label} on image ${rep + 1}`, f);
        const b = html('button', {type: 'button', class: 'linkish'}, html('figcaption', {}, f), n.label);
        b.addEventListener('click', () => showNode(id));
      }
    });
    highlight(chains);
  }
  function showCompare(a, b) {
    const p = start(`Compare ${D.groups[a].name} and ${D.groups[b].name}`);
    p.dataset.view = 'compare';
    const ca = new Set(groupChains(a).flatMap(ch => ch.nodes)), cb = new Set(groupChains(b).flatMap(ch => ch.nodes));
    clear();
    svg.classList.add('focus');
    const sets = {both: [], a: [], b: []};
    for (const id of new Set([...ca, ...cb])) {
      const k = ca.has(id) && cb.has(id) ? 'both' : ca.has(id) ? 'a' : 'b';
      sets[k].push(id);
      shapes.get(id).classList.add('hl', 'cmp-' + k);
    }
    for (const [k, title] of [['both', 'Shared'], ['a', D.groups[a].name + ' only'], ['b', D.groups[b].name + ' only']]) {
      html('h3', {}, p, `${title} (${sets[k].length})`);
      const ul = html('ul', {class: 'inline cmp-' + k}, p);
      for (const id of sets[k]) {
        const btn = html('button', {type: 'button', class: 'linkish'}, html('li', {}, ul), nodes.get(id).label);
        btn.addEventListener('click', () => showNode(id));
      }
    }
    const wrong = [...D.groups[a].images, ...D.groups[b].images].filter(i => D.images[i].wrong);
    for (const i of wrong) {
      html('h3', {}, p, 'Misclassified: ' + D.images[i].caption);
      chainList(D.chains.filter(ch => ch.image === i), p);
      for (const [g, used] of [[a, ca], [b, cb]]) {
        html('h4', {}, p, `How the filters of ${D.groups[g].name}'s chains fire on image ${i + 1}`);
        heatmaps([...used], i, p);
      }
    }
    document.getElementById('graph-status').textContent = 'comparing two classes';
  }

  // ------------------------------------------------------------------ controls and keyboard
  const imageSelect = document.getElementById('pick-image'), groupSelect = document.getElementById('pick-class');
  const cmpA = document.getElementById('cmp-a'), cmpB = document.getElementById('cmp-b');
  D.images.forEach((im, i) => html('option', {value: i}, imageSelect, `${i + 1}: ${im.label}`));
  document.getElementById('pick-unit').textContent = D.views.unit;
  D.groups.forEach((g, i) => { for (const s of [groupSelect, cmpA, cmpB]) html('option', {value: i}, s, g.name); });
  if (D.groups.length > 1) cmpB.value = 1;
  for (const [key, ids] of [['compare', ['cmp-a', 'cmp-b', 'cmp-go']], ['compact', ['compact']], ['classes', ['pick-class']]]) {
    if (!D.views[key]) for (const id of ids) { const e = document.getElementById(id); (e.closest('label') || e).hidden = true; }
  }
  imageSelect.addEventListener('change', () => { if (imageSelect.value !== '') showImage(+imageSelect.value); });
  groupSelect.addEventListener('change', () => { if (groupSelect.value !== '') showGroup(+groupSelect.value); });
  document.getElementById('cmp-go').addEventListener('click', () => showCompare(+cmpA.value, +cmpB.value));
  const compact = document.getElementById('compact');
  compact.addEventListener('click', () => {
    const on = compact.getAttribute('aria-pressed') !== 'true';
    compact.setAttribute('aria-pressed', String(on));
    draw(on);
    fit();
    if (last) highlight(...last);
    document.getElementById('graph-status').textContent = on ? 'chain filters only' : 'all drawn filters';
  });
  document.getElementById('reset').addEventListener('click', () => { clear(); start('Details').dataset.view = 'none'; });
  for (const b of document.querySelectorAll('[data-image]')) b.addEventListener('click', () => showImage(+b.dataset.image));

  function rove(id) {  // the one node that Tab reaches
    for (const g of nodeLayer.querySelectorAll('.node[tabindex="0"]')) g.setAttribute('tabindex', -1);
    shapes.get(id).setAttribute('tabindex', 0);
  }
  nodeLayer.addEventListener('click', e => { const g = e.target.closest('.node'); if (g) { rove(g.dataset.id); showNode(g.dataset.id); } });
  nodeLayer.addEventListener('keydown', e => {
    const g = e.target.closest('.node');
    if (!g) return;
    const id = g.dataset.id, c = colOf.get(id), col = visible[c], k = col.indexOf(id);
    let next = null;
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); showNode(id); return; }
    if (e.key === 'ArrowDown') next = col[k + 1];
    if (e.key === 'ArrowUp') next = col[k - 1];
    if (e.key === 'ArrowRight' || e.key === 'ArrowLeft') {
      const step = e.key === 'ArrowRight' ? 1 : -1;
      for (let j = c + step; j >= 0 && j < visible.length && !next; j += step) {
        const other = visible[j];
        if (other.length) next = other[Math.min(k, other.length - 1)];
      }
    }
    if (next) { e.preventDefault(); rove(next); shapes.get(next).focus(); }
  });
  document.addEventListener('keydown', e => {
    if (e.key === 'Escape') { clear(); }
    if (e.target.closest && e.target.closest('input,select,textarea')) return;
    if (e.key === '+' || e.key === '=') zoom(1 / 1.3);
    if (e.key === '-') zoom(1.3);
    if (e.key === '0') fit();
  });

  for (const img of document.querySelectorAll('img[data-pic]')) img.src = D.pics[img.dataset.pic];
  fit();
  document.body.dataset.ready = String(performance.now());
  document.dispatchEvent(new Event('explorer-ready'));
})();
