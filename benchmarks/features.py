"""Benchmark: do the learned features earn their place? Variants against both baselines, by image and by plate.

    nice -n 5 .venv/bin/python benchmarks/features.py [--cultures 4] [--images-per-plate 2]
        [--variants autoencoder siamese_b ...] [--difficulty hard] [--epochs 2] [--steps 12]

Synthesizes plates (default: the hard generator, 4 cultures x 5 concentrations, 2 images of
1024 px each) in a temporary folder, then runs the production pipeline on them the way
`gbm-assets run` does (gbm_assets.pipeline.run_main_job: ingest, train, embed and score, cluster,
report) with a temporary Dagster instance and MLflow store, at the shipped training budget unless
--epochs/--steps say otherwise. Prints one JSON object: per variant and per baseline (raw pixels,
hand-crafted features) the culture and morphotype accuracy and Cohen's kappa of the random forest
and the linear probe, held out by image and by plate: the mean over 5 group folds and, as
"..._sd", its standard deviation over folds (from each variant's evaluation scores.parquet); per variant the ARI of its GMM and HDBSCAN labels against the true morphotype and
the composition error (mean absolute error of per-culture morphotype proportions, HDBSCAN),
as the report computes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASELINES = ("raw_pixels", "handcrafted")
SCORED = (
    ("culture", "accuracy"),
    ("culture", "kappa"),
    ("morphotype", "accuracy"),
    ("morphotype", "kappa"),
    ("concentration", "kappa"),
)


def _environment(work: Path) -> None:
    """Point the pipeline at a temporary data folder, Dagster instance and MLflow store (before importing it)."""
    from benchmarks.scale import _env

    (work / "dagster_home").mkdir(parents=True, exist_ok=True)
    (work / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ.update(_env(work))  # the same layout as the scale benchmark's per-size folder


def _rounded(value) -> float | None:
    return None if value is None or value != value else round(float(value), 3)


def feature_scores(scores, feature_set: str) -> dict:
    """{"<target>_<metric>_<split>_<classifier>": fold mean, "..._sd": its sd over folds} of one feature
    set's score lines (rounded; no "_sd" key for a table written before folds)."""
    out = {}
    lines = scores[scores["feature_set"] == feature_set]
    for target, metric in SCORED:
        for line in lines[lines["target"] == target].itertuples():
            key = f"{target}_{metric}_{line.split}_{line.classifier}"
            out[key] = _rounded(getattr(line, metric))
            if hasattr(line, f"{metric}_sd"):
                out[f"{key}_sd"] = _rounded(getattr(line, f"{metric}_sd"))
    return out


def cluster_scores(data, variant: str, seed: int = 0) -> dict:
    """ARI of GMM and HDBSCAN labels against the true morphotype, and the HDBSCAN composition error."""
    from gbm_assets.analysis.composition import composition_error
    from gbm_assets.analysis.truth import true_morphotypes
    from gbm_assets.analysis.variant_report import labeling_metrics, sample_labels

    path = data.labels_file(variant)
    if not Path(path).exists():
        return {"clusters": "none"}
    labels = sample_labels(path, 100_000, seed)
    truth = true_morphotypes(labels, data.raw)
    known = truth.notna().to_numpy()
    metrics = labeling_metrics(labels, truth, seed)
    error = composition_error(
        labels["hdbscan"].to_numpy()[known],
        truth[known].astype(str).to_numpy(),
        labels["culture"].astype(str).to_numpy()[known],
    )
    return {
        "ari_gmm": round(metrics["gmm"]["ari"], 3),
        "ari_hdbscan": round(metrics["hdbscan"]["ari"], 3),
        "ari_auto": round(metrics["auto"]["ari"], 3) if "auto" in metrics and "ari" in metrics["auto"] else None,
        "hdbscan_clusters": metrics["hdbscan"]["n_clusters"],
        "composition_error": round(float(error["mae"]), 4),
        "n_cells_with_truth": int(known.sum()),
    }


PLATE_ARGUMENTS = ("cultures", "concentrations", "replicates", "images_per_plate", "size", "seed", "difficulty")


def add_plate_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic plates' options (PLATE_ARGUMENTS), shared by the benchmarks that run the pipeline."""
    parser.add_argument("--cultures", type=int, default=4)
    parser.add_argument("--concentrations", type=int, default=5)
    parser.add_argument("--replicates", type=int, default=1)
    parser.add_argument("--images-per-plate", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", choices=("easy", "hard"), default="hard")


def write_benchmark_plates(raw: Path, args: argparse.Namespace) -> dict:
    """Write the plates add_plate_arguments describes under raw; returns them for the JSON report
    (every plate option but the seed)."""
    from gbm_assets.imaging.synthetic import write_plates

    write_plates(
        raw,
        n_cultures=args.cultures,
        n_concentrations=args.concentrations,
        n_replicates=args.replicates,
        images_per_plate=args.images_per_plate,
        size=args.size,
        seed=args.seed,
        difficulty=args.difficulty,
    )
    return plate_options(args)


def plate_options(args: argparse.Namespace) -> dict:
    """The plates' options for the JSON report: every one of PLATE_ARGUMENTS but the seed."""
    return {name: getattr(args, name) for name in PLATE_ARGUMENTS if name != "seed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plate_arguments(parser)
    parser.add_argument("--variants", nargs="+", default=["autoencoder", "siamese_b", "siamese_d", "siamese_f"])
    parser.add_argument("--epochs", type=int, help="training epochs (default: the shipped TrainingConfig)")
    parser.add_argument("--steps", type=int, help="max steps per epoch (default: the shipped TrainingConfig)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gbm-features-") as tmp:
        work = args.keep or Path(tmp)
        _environment(work)
        import pandas as pd

        from gbm_assets.assets.encoders import TrainingConfig
        from gbm_assets.assets.resources import DataDirs
        from gbm_assets.pipeline import SilentBar, run_main_job

        started = time.perf_counter()
        plates = write_benchmark_plates(work / "data" / "raw", args)
        shipped = TrainingConfig()
        training = {
            "epochs": args.epochs or shipped.epochs,
            "max_steps_per_epoch": args.steps or shipped.max_steps_per_epoch,
        }
        run_config = {"train_all_variants": {"ops": {"trained_encoders": {"config": training}}}}
        with contextlib.redirect_stdout(sys.stderr):  # the pipeline's own lines; stdout stays one JSON object
            status = run_main_job(SilentBar, variants=args.variants, run_config=run_config)
        data = DataDirs(root=str(work / "data"))
        report: dict = {
            "plates": plates,
            "training": training,
            "pipeline_status": status,
            "variants": {},
            "baselines": {},
        }
        for variant in args.variants:
            path = data.evaluation_dir(variant) / "scores.parquet"
            if not path.is_file():
                report["variants"][variant] = {"error": "no scores"}
                continue
            scores = pd.read_parquet(path)
            report["n_cells_scored"] = int(scores["n_test"].max())  # every scored cell is tested once over the folds
            if "n_folds" in scores:
                report["evaluation_folds"] = int(scores["n_folds"].max())
            report["variants"][variant] = {
                "embedding": feature_scores(scores, "embedding"),
                "embedding_invariant": feature_scores(scores, "embedding_invariant"),
                **cluster_scores(data, variant),
            }
            if not report["baselines"]:
                report["baselines"] = {name: feature_scores(scores, name) for name in BASELINES}
        report["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
