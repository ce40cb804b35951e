"""The cell explorer: one self-contained HTML page with the UMAP of a variant's cells.

The thesis judged its encoders by eye on a UMAP where hovering a point shows the cell behind it.
This page does that from disk, with no server and no network: a hand-written canvas scatter, the
cells' thumbnails embedded as data URIs, a legend that filters to one category and a gallery of
that category's cells. window.explorer exposes what a test needs (screen position of a point,
the visible points, a ready flag).

Thumbnails are lossless WebP of the crop shrunk with cv2.INTER_AREA and reduced to 32 grey
levels: 8-bit thumbnails of phase-contrast crops take ~1.7 kB each (about 48 MB of base64 for
20,000 points), 32 levels about 1 kB (28 MB on real T98G crops), and the image shown stays exactly
make_thumbnails(crop), so what a person sees is checkably the cell's own crop.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from gbm_assets.storage import write_bytes_atomic

CLUSTERINGS = ("hdbscan", "gmm", "auto")  # label -1 is noise, drawn grey
COLOURINGS = (*CLUSTERINGS, "culture", "concentration")
TOOLTIP_FIELDS = (
    "crop_id", "plate", "image", "x", "y", "culture", "concentration", "replicate", "timepoint_h",
    "well", "position", *CLUSTERINGS,
)
STRATA = ("culture", "hdbscan")


def _fair_shares(sizes: np.ndarray, total: int) -> np.ndarray:
    """Water-filling: groups smaller than an equal share keep all rows, the rest split what is left."""
    quota = np.zeros(len(sizes), np.int64)
    left = total
    for rank, g in enumerate(np.argsort(sizes, kind="stable")):
        quota[g] = min(int(sizes[g]), left // (len(sizes) - rank))
        left -= quota[g]
    return quota


def sample_for_explorer(labels: pd.DataFrame, max_points: int = 20_000, seed: int = 0) -> pd.DataFrame:
    """At most max_points rows, shared evenly across (culture, HDBSCAN cluster) groups; deterministic.

    A uniform sample would bury rare cultures and small clusters under the big ones, which are the
    cells one most wants to look at. Small groups are kept whole; the others get equal shares
    (every group is represented as long as there are no more groups than max_points).
    Rows keep their input order; the index is reset.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be positive, got {max_points}")
    if len(labels) <= max_points:
        return labels.reset_index(drop=True)
    group = labels.groupby(list(STRATA), sort=True, dropna=False).ngroup().to_numpy()
    sizes = np.bincount(group)
    members = np.split(np.argsort(group, kind="stable"), np.cumsum(sizes)[:-1])
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(rows, size=q, replace=False)
                           for rows, q in zip(members, _fair_shares(sizes, max_points))])
    return labels.iloc[np.sort(keep)].reset_index(drop=True)


def make_thumbnails(crops: np.ndarray, size: int = 48, grey_levels: int = 32) -> np.ndarray:
    """(n, size, size) uint8: crops shrunk with INTER_AREA, then reduced to grey_levels levels over 0..255."""
    crops = np.asarray(crops)
    if crops.ndim != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be a uint8 array (n, S, S), got {crops.dtype} {crops.shape}")
    if not 2 <= grey_levels <= 256:
        raise ValueError(f"grey_levels must be in 2..256, got {grey_levels}")
    if crops.shape[1:] == (size, size):
        thumbs = crops
    elif len(crops):
        thumbs = np.stack([cv2.resize(c, (size, size), interpolation=cv2.INTER_AREA) for c in crops])
    else:
        thumbs = np.zeros((0, size, size), np.uint8)
    step = 255 / (grey_levels - 1)
    lut = np.round(np.round(np.arange(256) / step) * step).astype(np.uint8)
    return lut[thumbs]


def _data_uri(thumb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".webp", thumb, [cv2.IMWRITE_WEBP_QUALITY, 101])  # quality > 100: lossless
    if not ok:
        raise RuntimeError("OpenCV could not encode a WebP thumbnail")
    return "data:image/webp;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _text(value) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return "na"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _natural_key(text: str):
    """Numbers in numeric order ("250" < "1000"), then other labels alphabetically."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _categorical(values: pd.Series) -> dict:
    """A column as ordered category labels and one code per point: repeated labels cost a few bytes."""
    text = [_text(v) for v in values.tolist()]
    cats = sorted(set(text), key=_natural_key)
    index = {c: k for k, c in enumerate(cats)}
    return {"cats": cats, "codes": [index[t] for t in text]}


def _payload(points: pd.DataFrame, thumbs: np.ndarray, colourings: list, fields: list, gallery_size: int) -> str:
    data = {
        "x": np.round(points["umap_x"].to_numpy(float), 4).tolist(),
        "y": np.round(points["umap_y"].to_numpy(float), 4).tolist(),
        "colourings": colourings,
        "clusterings": [c for c in CLUSTERINGS if c in colourings],
        "gallerySize": gallery_size,
        "columns": {f: _categorical(points[f]) for f in dict.fromkeys(fields + colourings)},
        "thumbs": [_data_uri(t) for t in thumbs],
    }
    return script_json(data)


# Characters that may never appear raw inside a <script> element: "</script" would end it,
# "<!--" (with "<script") switches the HTML parser into a state where the real end tag is not
# seen; ">" and "&" are escaped as well (OWASP's rule for data in scripts), and U+2028/U+2029
# end a line in older JavaScript.
_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_UNSAFE_RE = re.compile("[<>&\u2028\u2029]")


def script_json(value) -> str:
    """value as JSON text that is safe inside an HTML <script> element, whatever strings it holds.

    The characters < > & U+2028 U+2029 are written as \\u escapes (they can only occur inside
    JSON strings, so json.loads of the result gives value back unchanged); no sequence in the
    output can close the script or open an HTML comment. Raises TypeError for what json cannot encode.
    """
    text = json.dumps(value, separators=(",", ":"))
    return _SCRIPT_UNSAFE_RE.sub(lambda m: _SCRIPT_UNSAFE[m.group()], text)


def write_explorer(
    path: str | Path,
    variant: str,
    points: pd.DataFrame,
    thumbnails: np.ndarray,
    thumb_size: int = 48,
    grey_levels: int = 32,
    gallery_size: int = 40,
) -> Path:
    """Write the explorer page for points (one row per cell) and their crops, atomically; return its path.

    points needs crop_id, umap_x, umap_y and at least one of COLOURINGS; thumbnails is a uint8
    (n, S, S) array of the cells' crops, aligned with the rows of points.
    """
    missing = sorted({"crop_id", "umap_x", "umap_y"} - set(points.columns))
    if missing:
        raise ValueError(f"points lack columns {missing}")
    colourings = [c for c in COLOURINGS if c in points.columns]
    fields = [c for c in TOOLTIP_FIELDS if c in points.columns]
    if not colourings:
        raise ValueError(f"points have none of the colourings {COLOURINGS}")
    if len(points) != len(thumbnails):
        raise ValueError(f"{len(points)} points but {len(thumbnails)} thumbnails")
    if not np.isfinite(points[["umap_x", "umap_y"]].to_numpy(float)).all():
        raise ValueError("umap_x / umap_y hold non-finite values")
    thumbs = make_thumbnails(thumbnails, thumb_size, grey_levels)
    parts = {
        "TITLE": html.escape(f"Cell explorer: {variant}"),
        "COUNT": f"{len(points):,} cells",
        "OPTIONS": "".join(f'<option value="{c}">{c}</option>' for c in colourings),
        "FIELDS": "".join(f'<dt>{f}</dt><dd data-field="{f}"></dd>' for f in fields),
        "THUMB": str(2 * thumb_size),
        "DATA": _payload(points, thumbs, colourings, fields, gallery_size),
    }
    # One pass, so that text inserted (a variant name, a crop id) is never substituted again.
    page = re.sub(r"__([A-Z]+)__", lambda m: parts[m.group(1)], _PAGE)
    return write_bytes_atomic(path, page.encode("utf-8"))


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
  * { box-sizing: border-box; }
  html, body { margin: 0; height: 100%; font: 13px system-ui, sans-serif; color: #222; }
  body { display: flex; flex-direction: column; }
  header { display: flex; gap: 16px; align-items: center; padding: 8px 12px; border-bottom: 1px solid #ddd; }
  header h1 { font-size: 16px; margin: 0; }
  #status { color: #666; }
  main { flex: 1; display: flex; min-height: 0; }
  #map-wrap { flex: 1; position: relative; min-width: 0; }
  #map { position: absolute; inset: 0; cursor: crosshair; }
  #tooltip { position: absolute; pointer-events: none; background: #fff; border: 1px solid #bbb;
             box-shadow: 0 2px 8px rgba(0,0,0,.25); padding: 6px; display: flex; gap: 8px; z-index: 2; }
  #tooltip[hidden] { display: none; }
  #tooltip-img { width: __THUMB__px; height: __THUMB__px; image-rendering: pixelated; background: #000; }
  #tooltip dl { margin: 0; display: grid; grid-template-columns: auto auto; gap: 0 8px; font-size: 12px; }
  #tooltip dt { color: #777; }
  #tooltip dd { margin: 0; white-space: nowrap; }
  aside { width: 360px; border-left: 1px solid #ddd; display: flex; flex-direction: column; min-height: 0; }
  aside h2 { font-size: 14px; margin: 10px 12px 6px; }
  #legend { list-style: none; margin: 0; padding: 0 12px; max-height: 40%; overflow-y: auto; }
  .legend-item { display: flex; align-items: center; gap: 6px; padding: 2px 4px; cursor: pointer; border-radius: 3px; }
  .legend-item:hover { background: #f0f0f0; }
  .legend-item.active { background: #e3ecf7; font-weight: 600; }
  .legend-item.dimmed { opacity: .45; }
  .swatch { width: 12px; height: 12px; border-radius: 50%; flex: none; }
  .count { color: #888; margin-left: auto; }
  #gallery { flex: 1; overflow-y: auto; padding: 0 12px 12px; display: flex; flex-wrap: wrap; gap: 3px; align-content: flex-start; }
  #gallery img { width: 62px; height: 62px; image-rendering: pixelated; cursor: pointer; }
  #gallery p { color: #777; }
</style>
</head>
<body>
<header>
  <h1>__TITLE__</h1>
  <label>Colour by <select id="colour-by">__OPTIONS__</select></label>
  <button id="show-all" type="button" disabled>show all</button>
  <span id="status">__COUNT__</span>
  <span style="color:#999">wheel: zoom, drag: pan, double-click: reset view</span>
</header>
<main>
  <div id="map-wrap">
    <canvas id="map"></canvas>
    <div id="tooltip" hidden><img id="tooltip-img" alt="crop"><dl>__FIELDS__</dl></div>
  </div>
  <aside>
    <h2>Legend</h2>
    <ul id="legend"></ul>
    <h2 id="gallery-title">Gallery</h2>
    <div id="gallery"></div>
  </aside>
</main>
<script type="application/json" id="explorer-data">__DATA__</script>
<script>
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("explorer-data").textContent);
  const n = data.x.length;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                   "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
                   "#dbdb8d", "#9edae5"];
  const NOISE_COLOUR = "#c8c8c8";
  const HOVER_PX = 8, MARGIN = 16, R = n > 5000 ? 1.5 : 2.5;
  const $ = (id) => document.getElementById(id);
  const canvas = $("map"), ctx = canvas.getContext("2d"), wrap = $("map-wrap");
  const tooltip = $("tooltip"), tipImg = $("tooltip-img");
  const tipFields = Array.from(tooltip.querySelectorAll("[data-field]"));
  const select = $("colour-by"), showAll = $("show-all"), status = $("status");
  const legend = $("legend"), gallery = $("gallery"), galleryTitle = $("gallery-title");

  let width = 1, height = 1, view = {k: 1, x: 0, y: 0}, drag = null;
  let colouring = null, filter = null, visible = new Int32Array(0), hovered = -1;
  const bx = new Float32Array(n), by = new Float32Array(n);
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < n; i++) {
    x0 = Math.min(x0, data.x[i]); x1 = Math.max(x1, data.x[i]);
    y0 = Math.min(y0, data.y[i]); y1 = Math.max(y1, data.y[i]);
  }

  function layout() {  // fit the data into the canvas, same scale on both axes, y up
    const box = wrap.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    width = Math.max(1, Math.floor(box.width)); height = Math.max(1, Math.floor(box.height));
    canvas.width = Math.round(width * dpr); canvas.height = Math.round(height * dpr);
    canvas.style.width = width + "px"; canvas.style.height = height + "px";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const s = Math.min((width - 2 * MARGIN) / ((x1 - x0) || 1), (height - 2 * MARGIN) / ((y1 - y0) || 1));
    const ox = (width - s * (x1 - x0)) / 2, oy = (height - s * (y1 - y0)) / 2;
    for (let i = 0; i < n; i++) { bx[i] = ox + s * (data.x[i] - x0); by[i] = height - oy - s * (data.y[i] - y0); }
  }
  const sx = (i) => view.k * bx[i] + view.x;
  const sy = (i) => view.k * by[i] + view.y;
  const value = (field, i) => data.columns[field].cats[data.columns[field].codes[i]];
  const label = (c) => colouring.noise === c ? "noise (-1)" : colouring.cats[c];

  function setColouring(name) {
    const col = data.columns[name], cats = col.cats;
    const members = cats.map(() => []);
    for (let i = 0; i < n; i++) members[col.codes[i]].push(i);
    const noise = data.clusterings.includes(name) ? cats.indexOf("-1") : -1;
    let k = 0;
    const colours = cats.map((c, j) => j === noise ? NOISE_COLOUR
      : k < PALETTE.length ? PALETTE[k++] : "hsl(" + ((k++ * 137.508) % 360).toFixed(1) + ",65%,50%)");
    const order = cats.map((c, j) => j).sort((a, b) => (b === noise) - (a === noise));  // noise underneath
    colouring = {name, cats, colours, noise, order, groups: members.map((m) => Int32Array.from(m))};
    colouring.all = Int32Array.from(order.flatMap((c) => Array.from(colouring.groups[c])));
    select.value = name;
    legend.replaceChildren(...cats.map((cat, c) => {
      const li = document.createElement("li"), swatch = document.createElement("span");
      const text = document.createElement("span"), count = document.createElement("span");
      li.className = "legend-item"; li.dataset.category = cat;
      swatch.className = "swatch"; swatch.style.background = colours[c];
      text.textContent = label(c);
      count.className = "count"; count.textContent = colouring.groups[c].length;
      li.append(swatch, text, count);
      li.addEventListener("click", () => setFilter(filter === c ? null : c));
      return li;
    }));
    setFilter(null);
  }

  function setFilter(c) {
    filter = c;
    visible = c === null ? colouring.all : colouring.groups[c];
    legend.querySelectorAll(".legend-item").forEach((li, j) => {
      li.classList.toggle("active", j === c); li.classList.toggle("dimmed", c !== null && j !== c);
    });
    showAll.disabled = c === null;
    status.textContent = (c === null ? "" : visible.length.toLocaleString() + " of ") + n.toLocaleString() + " cells";
    renderGallery();
    hovered = -1; tooltip.hidden = true;
    draw();
  }

  function renderGallery() {
    if (filter === null) {
      galleryTitle.textContent = "Gallery";
      const hint = document.createElement("p");
      hint.textContent = "Click a legend entry to see its cells here.";
      gallery.replaceChildren(hint);
      return;
    }
    const g = colouring.groups[filter], m = Math.min(data.gallerySize, g.length);
    galleryTitle.textContent = colouring.name + " " + label(filter) + ": " + m + " of " + g.length + " cells";
    const imgs = [];
    for (let k = 0; k < m; k++) {
      const i = g[Math.floor(k * g.length / m)], img = document.createElement("img");
      img.src = data.thumbs[i]; img.title = value("crop_id", i); img.dataset.index = i;
      img.addEventListener("mouseenter", () => hover(i));
      img.addEventListener("mouseleave", () => hover(-1));
      imgs.push(img);
    }
    gallery.replaceChildren(...imgs);
  }

  function draw() {
    ctx.clearRect(0, 0, width, height);
    for (const c of filter === null ? colouring.order : [filter]) {
      const g = colouring.groups[c];
      ctx.fillStyle = colouring.colours[c];
      for (let j = 0; j < g.length; j++) ctx.fillRect(sx(g[j]) - R, sy(g[j]) - R, 2 * R, 2 * R);
    }
    if (hovered >= 0) {
      ctx.strokeStyle = "#000"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(sx(hovered), sy(hovered), R + 4, 0, 2 * Math.PI); ctx.stroke();
    }
  }

  function hover(i) {
    if (i !== hovered) { hovered = i; draw(); }
    if (i < 0) tooltip.hidden = true;
  }

  function nearest(px, py) {  // the topmost visible point within HOVER_PX
    let best = -1, bestD = HOVER_PX * HOVER_PX;
    for (let j = 0; j < visible.length; j++) {
      const i = visible[j], dx = sx(i) - px, dy = sy(i) - py, d = dx * dx + dy * dy;
      if (d <= bestD) { best = i; bestD = d; }
    }
    return best;
  }

  function showTooltip(i, px, py) {
    if (tooltip.dataset.index !== String(i)) {
      tipImg.src = data.thumbs[i];
      for (const el of tipFields) el.textContent = value(el.dataset.field, i);
      tooltip.dataset.index = i;
    }
    tooltip.hidden = false;
    const left = px + 14 + tooltip.offsetWidth > width ? px - 14 - tooltip.offsetWidth : px + 14;
    const top = Math.max(0, Math.min(py + 14, height - tooltip.offsetHeight));
    tooltip.style.left = Math.max(0, left) + "px"; tooltip.style.top = top + "px";
  }

  canvas.addEventListener("mousemove", (e) => {
    const box = canvas.getBoundingClientRect(), px = e.clientX - box.left, py = e.clientY - box.top;
    if (drag && !(e.buttons & 1)) drag = null;  // released outside the window
    if (drag) {
      view.x = drag.x + e.clientX - drag.cx; view.y = drag.y + e.clientY - drag.cy;
      hover(-1); draw();
      return;
    }
    const i = nearest(px, py);
    hover(i);
    if (i >= 0) showTooltip(i, px, py);
  });
  canvas.addEventListener("mouseleave", () => hover(-1));
  canvas.addEventListener("mousedown", (e) => { drag = {x: view.x, y: view.y, cx: e.clientX, cy: e.clientY}; });
  window.addEventListener("mouseup", () => { drag = null; });
  canvas.addEventListener("dblclick", () => { view = {k: 1, x: 0, y: 0}; draw(); });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const box = canvas.getBoundingClientRect(), px = e.clientX - box.left, py = e.clientY - box.top;
    const k = Math.min(100, Math.max(1, view.k * Math.exp(-e.deltaY * 0.0015))), f = k / view.k;
    view = {k, x: px - (px - view.x) * f, y: py - (py - view.y) * f};
    hover(-1); draw();
  }, {passive: false});
  select.addEventListener("change", () => setColouring(select.value));
  showAll.addEventListener("click", () => setFilter(null));
  window.addEventListener("resize", () => { layout(); draw(); });

  window.explorer = {
    ready: false,
    n,
    /** Viewport (client) coordinates of point i, for page.mouse.move. */
    screenPosition: (i) => {
      const box = canvas.getBoundingClientRect();
      return {x: box.left + sx(i), y: box.top + sy(i)};
    },
    visibleIndices: () => Array.from(visible),
    colourBy: setColouring,
    showAll: () => setFilter(null),
  };
  layout();
  setColouring(data.colourings[0]);
  window.explorer.readyMs = performance.now();  // since navigation start
  window.explorer.ready = true;
  document.body.dataset.ready = "true";
})();
</script>
</body>
</html>
"""
