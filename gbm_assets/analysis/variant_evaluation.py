"""Scoring one variant's embeddings the thesis' way, beside the raw-pixel baseline.

For each feature set (the embedding, its rotation/flip-invariant mean, raw pixels) and each
target (culture, concentration, and the true morphotype on synthetic plates) a random forest is
trained on 80% of the images and tested on the other 20% (evaluation.evaluate_features).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gbm_assets.analysis.evaluation import evaluate_features, plot_confusion, raw_pixel_features
from gbm_assets.imaging.crop_lookup import read_crops

TARGETS = ("culture", "concentration", "morphotype")
FEATURE_SETS = {"embedding": "embedding", "embedding_invariant": "invariant embedding", "raw_pixels": "raw pixels"}


def raw_pixels_for(crops_dir: str | Path, crop_ids: pd.Series, size: int = 32) -> np.ndarray:
    """Block-averaged raw pixels (n, size*size) of the given crops, in crop_ids order."""
    crops = read_crops(crops_dir, crop_ids)
    return raw_pixel_features(crops, size=min(size, crops.shape[1]))


def evaluate_variant(
    rows: pd.DataFrame,
    features: dict[str, np.ndarray],
    out_dir: str | Path,
    title: str,
    seed: int = 0,
) -> tuple[pd.DataFrame, list[Path]]:
    """Score every feature set against every target present in rows; one line per pair.

    rows: provenance columns (and optionally `morphotype`, None where unknown). Returns the
    scores (feature_set, target, accuracy, kappa, majority_baseline, n_train, n_test) and the
    confusion-matrix PNGs.
    """
    out_dir = Path(out_dir)
    groups = rows["plate"].astype(str) + ":" + rows["image"].astype(str)
    lines, figures = [], []
    for target in TARGETS:
        if target not in rows:
            continue
        known = rows[target].notna().to_numpy()
        labels = rows.loc[known, target].astype(str)
        if labels.nunique() < 2 or groups[known].nunique() < 5:
            continue
        for name, matrix in features.items():
            result = evaluate_features(matrix[known], labels, groups[known], seed=seed)
            path = plot_confusion(result, f"{title}: {FEATURE_SETS.get(name, name)} -> {target}", out_dir / f"confusion_{name}_{target}.png")
            figures.append(path)
            lines.append({"feature_set": name, "target": target, **{k: result[k] for k in ("accuracy", "kappa", "majority_baseline", "n_train", "n_test")}})
    return pd.DataFrame(lines), figures
