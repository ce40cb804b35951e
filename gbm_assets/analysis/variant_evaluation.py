"""Scoring one variant's embeddings the thesis' way, beside the two baselines the field uses.

For each feature set (the embedding, its rotation/flip-invariant mean, and the baselines: raw
pixels and hand-crafted CellProfiler-style features), each target (culture, concentration, and
the true morphotype on synthetic plates), each split (held-out images, held-out plates) and each
classifier (random forest, linear probe), a classifier is trained and tested in each of 5 seeded
group folds (80% of the groups against the other 20%, every crop tested once) and scored by the
folds' mean and standard deviation (evaluation.evaluate_features). The plate split is the one a plate's look
cannot pass: a feature that only recognises a plate's illumination scores well by image and
falls to chance by plate.

score_features is the whole grid as one table (what a benchmark calls); evaluate_variant adds
the confusion-matrix figures; evaluate_with_baselines scores an embedding beside baselines that
are computed once per cell sample and reused by every variant (cache_dir).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from gbm_assets.analysis.evaluation import (
    CLASSIFIERS,
    N_FOLDS,
    evaluate_features,
    group_folds,
    plot_confusion,
    raw_pixel_features,
    why_not_evaluable,
)
from gbm_assets.imaging.crop_lookup import read_crops
from gbm_assets.storage import write_parquet_atomic

TARGETS = ("culture", "concentration", "morphotype")
FEATURE_SETS = {
    "embedding": "embedding",
    "embedding_invariant": "invariant embedding",
    "raw_pixels": "raw pixels",
    "handcrafted": "hand-crafted features",
}
BASELINE_FEATURE_SETS = ("raw_pixels", "handcrafted")
SPLITS = {"image": "held-out images", "plate": "held-out plates"}
SCORE_COLUMNS = (
    "feature_set",
    "target",
    "split",
    "classifier",
    "accuracy",
    "kappa",
    "majority_baseline",
    "n_train",
    "n_test",
    "skipped",
    "accuracy_sd",
    "kappa_sd",
    "majority_baseline_sd",
    "n_folds",
)
METRICS = ("accuracy", "kappa", "majority_baseline")  # means over folds (old tables: one 80/20 split)
SD_METRICS = tuple(f"{m}_sd" for m in METRICS)  # their standard deviation over folds (old tables lack them)
FIGURE_CLASSIFIER = "random_forest"  # confusion matrices are drawn for the thesis' classifier only
_CACHE_VERSION = 2  # bump when baseline features or scoring change, so cached baseline scores are recomputed


def split_groups(rows: pd.DataFrame, split: str) -> pd.Series:
    """The group of each row for a split: "image" -> "<plate>:<image>", "plate" -> "<plate>" (Series of str).

    Raises
    ------
    ValueError
        If split is not one of SPLITS.
    """
    if split == "image":
        return rows["plate"].astype(str) + ":" + rows["image"].astype(str)
    if split == "plate":
        return rows["plate"].astype(str)
    raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")


def confusion_name(feature_set: str, target: str, split: str) -> str:
    """File name of a confusion matrix: confusion_<set>_<target>.png by image, plate_confusion_... by plate."""
    return f"{'' if split == 'image' else split + '_'}confusion_{feature_set}_{target}.png"


def score_features(
    rows: pd.DataFrame,
    features: dict[str, np.ndarray],
    seed: int = 0,
    splits: Sequence[str] = tuple(SPLITS),
    classifiers: Sequence[str] = CLASSIFIERS,
    on_result: Callable[[str, str, str, dict], None] | None = None,
    n_folds: int = N_FOLDS,
) -> pd.DataFrame:
    """Score every feature set for every target present in rows, split and classifier; one line each.

    Parameters
    ----------
    rows : DataFrame, n rows
        plate, image and the targets present (culture, concentration, optionally morphotype,
        None where unknown).
    features : dict of str to (n, d) ndarray
        One matrix per feature set, rows aligned with rows.
    seed : int
        Seeds the splits and the classifiers.
    n_folds : int
        Group folds per score (evaluation.group_folds); a (target, split) needs as many groups.
    on_result : callable, optional
        on_result(feature_set, target, split, result) after each scored fit (result as
        evaluation.evaluate_features returns it).

    Returns
    -------
    DataFrame with columns SCORE_COLUMNS
        accuracy, kappa and majority_baseline are means over the n_folds group folds, the *_sd
        columns their standard deviations; n_test counts every crop tested (each once), n_train
        the mean training crops per fold. A (target, split) that cannot be scored (one culture,
        fewer than n_folds images or plates, classes on one plate each:
        evaluation.why_not_evaluable) still gets its lines, with NaN scores, n_train = n_test =
        n_folds = 0 and the reason in `skipped` (empty on scored lines).
    """
    lines = []
    for target in TARGETS:
        if target not in rows:
            continue
        known = rows[target].notna().to_numpy()
        labels = rows.loc[known, target].astype(str)
        for split in splits:
            groups = split_groups(rows, split)[known]
            reason = why_not_evaluable(labels, groups, target, n_folds=n_folds, unit=split)
            # The folds depend on the labels, groups and seed only: one split for every feature set and classifier.
            folds = group_folds(labels, groups, seed, n_folds) if reason is None else None
            for classifier in classifiers:
                for name, matrix in features.items():
                    key = {"feature_set": name, "target": target, "split": split, "classifier": classifier}
                    if reason is not None:
                        lines.append(
                            {
                                **key,
                                **{m: np.nan for m in (*METRICS, *SD_METRICS)},
                                **{"n_train": 0, "n_test": 0, "n_folds": 0, "skipped": reason},
                            }
                        )
                        continue
                    result = evaluate_features(
                        np.asarray(matrix)[known],
                        labels,
                        groups,
                        seed=seed,
                        n_folds=n_folds,
                        classifier=classifier,
                        folds=folds,
                    )
                    if on_result is not None:
                        on_result(name, target, split, result)
                    taken = (*METRICS, *SD_METRICS, "n_train", "n_test", "n_folds")
                    lines.append({**key, **{k: result[k] for k in taken}, "skipped": ""})
    return pd.DataFrame(lines, columns=list(SCORE_COLUMNS))


def evaluate_variant(
    rows: pd.DataFrame,
    features: dict[str, np.ndarray],
    out_dir: str | Path,
    title: str,
    seed: int = 0,
    splits: Sequence[str] = tuple(SPLITS),
    classifiers: Sequence[str] = CLASSIFIERS,
    n_folds: int = N_FOLDS,
) -> tuple[pd.DataFrame, list[Path]]:
    """score_features, plus a confusion-matrix PNG in out_dir per random-forest fit (confusion_name).

    Returns the scores (columns SCORE_COLUMNS) and the PNG paths.
    """
    out_dir, figures = Path(out_dir), []

    def draw(name: str, target: str, split: str, result: dict) -> None:
        if result["classifier"] != FIGURE_CLASSIFIER:
            return
        label = f"{title}: {FEATURE_SETS.get(name, name)} -> {target}, {SPLITS.get(split, split)}"
        figures.append(plot_confusion(result, label, out_dir / confusion_name(name, target, split)))

    scores = score_features(rows, features, seed, splits, classifiers, on_result=draw, n_folds=n_folds)
    return scores, figures


def baseline_features_for(crops_dir: str | Path, crop_ids: pd.Series) -> dict[str, np.ndarray]:
    """{"raw_pixels": (n, 1024), "handcrafted": (n, len(HANDCRAFTED_FEATURES))} float32 of the given crops.

    The crops' pixels are read once and feed both (evaluation.raw_pixel_features' 32 x 32 block means, and
    handcrafted.handcrafted_features_for, which reads only the masks and measurements besides).
    """
    from gbm_assets.analysis.handcrafted import handcrafted_features_for

    crops = read_crops(crops_dir, crop_ids)
    return {
        "raw_pixels": raw_pixel_features(crops, size=min(32, crops.shape[1])),
        "handcrafted": handcrafted_features_for(crops_dir, crop_ids, pixels=crops),
    }


def _baseline_key(
    rows: pd.DataFrame, seed: int, splits: Sequence[str], classifiers: Sequence[str], n_folds: int = N_FOLDS
) -> str:
    """Fingerprint of what baseline scores depend on: the cells, their labels and groups, and the scoring."""
    columns = [c for c in ("crop_id", "plate", "image", *TARGETS) if c in rows]
    scoring = [_CACHE_VERSION, seed, list(splits), list(classifiers), n_folds, columns]
    h = hashlib.sha256(json.dumps(scoring).encode())
    h.update(pd.util.hash_pandas_object(rows[columns].astype(str), index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def evaluate_with_baselines(
    rows: pd.DataFrame,
    features: dict[str, np.ndarray],
    crops_dir: str | Path,
    out_dir: str | Path,
    title: str,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    splits: Sequence[str] = tuple(SPLITS),
    classifiers: Sequence[str] = CLASSIFIERS,
    n_folds: int = N_FOLDS,
) -> tuple[pd.DataFrame, list[Path]]:
    """evaluate_variant of features (the embeddings) and of BASELINE_FEATURE_SETS of the same crops.

    rows must carry crop_id (the crops dataset's ids in crops_dir). Every variant is scored on
    the same seeded sample of cells, so baseline scores and figures are computed once and kept in
    cache_dir/<fingerprint of cells, labels and scoring>/ (other fingerprints there are removed);
    later calls copy them into out_dir. Without cache_dir they are computed each time.
    Returns all scores (embeddings first) and the figures in out_dir.
    """
    out_dir = Path(out_dir)
    scores, figures = evaluate_variant(rows, features, out_dir, title, seed, splits, classifiers, n_folds)
    key = _baseline_key(rows, seed, splits, classifiers, n_folds)
    cached = Path(cache_dir) / key if cache_dir is not None else None
    if cached is not None and (cached / "scores.parquet").is_file():
        base = pd.read_parquet(cached / "scores.parquet")
        base_figures = sorted(cached.glob("*.png"))
    else:
        target_dir = cached if cached is not None else out_dir
        target_dir.mkdir(parents=True, exist_ok=True)  # a sample with nothing to score writes no figure there
        baselines = baseline_features_for(crops_dir, rows["crop_id"])
        base, base_figures = evaluate_variant(
            rows, baselines, target_dir, "baselines", seed, splits, classifiers, n_folds
        )
        if cached is not None:
            for old in Path(cache_dir).iterdir():
                if old.is_dir() and old != cached:
                    shutil.rmtree(old, ignore_errors=True)
            write_parquet_atomic(pa.Table.from_pandas(base, preserve_index=False), cached / "scores.parquet")
    if cached is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        base_figures = [Path(shutil.copy2(f, out_dir / f.name)) for f in base_figures]
    return pd.concat([scores, base], ignore_index=True), figures + base_figures


def image_split(scores: pd.DataFrame) -> pd.DataFrame:
    """The thesis' lines of a score table: split by image, random forest (old tables: every line)."""
    keep = np.ones(len(scores), bool)
    if "split" in scores:
        keep &= (scores["split"].fillna("image") == "image").to_numpy()
    if "classifier" in scores:
        keep &= (scores["classifier"].fillna(FIGURE_CLASSIFIER) == FIGURE_CLASSIFIER).to_numpy()
    return scores[keep]


def metric_key(line, metric: str) -> str:
    """MLflow metric name of a score line: "<set>.<target>.<metric>" for the thesis' image split
    and random forest (as before), "<set>.<target>.<split>_split.<classifier>.<metric>" otherwise."""
    split, classifier = getattr(line, "split", "image"), getattr(line, "classifier", FIGURE_CLASSIFIER)
    if split == "image" and classifier == FIGURE_CLASSIFIER:
        return f"{line.feature_set}.{line.target}.{metric}"
    return f"{line.feature_set}.{line.target}.{split}_split.{classifier}.{metric}"


def score_metrics(scores: pd.DataFrame) -> dict[str, float]:
    """MLflow metrics of a table of scored lines: {metric_key(line, m): value} for every METRICS
    mean (as before) and every finite SD_METRICS standard deviation over folds ("..._sd"; old
    tables have none)."""
    out = {}
    for line in scores.itertuples():
        out.update({metric_key(line, m): float(getattr(line, m)) for m in METRICS})
        for m in SD_METRICS:
            value = getattr(line, m, np.nan)
            if value is not None and np.isfinite(value):
                out[metric_key(line, m)] = float(value)
    return out


def skipped_targets(scores: pd.DataFrame) -> dict[str, str]:
    """{target: reason} of what evaluate_variant could not score (old score tables: by image only).

    A target not scored by image is keyed by its name; one scored by image but not by plate by
    "<target>.plate_split".
    """
    if "skipped" not in scores:
        return {}
    hit = scores[scores["skipped"].fillna("").astype(str) != ""]
    out = {}
    for line in hit.itertuples():
        split = getattr(line, "split", "image")
        out.setdefault(line.target if split == "image" else f"{line.target}.{split}_split", line.skipped)
    image_skipped = {t for t in out if "." not in t}
    return {k: v for k, v in out.items() if k.split(".")[0] not in image_skipped or "." not in k}


def evaluation_params() -> dict[str, str]:
    """MLflow params of the evaluation scheme (constants, so a re-logged run never conflicts):
    evaluation.splits, evaluation.classifiers, evaluation.baselines (comma-separated),
    evaluation.test_share (the held-out share of groups per fold) and evaluation.folds (group
    folds averaged per score; fewer when there are fewer groups)."""
    return {
        "evaluation.splits": ",".join(SPLITS),
        "evaluation.classifiers": ",".join(CLASSIFIERS),
        "evaluation.baselines": ",".join(BASELINE_FEATURE_SETS),
        "evaluation.test_share": f"{1 / N_FOLDS:g}",
        "evaluation.folds": str(N_FOLDS),
    }


def plate_split(scores: pd.DataFrame, classifier: str = FIGURE_CLASSIFIER) -> pd.DataFrame:
    """The lines of a score table held out by plate with the given classifier (old tables: none)."""
    if "split" not in scores or "classifier" not in scores:
        return scores.iloc[:0]
    return scores[(scores["split"] == "plate") & (scores["classifier"] == classifier)]


def accuracy_table(scores: pd.DataFrame) -> pd.DataFrame | None:
    """Accuracy (fold mean, rounded to 3 decimals) per feature set (rows) and target/split/classifier (columns);
    None if empty."""
    if not len(scores):
        return None
    columns = [c for c in ("target", "split", "classifier") if c in scores]
    return scores.pivot_table(index="feature_set", columns=columns, values="accuracy").round(3)
