"""The variant comparison table (thesis Table 3) from each variant's evaluation scores."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from gbm_assets.analysis.report import BASELINE, SKIPPED_SUFFIX
from gbm_assets.models.variants import get_variant


def _score(scores: pd.DataFrame, feature_set: str, target: str, metric: str) -> float:
    hit = scores[(scores["feature_set"] == feature_set) & (scores["target"] == target)]
    return float(hit[metric].iloc[0]) if len(hit) else np.nan


def _skipped(scores: pd.DataFrame, feature_set: str, target: str) -> str:
    """Why the target was not scored (evaluate_variant's `skipped`), else ""."""
    if "skipped" not in scores:
        return ""
    hit = scores[(scores["feature_set"] == feature_set) & (scores["target"] == target)]
    return str(hit["skipped"].iloc[0]) if len(hit) and isinstance(hit["skipped"].iloc[0], str) else ""


def _row(name: str, scores: pd.DataFrame, feature_set: str, **described) -> dict:
    return {
        "variant": name, **described,
        "culture_accuracy": _score(scores, feature_set, "culture", "accuracy"),
        "concentration_accuracy": _score(scores, feature_set, "concentration", "accuracy"),
        "culture_kappa": _score(scores, feature_set, "culture", "kappa"),
        "concentration_kappa": _score(scores, feature_set, "concentration", "kappa"),
        "morphotype_accuracy": _score(scores, feature_set, "morphotype", "accuracy"),
        **{f"{target}{SKIPPED_SUFFIX}": _skipped(scores, feature_set, target) for target in ("culture", "concentration", "morphotype")},
    }


def comparison_table(evaluation_dir: str | Path, variants: Sequence[str]) -> pd.DataFrame:
    """One row per variant (its embedding), its rotation-invariant embedding beside it, and raw pixels.

    The raw-pixel row comes from the first variant's scores: every variant is scored on the
    same seeded sample of cells, so the baseline is the same for all. culture_skipped and
    concentration_skipped say why a target has no scores ("needs >= 2 cultures (found 1)"),
    empty where it has them; the report shows the reason in place of the scores.
    """
    rows, baseline = [], None
    for name in variants:
        path = Path(evaluation_dir) / name / "scores.parquet"
        if not path.is_file():
            continue
        scores = pd.read_parquet(path)
        v = get_variant(name)
        described = {"features": v.features, "lambda": v.lambda_, "segmentation": v.segmentation}
        row = _row(name, scores, "embedding", **described)
        row["culture_kappa_invariant"] = _score(scores, "embedding_invariant", "culture", "kappa")
        row["culture_accuracy_invariant"] = _score(scores, "embedding_invariant", "culture", "accuracy")
        rows.append(row)
        if baseline is None:
            baseline = _row(BASELINE, scores, "raw_pixels", features=np.nan, **{"lambda": np.nan}, segmentation="")
            baseline["culture_majority"] = _score(scores, "raw_pixels", "culture", "majority_baseline")
    if baseline is not None:
        rows.append(baseline)
    columns = list(_row("", pd.DataFrame(columns=["feature_set", "target"]), "", features=0, **{"lambda": 0}, segmentation=""))
    columns += ["culture_kappa_invariant", "culture_accuracy_invariant", "culture_majority"]
    return pd.DataFrame(rows, columns=columns)  # the columns even when no variant has scores yet
