"""One variant's section of the composition report, built from its cluster labels.

The labels table can hold millions of cells; figures and statistics read a seeded sample of
at most max_cells rows (proportions and their bootstrap intervals are estimates anyway), and
crops are read only for the few cells a figure shows. The per-cell table streams every cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from gbm_assets.analysis.cell_types import (
    area_unit,
    cell_pixel_sizes,
    cluster_profiles,
    nearest_to_centre,
    random_members,
    read_measurements,
    write_cell_table,
)
from gbm_assets.analysis.clustering import cluster_metrics
from gbm_assets.analysis.composition import (
    chi_square_culture_vs_type,
    composition,
    composition_by_units,
    composition_error,
    culture_difference_test,
    experimental_units,
)
from gbm_assets.analysis.figures import cluster_gallery, stacked_composition_bar, umap_scatter
from gbm_assets.analysis.report import VariantSection
from gbm_assets.analysis.truth import has_truth
from gbm_assets.imaging.crop_lookup import read_crops
from gbm_assets.storage import sample_batches

LABELINGS = {"hdbscan": "HDBSCAN (leaf)", "gmm": "Gaussian mixture", "auto": "automatic k"}


def sample_labels(path: str | Path, max_cells: int, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of a labels file (all rows if it is small), without the probability vectors."""
    columns = [c for c in pq.ParquetFile(path).schema_arrow.names if c != "gmm_probs"]
    frames = [b.to_pandas() for b in sample_batches(path, max_cells, seed, columns, batch_size=65536)]
    return pd.concat(frames, ignore_index=True)


def labeling_metrics(labels: pd.DataFrame, truth: pd.Series | None = None, seed: int = 0) -> dict[str, dict]:
    """cluster_metrics of every labelling in LABELINGS; with truth, scored on the cells whose type is known."""
    known = truth.notna().to_numpy() if truth is not None else np.ones(len(labels), bool)
    xy = labels[["umap_x", "umap_y"]].to_numpy()[known]
    expected = truth[known].astype(str).to_numpy() if truth is not None else None
    return {column: cluster_metrics(xy, labels[column].to_numpy()[known], expected, seed=seed) for column in LABELINGS}


def gallery_crops(crops_dir: str | Path, crop_ids: pd.Series, picks: dict) -> dict:
    """{cluster: (m, S, S) uint8 crops} for {cluster: row positions}, read in one filtered scan.

    Reads only the picked crops (read_crops streams the dataset with a crop_id filter); a cell
    picked twice is read once.
    """
    positions = np.concatenate([np.asarray(p, int) for p in picks.values()]) if picks else np.zeros(0, int)
    ids = crop_ids.astype(str).to_numpy()
    unique = pd.unique(ids[positions]) if len(positions) else np.zeros(0, str)
    crops = read_crops(crops_dir, unique) if len(unique) else np.zeros((0, 1, 1), np.uint8)
    where = pd.Index(unique)
    return {c: crops[where.get_indexer(ids[np.asarray(p, int)])] for c, p in picks.items()}


def _row_label(cluster, profiles: pd.DataFrame, area_unit: str) -> str:
    p = profiles[profiles["cluster"] == cluster]
    if p.empty:
        return f"cluster {cluster}"
    p = p.iloc[0]
    text = (
        f"cluster {cluster} (n={int(p['n_cells'])})\narea {p['median_area']:.0f} {area_unit}, "
        f"elong. {p['median_elongation']:.1f}"
    )
    return text + ("\npossible artefact" if p["artefact"] else "")


def build_section(
    variant: str,
    labels: pd.DataFrame,
    crops_dir: str | Path,
    out_dir: str | Path,
    confusion_pngs=(),
    auto_k: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    labels_path: str | Path | None = None,
    embeddings_path: str | Path | None = None,
    pixel_size_um: float | Mapping[str, float] | None = None,
    n_perm: int = 9999,
    per_cluster: int = 10,
) -> VariantSection:
    """Figures, cell types, composition with intervals, culture tests and cluster metrics of one variant.

    labels: a (sampled) labels table: provenance + label columns, and optionally `morphotype`
    (synthetic truth). Composition, cell types and the gallery use the HDBSCAN cell types, as the
    thesis did. With plate/replicate/image provenance, composition intervals come from a
    bootstrap over experimental units and cultures are compared by a permutation test with
    replicates as the units (composition.experimental_units, culture_difference_test); without
    it, from a bootstrap over cells and no such test. Shape measurements (and qc labels) are read
    from crops_dir for the sampled cells only; the gallery reads per_cluster crops nearest each
    cluster's UMAP centre and per_cluster random ones. labels_path (the full labels file) makes
    the per-cell table <out_dir>/cells.parquet and cells.csv (cell_types.write_cell_table, with
    embedding columns from embeddings_path when it matches). pixel_size_um (µm per pixel) turns
    areas into µm²: one size for every cell, or {plate: size} (pixel_size.coordinates_pixel_sizes),
    each cell converted with its plate's, when every sampled cell's plate has one (else all stay in
    px², and the section's area_unit says which); the mapping also fills the per-cell table's
    Metadata_pixel_size_um.
    """
    out_dir = Path(out_dir)
    truth = labels["morphotype"] if "morphotype" in labels and has_truth(labels["morphotype"]) else None
    metrics = labeling_metrics(labels, truth, seed)
    scatters = [
        umap_scatter(labels, color, out_dir / f"umap_{color}.png", seed=seed, title=f"{variant}: UMAP by {color}")
        for color in ("culture", "hdbscan", "gmm", "concentration")
    ]
    hdbscan = labels["hdbscan"].to_numpy()
    cultures = labels["culture"].astype(str).to_numpy()
    test, level = None, "cell"
    if {"plate", "replicate", "image"} <= set(labels.columns):
        units, level = experimental_units(labels)
        comp = composition_by_units(hdbscan, cultures, units.to_numpy(), n_boot=n_boot, seed=seed)
        test = culture_difference_test(hdbscan, cultures, units.to_numpy(), n_perm=n_perm, seed=seed)
    else:
        comp = composition(hdbscan, cultures, n_boot=n_boot, seed=seed)
    bar = stacked_composition_bar(comp, out_dir / "composition.png", title=f"{variant}: HDBSCAN cell types per culture")
    cells = pd.concat(
        [labels.reset_index(drop=True), read_measurements(crops_dir, labels["crop_id"]).drop(columns="crop_id")], axis=1
    )
    sizes = cell_pixel_sizes(labels["plate"] if "plate" in labels else [], pixel_size_um)
    profiles = cluster_profiles(cells, "hdbscan", sizes)
    unit = area_unit(sizes)
    gallery = None
    nearest = nearest_to_centre(labels[["umap_x", "umap_y"]].to_numpy(), hdbscan, per_cluster)
    if nearest:
        shown = gallery_crops(
            crops_dir,
            labels["crop_id"],
            {("near", c): p for c, p in nearest.items()}
            | {("random", c): p for c, p in random_members(hdbscan, per_cluster, seed).items()},
        )
        gallery = cluster_gallery(
            {c: shown[("near", c)] for c in nearest},
            {c: shown[("random", c)] for c in nearest},
            out_dir / "cell_types.png",
            row_labels={c: _row_label(c, profiles, unit) for c in nearest},
            title=f"{variant}: cells nearest each cluster's centre (left) and random cells (right)",
        )
    error = None
    if truth is not None:
        known = truth.notna().to_numpy()
        error = composition_error(hdbscan[known], truth[known].astype(str).to_numpy(), cultures[known])
    table = None
    if labels_path is not None:
        per_plate = pixel_size_um if isinstance(pixel_size_um, Mapping) else None
        table = write_cell_table(
            labels_path, crops_dir, out_dir / "cells", embeddings_path=embeddings_path, pixel_sizes=per_plate
        )
    return VariantSection(
        variant=variant,
        confusion_matrices=list(confusion_pngs),
        umap_scatters=scatters,
        composition_bar=bar,
        gallery=gallery,
        composition=comp,
        chi_square=chi_square_culture_vs_type(hdbscan, cultures),
        cluster_metrics=metrics,
        auto_k=auto_k,
        composition_error=error,
        profiles=profiles,
        area_unit=unit,
        culture_test=test,
        unit_level=level,
        cell_table=table,
    )
