"""Scoring one variant's embeddings the thesis' way, beside the raw-pixel baseline.

For each feature set (the embedding, its rotation/flip-invariant mean, raw pixels) and each
target (culture, concentration, and the true morphotype on synthetic plates) a random forest is
trained on 80% of the images and tested on the other 20% (evaluation.evaluate_features).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gbm_assets.analysis.evaluation import evaluate_features, plot_confusion, raw_pixel_features, why_not_evaluable
from gbm_assets.imaging.crop_lookup import read_crops

TARGETS = ("culture", "concentration", "morphotype")
FEATURE_SETS = {"embedding": "embedding", "embedding_invariant": "invariant embedding", "raw_pixels": "raw pixels"}
SCORE_COLUMNS = ("feature_set", "target", "accuracy", "kappa", "majority_baseline", "n_train", "n_test", "skipped")
METRICS = ("accuracy", "kappa", "majority_baseline")


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
    scores, one line per (feature_set, target) with columns SCORE_COLUMNS, and the
    confusion-matrix PNGs. A target that cannot be scored (one culture, fewer than 5 images:
    evaluation.why_not_evaluable) still gets its lines, with NaN scores, n_train = n_test = 0
    and the reason in `skipped` (empty on scored lines), so every reader can say why.
    """
    out_dir = Path(out_dir)
    groups = rows["plate"].astype(str) + ":" + rows["image"].astype(str)
    lines, figures = [], []
    for target in TARGETS:
        if target not in rows:
            continue
        known = rows[target].notna().to_numpy()
        labels = rows.loc[known, target].astype(str)
        reason = why_not_evaluable(labels, groups[known], target)
        if reason is not None:
            lines += [{"feature_set": name, "target": target, **{m: np.nan for m in METRICS},
                       "n_train": 0, "n_test": 0, "skipped": reason} for name in features]
            continue
        for name, matrix in features.items():
            result = evaluate_features(matrix[known], labels, groups[known], seed=seed)
            path = plot_confusion(result, f"{title}: {FEATURE_SETS.get(name, name)} -> {target}", out_dir / f"confusion_{name}_{target}.png")
            figures.append(path)
            lines.append({"feature_set": name, "target": target, **{k: result[k] for k in ("accuracy", "kappa", "majority_baseline", "n_train", "n_test")}, "skipped": ""})
    return pd.DataFrame(lines, columns=list(SCORE_COLUMNS)), figures


def skipped_targets(scores: pd.DataFrame) -> dict[str, str]:
    """{target: reason} of the targets evaluate_variant could not score (old score tables: none)."""
    if "skipped" not in scores:
        return {}
    hit = scores[scores["skipped"].fillna("").astype(str) != ""]
    return dict(zip(hit["target"], hit["skipped"]))
