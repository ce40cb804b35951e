"""The variant comparison table (thesis Table 3) from each variant's evaluation scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from gbm_assets.analysis.report import BASELINE, HANDCRAFTED_BASELINE, SKIPPED_SUFFIX
from gbm_assets.models.variants import get_variant


def _lines(scores: pd.DataFrame, feature_set: str, target: str, split: str, classifier: str) -> pd.DataFrame:
    """The score lines of (feature_set, target) for a split and classifier (old tables: image, random forest)."""
    hit = scores[(scores["feature_set"] == feature_set) & (scores["target"] == target)]
    if "split" in hit:
        hit = hit[hit["split"].fillna("image") == split]
    elif split != "image":
        return hit.iloc[:0]
    if "classifier" in hit:
        hit = hit[hit["classifier"].fillna("random_forest") == classifier]
    elif classifier != "random_forest":
        return hit.iloc[:0]
    return hit


def _score(
    scores: pd.DataFrame,
    feature_set: str,
    target: str,
    metric: str,
    split: str = "image",
    classifier: str = "random_forest",
) -> float:
    hit = _lines(scores, feature_set, target, split, classifier)
    return float(hit[metric].iloc[0]) if len(hit) and metric in hit else np.nan  # old tables: no *_sd


def _skipped(scores: pd.DataFrame, feature_set: str, target: str, split: str = "image") -> str:
    """Why the target was not scored (evaluate_variant's `skipped`), else ""."""
    if "skipped" not in scores:
        return ""
    hit = _lines(scores, feature_set, target, split, "random_forest")
    return str(hit["skipped"].iloc[0]) if len(hit) and isinstance(hit["skipped"].iloc[0], str) else ""


# Score columns of a row: (target, metric, split, classifier). Each also gets "<column>_sd", the
# standard deviation over the evaluation's group folds (NaN for score tables written before folds).
ROW_SCORES = {
    "culture_accuracy": ("culture", "accuracy", "image", "random_forest"),
    "concentration_accuracy": ("concentration", "accuracy", "image", "random_forest"),
    "culture_kappa": ("culture", "kappa", "image", "random_forest"),
    "concentration_kappa": ("concentration", "kappa", "image", "random_forest"),
    "morphotype_accuracy": ("morphotype", "accuracy", "image", "random_forest"),
    "culture_kappa_linear": ("culture", "kappa", "image", "linear_probe"),
    "morphotype_accuracy_linear": ("morphotype", "accuracy", "image", "linear_probe"),
    "culture_plate_accuracy": ("culture", "accuracy", "plate", "random_forest"),
    "culture_plate_kappa": ("culture", "kappa", "plate", "random_forest"),
    "culture_plate_kappa_linear": ("culture", "kappa", "plate", "linear_probe"),
    "morphotype_plate_accuracy": ("morphotype", "accuracy", "plate", "random_forest"),
}


INVARIANT_SCORES = (("kappa", ""), ("kappa", "_sd"), ("accuracy", ""), ("accuracy", "_sd"))


def _row(name: str, scores: pd.DataFrame, feature_set: str, **described) -> dict:
    """The table row of one feature set: the thesis' scores (by image, random forest), then the
    linear probe (suffix _linear) and the plate-held-out split (culture_plate_*, morphotype_plate_*),
    each the mean over group folds with its standard deviation beside it (suffix _sd)."""
    return {
        "variant": name,
        **described,
        **{
            column + suffix: _score(scores, feature_set, target, metric + suffix, split, classifier)
            for column, (target, metric, split, classifier) in ROW_SCORES.items()
            for suffix in ("", "_sd")
        },
        **{
            f"{target}{SKIPPED_SUFFIX}": _skipped(scores, feature_set, target)
            for target in ("culture", "concentration", "morphotype")
        },
        **{
            f"{target}_plate{SKIPPED_SUFFIX}": _skipped(scores, feature_set, target, "plate")
            for target in ("culture", "morphotype")
        },
    }


def comparison_table(evaluation_dir: str | Path, variants: Sequence[str]) -> pd.DataFrame:
    """One row per variant (its embedding), its rotation-invariant embedding beside it, and the baselines.

    The baseline rows (raw pixels; hand-crafted features where the scores have them) come from
    the first variant's scores: every variant is scored on the same seeded sample of cells, so
    the baselines are the same for all. Scores are means over the evaluation's group folds and
    each has its standard deviation over folds in "<column>_sd" (NaN for older score tables,
    which scored one split). Columns without a suffix are the thesis' scores (split
    by image, random forest); "_linear" ones the linear probe; "culture_plate_*" and
    "morphotype_plate_*" the split by plate, where a plate's look cannot pass for morphology. culture_skipped and
    concentration_skipped say why a target has no scores ("needs >= 2 cultures (found 1)"),
    empty where it has them; the report shows the reason in place of the scores.
    """
    rows, baselines = [], None
    for name in variants:
        path = Path(evaluation_dir) / name / "scores.parquet"
        if not path.is_file():
            continue
        scores = pd.read_parquet(path)
        v = get_variant(name)
        described = {"features": v.features, "lambda": v.lambda_, "segmentation": v.segmentation}
        row = _row(name, scores, "embedding", **described)
        for metric, suffix in INVARIANT_SCORES:
            row[f"culture_{metric}_invariant{suffix}"] = _score(
                scores, "embedding_invariant", "culture", metric + suffix
            )
        rows.append(row)
        if baselines is None:
            baselines = []
            for label, feature_set in ((BASELINE, "raw_pixels"), (HANDCRAFTED_BASELINE, "handcrafted")):
                if feature_set == "raw_pixels" or (scores["feature_set"] == feature_set).any():
                    baseline = _row(label, scores, feature_set, features=np.nan, **{"lambda": np.nan}, segmentation="")
                    baseline["culture_majority"] = _score(scores, feature_set, "culture", "majority_baseline")
                    baselines.append(baseline)
    rows += baselines or []
    columns = list(
        _row("", pd.DataFrame(columns=["feature_set", "target"]), "", features=0, **{"lambda": 0}, segmentation="")
    )
    columns += [f"culture_{metric}_invariant{suffix}" for metric, suffix in INVARIANT_SCORES] + ["culture_majority"]
    return pd.DataFrame(rows, columns=columns)  # the columns even when no variant has scores yet
