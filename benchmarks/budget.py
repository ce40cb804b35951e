"""Benchmark: how quality grows with the training budget (steps -> ARI, composition error, culture kappa).

    nice -n 5 .venv/bin/python benchmarks/budget.py [--budgets 12 48 120 shipped]
        [--variants autoencoder siamese_b siamese_f] [--cultures 4] [--images-per-plate 2]

Synthesizes plates (default: the hard generator, 4 cultures x 5 concentrations, 2 images of
1024 px each) in a temporary folder and runs the production pipeline on them once per budget:
the first budget through gbm_assets.pipeline.run_main_job (ingest, train, embed and score,
cluster, report), each later one through the same jobs run_main_job runs after ingest
(train_all_variants, cluster_all_variants; pipeline.run_partitions) on the same crops. A budget
is a number of optimizer steps (epochs of --steps-per-epoch steps, no time limit and no plateau
rule: deterministic given the seed) or "shipped": the TrainingConfig defaults (what the demo
runs). Prints one JSON object: per variant and budget the steps run, the training minutes
and what stopped training (from the trained_encoders metadata), the ARI of its GMM and HDBSCAN labels against the true morphotype, the composition error and the
culture and morphotype kappa held out by image and by plate (random forest and linear probe);
the baselines' scores once (they do not depend on the budget). The scores are read the way
benchmarks/features.py reads them (its helpers, imported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.features import (  # noqa: E402
    BASELINES,
    _environment,
    add_plate_arguments,
    cluster_scores,
    feature_scores,
    write_benchmark_plates,
)

KEPT_SCORES = ("culture_kappa", "morphotype_kappa")  # prefixes of feature_scores keys in the report


def training_config(budget: str, steps_per_epoch: int) -> dict:
    """The trained_encoders run config of a budget: "shipped" ({}: the TrainingConfig defaults) or
    a step count (a multiple of steps_per_epoch; time limit and plateau rule off). Raises
    ValueError for anything else."""
    if budget == "shipped":
        return {}
    steps = int(budget)
    if steps < steps_per_epoch or steps % steps_per_epoch:
        raise ValueError(f"budget {budget}: give a multiple of --steps-per-epoch ({steps_per_epoch}) or 'shipped'")
    return {
        "epochs": steps // steps_per_epoch,
        "max_steps_per_epoch": steps_per_epoch,
        "max_minutes": None,
        "patience": None,
    }


def training_metadata(instance, variant: str) -> dict:
    """stopped_by, epochs, steps and minutes of the variant's latest trained_encoders materialization."""
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("trained_encoders"), asset_partitions=[variant]), limit=1
    ).records
    if not records:
        return {"training": "none"}
    meta = records[0].asset_materialization.metadata
    return {k: meta[k].value for k in ("stopped_by", "epochs", "steps", "minutes") if k in meta}


def kept(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k.startswith(KEPT_SCORES)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["12", "48", "120", "shipped"])
    parser.add_argument("--steps-per-epoch", type=int, default=12)
    parser.add_argument("--variants", nargs="+", default=["autoencoder", "siamese_b", "siamese_f"])
    add_plate_arguments(parser)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    configs = {budget: training_config(budget, args.steps_per_epoch) for budget in args.budgets}

    with tempfile.TemporaryDirectory(prefix="gbm-budget-") as tmp:
        work = args.keep or Path(tmp)
        _environment(work)
        import dagster as dg
        import pandas as pd

        from gbm_assets.assets.resources import DataDirs
        from gbm_assets.definitions import defs
        from gbm_assets.pipeline import SilentBar, run_main_job, run_partitions

        started = time.perf_counter()
        plates = write_benchmark_plates(work / "data" / "raw", args)
        data = DataDirs(root=str(work / "data"))
        report: dict = {
            "plates": plates,
            "budgets": {budget: config or "TrainingConfig defaults" for budget, config in configs.items()},
            "variants": {v: {} for v in args.variants},
            "baselines": {},
            "seconds": {},
        }
        for i, (budget, training) in enumerate(configs.items()):
            t0 = time.perf_counter()
            run_config = {"train_all_variants": {"ops": {"trained_encoders": {"config": training}}}}
            with contextlib.redirect_stdout(sys.stderr):  # the pipeline's own lines; stdout stays one JSON object
                if i == 0:
                    status = run_main_job(SilentBar, variants=args.variants, run_config=run_config)
                    failed = [] if status == 0 else [f"run_main_job exit {status}"]
                else:
                    instance = dg.DagsterInstance.get()
                    failed = run_partitions(
                        instance,
                        defs,
                        "train_all_variants",
                        args.variants,
                        SilentBar,
                        "training",
                        "variant",
                        run_config=run_config["train_all_variants"],
                    )
                    good = [v for v in args.variants if v not in failed]
                    failed += run_partitions(
                        instance, defs, "cluster_all_variants", good, SilentBar, "clustering", "variant"
                    )
            instance = dg.DagsterInstance.get()
            for variant in args.variants:
                path = data.evaluation_dir(variant) / "scores.parquet"
                if variant in failed or not path.is_file():
                    report["variants"][variant][budget] = {"error": "failed" if variant in failed else "no scores"}
                    continue
                scores = pd.read_parquet(path)
                report["variants"][variant][budget] = {
                    **training_metadata(instance, variant),
                    **cluster_scores(data, variant),
                    **kept(feature_scores(scores, "embedding")),
                    "invariant": kept(feature_scores(scores, "embedding_invariant")),
                }
                if not report["baselines"]:
                    report["baselines"] = {name: kept(feature_scores(scores, name)) for name in BASELINES}
            report["seconds"][budget] = round(time.perf_counter() - t0, 1)
            print(f"budget {budget} done in {report['seconds'][budget]} s", file=sys.stderr, flush=True)
        report["seconds"]["total"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
