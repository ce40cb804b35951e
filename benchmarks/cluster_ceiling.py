"""Benchmark: is the gap to issue 13's clustering targets in the features or in the clustering?

    nice -n 5 .venv/bin/python benchmarks/cluster_ceiling.py [--cultures 4] [--images-per-plate 2]
        [--difficulty hard] [--keep DIR] [--config '{"umap_neighbors": 30}']

Synthesizes plates (default as benchmarks/features.py: the hard generator, 4 cultures x 5
concentrations, 2 images of 1024 px), finds and crops their cells through the production core
(imaging.plate_coordinates.plate_coordinates, imaging.plate_cells.crop_plate, 128 px crops, only
qc "cell" candidates, as the cell_crops asset writes them), takes each crop's true morphotype
(analysis.truth.true_morphotypes) and keeps the crops that have one. Then, on three feature sets
of those crops:

- oracle: one-hot true morphotype (5 columns) plus Gaussian noise of sd 0.05, the best features
  there can be; what the clustering makes of them is its own ceiling;
- handcrafted: analysis.handcrafted.handcrafted_features_for (CellProfiler-style shape,
  intensity, texture), as they are (pixels, pixel areas, unitless ratios side by side);
- handcrafted_standardized: the same, each column z-scored over the cells (pycytominer's
  normalize "standardize"; Caicedo et al. 2017, Nat Methods 14:849: features of mixed units are
  normalised before any distance is taken, else the largest-unit columns decide every distance);
- raw_pixels: analysis.evaluation.raw_pixel_features (crops block-averaged to 32 x 32);

and with --variants, each named encoder trained on these crops at the shipped budget
(assets.encoders.TrainingConfig through models.training.train_encoder) and its embedding, as it is
and standardised (<variant>, <variant>_standardized), it runs the production clustering (clustering.fit_clusters with the shipped ClusteringConfig, or
the one --config overrides: '{"hdbscan_selection": "leaf", "auto_k_criterion": "bic"}' is the
clustering as it was before issue 13) and prints one JSON object: per feature set and labelling (hdbscan,
gmm, auto) the ARI and NMI against the true morphotype (noise as its own group, as the report
scores it), the number of clusters, HDBSCAN's noise share and the composition error (mean
absolute error of per-culture morphotype proportions, analysis.composition.composition_error,
noise left out). A random forest's 5-fold morphotype accuracy on the same features is printed
beside it, so that a low ARI of features that do hold the morphotype points at the clustering.
Issue 13's targets: ARI >= 0.6 and composition error <= 0.03.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.features import add_plate_arguments, plate_options, write_benchmark_plates  # noqa: E402

ORACLE_NOISE_SD = 0.05
LABELINGS = ("hdbscan", "gmm", "auto")


def make_crops(raw: Path, crops: Path, workers: int = 2) -> None:
    """Find and crop the cells of every plate under raw into crops (plate=<id>/part-0.parquet, CROP_SCHEMA)."""
    import pyarrow.parquet as pq

    from gbm_assets.imaging.plate_cells import crop_plate
    from gbm_assets.imaging.plate_coordinates import plate_coordinates
    from gbm_assets.imaging.plates import read_manifest
    from gbm_assets.imaging.segmentation import SegmentationParams
    from gbm_assets.paths import plate_file
    from gbm_assets.schema import CROP_SCHEMA

    for plate_dir in sorted(p for p in raw.iterdir() if (p / "manifest.csv").is_file()):
        plate_id = plate_dir.name
        out = plate_file(crops, plate_id)
        if out.is_file():
            continue
        manifest = read_manifest(plate_dir)
        plate = plate_coordinates(plate_id, plate_dir, manifest["image"], SegmentationParams(), workers=workers)
        masks = dict(zip(plate.masks["image"].to_pylist(), plate.masks["labels_zstd"].to_pylist(), strict=True))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        with pq.ParquetWriter(tmp, CROP_SCHEMA) as writer:
            for table in crop_plate(plate_id, plate_dir, manifest, plate.coordinates, masks, 128, workers=workers):
                writer.write_table(table)
        tmp.rename(out)


def crops_with_truth(raw: Path, crops: Path) -> pd.DataFrame:
    """Provenance (crop_id, plate, image, x, y, culture) and true morphotype of every crop that has one."""
    import pyarrow.dataset as pds

    from gbm_assets.analysis.truth import true_morphotypes

    rows = (
        pds.dataset(crops, format="parquet", partitioning="hive")
        .to_table(columns=["crop_id", "plate", "image", "x", "y", "culture"])
        .to_pandas()
    )
    rows["plate"] = rows["plate"].astype(str)
    rows["truth"] = true_morphotypes(rows, raw)
    return rows[rows["truth"].notna()].sort_values("crop_id").reset_index(drop=True)


def feature_sets(rows: pd.DataFrame, crops: Path, seed: int) -> dict[str, np.ndarray]:
    from gbm_assets.analysis.evaluation import raw_pixel_features
    from gbm_assets.analysis.handcrafted import handcrafted_features_for
    from gbm_assets.imaging.crop_dataset import read_crops

    rng = np.random.default_rng(seed)
    codes, _ = pd.factorize(rows["truth"], sort=True)
    oracle = np.eye(codes.max() + 1, dtype=np.float32)[codes]
    oracle += rng.normal(0.0, ORACLE_NOISE_SD, oracle.shape).astype(np.float32)
    handcrafted = handcrafted_features_for(crops, rows["crop_id"])
    return {
        "oracle": oracle,
        "handcrafted": handcrafted,
        "handcrafted_standardized": _standardized(handcrafted),
        "raw_pixels": raw_pixel_features(read_crops(crops, rows["crop_id"])),
    }


def embedding_sets(rows: pd.DataFrame, crops: Path, variants: list[str]) -> dict[str, np.ndarray]:
    """Each variant's embedding of rows' crops, trained on all crops at the shipped budget; as is and standardised."""
    from gbm_assets.assets.encoders import TrainingConfig
    from gbm_assets.models.training import TrainConfig, embed_crops, limit_cpu_threads, train_encoder
    from gbm_assets.models.variants import get_variant

    limit_cpu_threads()
    shipped = TrainingConfig()
    config = TrainConfig(
        epochs=shipped.epochs,
        max_steps_per_epoch=shipped.max_steps_per_epoch,
        patience=shipped.patience,
        batch_size=shipped.batch_size,
    )
    out = {}
    for name in variants:
        variant = get_variant(name)
        encoder = train_encoder(variant, crops, config).encoder
        parts = list(embed_crops(encoder, crops, input_mask=variant.input_mask))  # as the embeddings asset
        ids = pd.concat([r["crop_id"] for r, _ in parts], ignore_index=True).astype(str)
        x = np.concatenate([e for _, e in parts])[pd.Index(ids).get_indexer(rows["crop_id"].astype(str))]
        out[name] = x
        out[f"{name}_standardized"] = _standardized(x)
    return out


def _standardized(x: np.ndarray) -> np.ndarray:
    """Each column z-scored over the cells: the clustering's own "standardize" preprocessing."""
    from gbm_assets.analysis.clustering import fit_feature_transform

    return fit_feature_transform(x, "standardize").apply(x)


def probe_accuracy(x: np.ndarray, truth: np.ndarray, seed: int) -> float:
    """5-fold random forest accuracy of the true morphotype: how much of it the features hold."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    forest = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(forest, x, truth, cv=folds).mean())


def score(x: np.ndarray, rows: pd.DataFrame, config) -> dict:
    from gbm_assets.analysis.clustering import cluster_metrics, fit_clusters
    from gbm_assets.analysis.composition import composition_error

    t = time.perf_counter()
    fitted, labels = fit_clusters(x, config)
    seconds = time.perf_counter() - t
    xy = labels[["umap_x", "umap_y"]].to_numpy()
    truth = rows["truth"].astype(str).to_numpy()
    cultures = rows["culture"].astype(str).to_numpy()
    table = fitted.auto_k.table.round(3)
    out: dict = {
        "fit_seconds": round(seconds, 1),
        "params": fitted.params,
        "auto_k": int(fitted.auto_k.k),
        "auto_k_table": {c: table[c].tolist() for c in table.columns},
    }
    for column in LABELINGS:
        m = cluster_metrics(xy, labels[column].to_numpy(), truth)
        error = composition_error(labels[column].to_numpy(), truth, cultures)["mae"]
        out[column] = {
            "ari": round(m["ari"], 3),
            "nmi": round(m["nmi"], 3),
            "ari_clustered": round(m["ari_clustered"], 3),
            "n_clusters": m["n_clusters"],
            "noise_fraction": round(m["noise_fraction"], 3),
            "composition_error": round(error, 4),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plate_arguments(parser)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default="{}", help="JSON of ClusteringConfig fields to override")
    parser.add_argument(
        "--sets", nargs="+", default=["oracle", "handcrafted", "handcrafted_standardized", "raw_pixels"]
    )
    parser.add_argument("--variants", nargs="*", default=[], help="encoders to train and add (e.g. siamese_b)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (plates and crops are reused)")
    args = parser.parse_args()

    from gbm_assets.analysis.clustering import ClusteringConfig

    config = replace(ClusteringConfig(seed=args.seed), **json.loads(args.config))
    with tempfile.TemporaryDirectory(prefix="gbm-ceiling-") as tmp:
        work = args.keep or Path(tmp)
        raw, crops = work / "raw", work / "crops"
        started = time.perf_counter()
        if not raw.is_dir() or not any(raw.glob("*/manifest.csv")):
            write_benchmark_plates(raw, args)
        make_crops(raw, crops, args.workers)
        rows = crops_with_truth(raw, crops)
        sets = feature_sets(rows, crops, args.seed)
        sets.update(embedding_sets(rows, crops, args.variants))
        truth = rows["truth"].astype(str).to_numpy()
        report: dict = {
            "plates": plate_options(args),
            "n_cells_with_truth": len(rows),
            "morphotype_shares": rows["truth"].value_counts(normalize=True).round(3).to_dict(),
            "config": asdict(config),
            "targets": {"ari": 0.6, "composition_error": 0.03},
            "feature_sets": {},
        }
        for name in [*args.sets, *(f"{v}{s}" for v in args.variants for s in ("", "_standardized"))]:
            x = sets[name]
            report["feature_sets"][name] = {
                "n_features": int(x.shape[1]),
                "forest_morphotype_accuracy": round(probe_accuracy(x, truth, args.seed), 3),
                **score(x, rows, config),
            }
        report["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
