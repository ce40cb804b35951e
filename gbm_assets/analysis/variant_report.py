"""One variant's section of the composition report, built from its cluster labels.

The labels table can hold millions of cells; figures and statistics read a seeded sample of
at most max_cells rows (proportions and their bootstrap intervals are estimates anyway).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from gbm_assets.analysis.clustering import NOISE, cluster_metrics
from gbm_assets.analysis.composition import chi_square_culture_vs_type, composition, composition_error
from gbm_assets.analysis.figures import crop_montage, stacked_composition_bar, umap_scatter
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


def montage_picks(labels: pd.Series, per_cluster: int = 10, seed: int = 0) -> np.ndarray:
    """Row positions of per_cluster random cells of every cluster (noise excluded)."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels.to_numpy() == c), size=min(per_cluster, int((labels == c).sum())), replace=False)
             for c in sorted(labels.unique()) if c != NOISE]
    return np.concatenate(picks) if picks else np.zeros(0, int)


def build_section(
    variant: str, labels: pd.DataFrame, crops_dir: str | Path, out_dir: str | Path,
    confusion_pngs=(), auto_k: int | None = None, n_boot: int = 1000, seed: int = 0,
) -> VariantSection:
    """Figures, composition with bootstrap CIs, chi-square and cluster metrics of one variant.

    labels: provenance + label columns, and optionally `morphotype` (synthetic truth).
    Composition and the montage use the HDBSCAN cell types, as the thesis did.
    """
    out_dir = Path(out_dir)
    truth = labels["morphotype"] if "morphotype" in labels and has_truth(labels["morphotype"]) else None
    metrics = labeling_metrics(labels, truth, seed)
    scatters = [
        umap_scatter(labels, color, out_dir / f"umap_{color}.png", seed=seed, title=f"{variant}: UMAP by {color}")
        for color in ("culture", "hdbscan", "gmm", "concentration")
    ]
    comp = composition(labels["hdbscan"].to_numpy(), labels["culture"].astype(str).to_numpy(), n_boot=n_boot, seed=seed)
    bar = stacked_composition_bar(comp, out_dir / "composition.png", title=f"{variant}: HDBSCAN cell types per culture")
    picks = montage_picks(labels["hdbscan"], seed=seed)
    montage = None
    if len(picks):
        crops = read_crops(crops_dir, labels["crop_id"].iloc[picks])
        montage = crop_montage(crops, labels["hdbscan"].to_numpy()[picks], out_dir / "montage.png", seed=seed,
                               cluster_sizes=labels["hdbscan"].value_counts().to_dict())
    error = None
    if truth is not None:
        known = truth.notna().to_numpy()
        error = composition_error(labels["hdbscan"].to_numpy()[known], truth[known].astype(str).to_numpy(),
                                  labels["culture"].astype(str).to_numpy()[known])
    return VariantSection(
        variant=variant,
        confusion_matrices=list(confusion_pngs),
        umap_scatters=scatters,
        composition_bar=bar,
        montage=montage,
        composition=comp,
        chi_square=chi_square_culture_vs_type(labels["hdbscan"].to_numpy(), labels["culture"].astype(str).to_numpy()),
        cluster_metrics=metrics,
        auto_k=auto_k,
        composition_error=error,
    )
