"""Figures of the clustering: UMAP scatters, stacked composition bars, crop montages and galleries.

Each function writes one PNG (matplotlib Agg, no display needed) and returns its path.

Names are data: a culture called "$x^$" or "_control" is drawn as those characters. Every figure
of the project is made under literal_text (mathtext and TeX off), and legends get their labels
explicitly, so that matplotlib never hides a label that starts with "_".
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

NOISE = -1
NOISE_COLOUR = "#d3d3d3"
DPI = 120
# rcParams under which every figure is made: text is drawn as given, never parsed as $math$ or TeX.
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}


def literal_text(func):
    """Decorator for a function that makes a figure: it runs under LITERAL_TEXT.

    The context must span the drawing (savefig) as well, since tick labels are created then.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(LITERAL_TEXT):
            return func(*args, **kwargs)

    return wrapper


def _order(values) -> list:
    """Categories in natural order: numerically when every label is a number ("250" < "1000")."""
    unique = pd.unique(pd.Series(values).dropna())
    try:
        return sorted(unique, key=float)
    except (TypeError, ValueError):
        return sorted(unique, key=str)


def _colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


@literal_text
def umap_scatter(
    df: pd.DataFrame, color_by: str, path: str | Path, max_points: int = 50_000, seed: int = 0, title: str | None = None
) -> Path:
    """UMAP plane coloured by a column (culture, concentration or a cluster label).

    A random max_points subsample keeps huge sets legible and small; points are rasterised.
    Cluster label -1 (HDBSCAN noise) is drawn first, in light grey, under the clusters.
    """
    if len(df) > max_points:
        df = df.sample(n=max_points, random_state=seed)
    values = df[color_by]
    categories = _order(values)
    noise = [c for c in categories if c == NOISE]
    others = [c for c in categories if c != NOISE]
    fig, ax = plt.subplots(figsize=(7, 6))
    size = max(0.5, min(8.0, 20_000 / max(len(df), 1)))
    handles, names = [], []
    for cat, colour in [(c, NOISE_COLOUR) for c in noise] + list(zip(others, _colours(len(others)), strict=False)):
        sel = (values == cat).to_numpy()
        handles.append(
            ax.scatter(
                df["umap_x"].to_numpy()[sel],
                df["umap_y"].to_numpy()[sel],
                s=size,
                color=colour,
                linewidths=0,
                rasterized=True,
            )
        )
        names.append("noise" if cat == NOISE else str(cat))
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title or f"UMAP coloured by {color_by}")
    if len(categories) <= 30:
        ax.legend(
            handles,
            names,
            title=color_by,
            markerscale=max(1.0, 6 / np.sqrt(size)),
            fontsize=8,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )
    return _save(fig, path)


@literal_text
def stacked_composition_bar(
    comp_df: pd.DataFrame, path: str | Path, error_bars: bool = True, title: str = "Cell-type composition per culture"
) -> Path:
    """One bar per culture stacked by cluster proportion (output of composition.composition).

    Error bars mark each segment's confidence interval at the segment's top edge.
    """
    cultures = _order(comp_df["culture"])
    clusters = _order(comp_df["cluster"])
    wide = comp_df.pivot(index="culture", columns="cluster", values="proportion")
    wide = wide.reindex(index=cultures, columns=clusters).fillna(0.0)
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(cultures) + 3), 5))
    x = np.arange(len(cultures))
    bottom = np.zeros(len(cultures))
    handles, names = [], []
    for cluster, colour in zip(clusters, _colours(len(clusters)), strict=False):
        p = wide[cluster].to_numpy()
        handles.append(ax.bar(x, p, bottom=bottom, color=NOISE_COLOUR if cluster == NOISE else colour, width=0.8))
        names.append("noise" if cluster == NOISE else str(cluster))
        if error_bars and {"ci_low", "ci_high"} <= set(comp_df.columns):
            ci = (
                comp_df[comp_df["cluster"] == cluster]
                .set_index("culture")
                .reindex(cultures)[["ci_low", "ci_high"]]
                .fillna(0.0)
                .to_numpy()
            )
            yerr = np.clip(np.stack([p - ci[:, 0], ci[:, 1] - p]), 0, None)
            ax.errorbar(x, bottom + p, yerr=yerr, fmt="none", ecolor="black", elinewidth=0.6, capsize=2)
        bottom += p
    ax.set_xticks(x, [str(c) for c in cultures], rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("culture")
    ax.set_ylabel("proportion of cells")
    ax.set_title(title)
    ax.legend(handles, names, title="cluster", fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, path)


@literal_text
def crop_montage(
    crops: np.ndarray,
    labels,
    path: str | Path,
    per_cluster: int = 10,
    seed: int = 0,
    include_noise: bool = False,
    cluster_sizes: dict | None = None,
) -> Path:
    """A grid of per_cluster random crops for every cluster (one row each), to inspect by eye.

    crops: (N, H, W) uint8; labels: (N,) int cluster labels (-1 = noise).
    cluster_sizes: cells per cluster for the row labels, when `crops` is only a sample of them.
    Raises ValueError if crops is not (N, H, W) with N = len(labels).

    The grid is assembled into one image before plotting: one imshow, however many crops.
    """
    crops = np.asarray(crops)
    labels = np.asarray(labels)
    if crops.ndim != 3 or len(crops) != len(labels):
        raise ValueError(f"crops must be (N, H, W) with N = len(labels), got {crops.shape}")
    clusters = [c for c in _order(labels) if include_noise or c != NOISE]
    h, w = crops.shape[1:]
    pad = 2
    grid = np.full((max(len(clusters), 1) * (h + pad), per_cluster * (w + pad)), 255, np.uint8)
    rng = np.random.default_rng(seed)
    for row, cluster in enumerate(clusters):
        members = np.flatnonzero(labels == cluster)
        pick = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
        for col, i in enumerate(pick):
            grid[row * (h + pad) : row * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = crops[i]
    # At least one screen pixel per crop pixel, so large crops keep their detail.
    fig, ax = plt.subplots(
        figsize=(max(grid.shape[1] / DPI, per_cluster * 0.9) + 1.5, max(grid.shape[0] / DPI, len(clusters) * 0.9) + 0.6)
    )
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    counts = cluster_sizes or {c: int((labels == c).sum()) for c in clusters}
    ax.set_yticks(
        [r * (h + pad) + h / 2 for r in range(len(clusters))],
        [f"{'noise' if c == NOISE else f'cluster {c}'} (n={counts[c]})" for c in clusters],
    )
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"{per_cluster} random crops per cluster")
    return _save(fig, path)


@literal_text
def cluster_gallery(
    nearest: dict,
    random: dict,
    path: str | Path,
    row_labels: dict | None = None,
    title: str = "Cells nearest each cluster's centre (left) and random cells (right)",
) -> Path:
    """One row per cluster: its crops nearest the centre, a gap, then random crops of it.

    nearest, random: {cluster: (m, H, W) uint8 crops}, m up to the figure's width (the widest
    row sets it); row_labels: {cluster: text} for the row (default "cluster c"). The grid is one
    image (one imshow). Raises ValueError for crops that are not (m, H, W) or differ in size.
    """
    clusters = list(nearest)
    stacks = [np.asarray(s) for c in clusters for s in (nearest[c], random.get(c, np.zeros((0, 1, 1))))]
    shapes = {s.shape[1:] for s in stacks if len(s)}
    if any(s.ndim != 3 for s in stacks) or len(shapes) > 1:
        raise ValueError(f"crops must be (m, H, W) of one size, got {sorted(shapes)}")
    h, w = shapes.pop() if shapes else (8, 8)
    left = max([len(nearest[c]) for c in clusters] + [1])
    right = max([len(random.get(c, ())) for c in clusters] + [1])
    pad, gap = 2, max(8, w // 3)
    width = (left + right) * (w + pad) + gap
    grid = np.full((max(len(clusters), 1) * (h + pad), width), 255, np.uint8)
    for row, cluster in enumerate(clusters):
        y = row * (h + pad)
        for col, crop in enumerate(np.asarray(nearest[cluster])):
            grid[y : y + h, col * (w + pad) : col * (w + pad) + w] = crop
        for col, crop in enumerate(np.asarray(random.get(cluster, ()))):
            x = left * (w + pad) + gap + col * (w + pad)
            grid[y : y + h, x : x + w] = crop
    fig, ax = plt.subplots(
        figsize=(
            max(grid.shape[1] / DPI, (left + right) * 0.6) + 2.0,
            max(grid.shape[0] / DPI, len(clusters) * 0.6) + 0.8,
        )
    )
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
    labels = row_labels or {}
    ax.set_yticks(
        [r * (h + pad) + h / 2 for r in range(len(clusters))], [str(labels.get(c, f"cluster {c}")) for c in clusters]
    )
    ax.set_xticks(
        [left * (w + pad) / 2, left * (w + pad) + gap + right * (w + pad) / 2], ["nearest the centre", "random"]
    )
    ax.xaxis.tick_top()
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, pad=24)
    return _save(fig, path)


THUMBNAIL_PX = 280


def thumbnail(png: str | Path, max_px: int = THUMBNAIL_PX, colours: int = 64) -> bytes:
    """A small PNG of a figure for embedding: longest side at most max_px, a palette of colours.

    Returns the PNG bytes (Pillow, LANCZOS resampling, adaptive palette, optimised). Raises
    OSError (Pillow's) for a file that is not an image.
    """
    import io

    from PIL import Image

    with Image.open(png) as image:
        small = image.convert("RGB")
        small.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        small = small.quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        small.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
