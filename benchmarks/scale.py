"""Seconds and peak RSS of every pipeline stage at three data sizes, extrapolated to the thesis' data set.

Prints one JSON object. For each size the script synthesizes plates of 1-megapixel images, then
runs the production jobs of gbm_assets.definitions (ingest_plate, train_all_variants,
cluster_all_variants, refresh_report) through gbm_assets.pipeline.run_partitions, the function
`gbm-assets run` uses, on a temporary on-disk Dagster instance (DAGSTER_HOME) and MLflow store.
Each stage runs in its own child process, so its peak RSS is its own (VmHWM of the process;
pool workers of cell finding and cropping reported apart), and its seconds come from Dagster's
step records (gbm_assets.pipeline.step_seconds), beside the child's whole wall time (imports,
run start-up).

Stages: ingest (all plates: validation, cell finding, crops), and per variant train (the
trained_encoders asset), embed (embeddings: every crop, dihedral mean, random-forest scores),
cluster (clusters: UMAP, HDBSCAN, GMM, automatic k, labels for every cell, explorer page), then
report (composition_report over every cell).

Training runs under the production TrainingConfig (default: 2 epochs of 12 batches of 128 crops
streamed from a seeded shuffle of all crops), so its cost does not grow with the data: like the
thesis, the encoder learns from a seeded sample; embedding, clustering and the report handle
every cell. The linear fits (seconds vs images, and vs crops) give the extrapolation to the
thesis' 57,600 images (about 3 M cells) and all 9 variants.

    nice -n 5 python benchmarks/scale.py                           # 100, 400, 1600 images
    nice -n 5 python benchmarks/scale.py --sizes 20 40 80 --variants siamese_b
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THESIS_IMAGES = 57_600
THESIS_CELLS = 3_000_000
THESIS_VARIANTS = 9
OVERNIGHT_HOURS = 12.0
FLAT_RSS_RATIO = 1.25  # peak RSS at the largest size over the smallest, at most this: "flat"
VARIANT_STAGES = ("train", "embed", "cluster")
# What each stage's work grows with, for the extrapolation.
DRIVER = {"ingest": "images", "train": "images", "embed": "crops", "cluster": "crops", "report": "crops"}


# ----------------------------------------------------------------------------- child: one stage


def _vm_hwm_mib() -> float:
    """This process' peak RSS (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_stage(stage: str, variant: str | None, run_config: dict) -> dict:
    """Run one stage with the production jobs on the instance at DAGSTER_HOME; its times and memory."""
    t0 = time.perf_counter()
    import dagster as dg

    from gbm_assets.assets.sensors import INGEST_JOB_NAME
    from gbm_assets.definitions import defs
    from gbm_assets.pipeline import QUIET, SilentBar, StageTimes, register_plates, run_partitions

    instance = dg.DagsterInstance.get()
    times = StageTimes()
    started = time.perf_counter()
    if stage == "report":
        result = defs.resolve_job_def("refresh_report").execute_in_process(
            run_config={**QUIET, **run_config}, instance=instance, raise_on_error=False
        )
        times.add_run(instance, result)
        failed = [] if result.success else ["report"]
    else:
        job, keys, assets = {
            "ingest": (INGEST_JOB_NAME, register_plates(instance) if stage == "ingest" else [], None),
            "train": ("train_all_variants", [variant], ["trained_encoders"]),
            "embed": ("train_all_variants", [variant], ["embeddings"]),
            "cluster": ("cluster_all_variants", [variant], None),
        }[stage]
        failed = run_partitions(instance, defs, job, keys, SilentBar, stage, "partition", times, run_config, assets)
    run_s = time.perf_counter() - started
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "step_seconds": round(sum(times.seconds.values()), 2),
        "run_seconds": round(run_s, 2),
        "process_seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime, 1),
        "peak_rss_mib": round(_vm_hwm_mib()),
        "workers_peak_rss_mib": round(workers.ru_maxrss / 1024),
        "failed": failed,
    }


# ----------------------------------------------------------------------------- driver


def _env(size_dir: Path) -> dict:
    return {
        **os.environ,
        "GBM_ASSETS_DATA": str(size_dir / "data"),
        "DAGSTER_HOME": str(size_dir / "dagster_home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{size_dir / 'mlflow.db'}",
        "MLFLOW_ARTIFACT_ROOT": (size_dir / "artifacts").as_uri(),
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }


def _child(size_dir: Path, stage: str, variant: str | None, run_config: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--dir", str(size_dir), "--run-config", json.dumps(run_config)]
    if variant:
        cmd += ["--variant", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(size_dir))
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} {variant or ''} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["failed"]:
        raise RuntimeError(f"stage {stage} {variant or ''}: {out['failed']} failed:\n{proc.stderr[-4000:]}")
    return out


def _count_crops(data: Path) -> int:
    import pyarrow.parquet as pq

    return sum(
        pq.ParquetFile(f).metadata.num_rows for f in (data / "cell_crops.parquet").glob("plate=*/part-0.parquet")
    )


def run_size(work: Path, n_images: int, args: argparse.Namespace, training: dict) -> dict:
    from gbm_assets.imaging.synthetic import write_plates

    n_plates = args.cultures * args.concentrations
    if n_images % n_plates:
        raise SystemExit(
            f"--sizes: {n_images} images is not a multiple of {n_plates} plates (--cultures x --concentrations)"
        )
    load = os.getloadavg()[0]
    size_dir = work / f"images_{n_images}"
    (size_dir / "dagster_home").mkdir(parents=True)
    (size_dir / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    t = time.perf_counter()
    write_plates(
        size_dir / "data" / "raw",
        n_cultures=args.cultures,
        n_concentrations=args.concentrations,
        images_per_plate=n_images // n_plates,
        size=args.image_size,
        seed=args.seed,
        difficulty="hard",
    )
    synth_s = time.perf_counter() - t
    stages = {"ingest": _child(size_dir, "ingest", None, {})}
    n_crops = _count_crops(size_dir / "data")
    for variant in args.variants:
        stages[f"train {variant}"] = _child(size_dir, "train", variant, training)
        stages[f"embed {variant}"] = _child(size_dir, "embed", variant, {})
    for variant in args.variants:
        stages[f"cluster {variant}"] = _child(size_dir, "cluster", variant, {})
    stages["report"] = _child(size_dir, "report", None, {})
    for row in stages.values():
        row["seconds_per_image"] = round(row["step_seconds"] / n_images, 4)
        row["ms_per_crop"] = round(1000 * row["step_seconds"] / max(n_crops, 1), 3)
    if not args.keep:
        shutil.rmtree(size_dir, ignore_errors=True)
    return {
        "images": n_images,
        "plates": n_plates,
        "megapixels_per_image": round(args.image_size**2 / 1e6, 3),
        "crops": n_crops,
        "crops_per_image": round(n_crops / n_images, 1),
        "synthesis_seconds": round(synth_s, 1),
        "load_average_at_start": round(load, 2),
        "stages": stages,
    }


def linear_fit(x: list[float], y: list[float]) -> dict:
    """Least-squares line y = slope * x + intercept with its R^2 (1.0 when y is constant)."""
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    predicted = slope * np.asarray(x, float) + intercept
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    r2 = 1.0 - float(np.sum((np.asarray(y) - predicted) ** 2)) / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": round(float(intercept), 2), "r2": round(r2, 4)}


def _stage_series(sizes: list[dict], stage: str, key: str) -> list[float]:
    """A stage's value per size; for a per-variant stage, the mean over the variants measured."""
    if stage in VARIANT_STAGES:
        return [
            sum(row[key] for name, row in s["stages"].items() if name.split(" ")[0] == stage)
            / sum(1 for name in s["stages"] if name.split(" ")[0] == stage)
            for s in sizes
        ]
    return [s["stages"][stage][key] for s in sizes]


def summarize(sizes: list[dict], n_variants_measured: int) -> dict:
    """Fits per stage, the extrapolation to the thesis' data set, the dominant stage and memory."""
    images = [s["images"] for s in sizes]
    crops = [s["crops"] for s in sizes]
    cells_per_image = sum(crops) / sum(images)
    fits, extrapolation, memory = {}, {}, {}
    for stage in ("ingest", *VARIANT_STAGES, "report"):
        seconds = _stage_series(sizes, stage, "step_seconds")
        by_images, by_crops = linear_fit(images, seconds), linear_fit(crops, seconds)
        by_images["slope_seconds_per_image"] = round(by_images.pop("slope"), 5)
        by_crops["slope_ms_per_crop"] = round(1000 * by_crops.pop("slope"), 4)
        fits[stage] = {"vs_images": by_images, "vs_crops": by_crops, "driver": DRIVER[stage]}
        if DRIVER[stage] == "images":
            slope, intercept, target = by_images["slope_seconds_per_image"], by_images["intercept"], THESIS_IMAGES
        else:
            slope, intercept, target = by_crops["slope_ms_per_crop"] / 1000, by_crops["intercept"], THESIS_CELLS
        # No growth measured (a fixed budget such as training's): the stage costs what it cost.
        one, model = (slope * target + intercept, "linear") if slope > 0 else (sum(seconds) / len(seconds), "constant")
        copies = THESIS_VARIANTS if stage in VARIANT_STAGES else 1
        extrapolation[stage] = {
            "hours": round(copies * one / 3600, 2),
            "runs": copies,
            "seconds_per_run": round(one, 1),
            "model": model,
            "driver": DRIVER[stage],
        }
        peaks = _stage_series(sizes, stage, "peak_rss_mib")
        ratio = max(peaks) / min(peaks)
        growth = linear_fit(crops, peaks)
        memory[stage] = {
            "mib_per_1000_crops": round(1000 * growth["slope"], 1),
            "peak_rss_gib_at_thesis_cells": round(
                max(max(peaks), growth["slope"] * THESIS_CELLS + growth["intercept"]) / 1024, 1
            ),
            "peak_rss_mib": [round(p) for p in peaks],
            "largest_over_smallest": round(ratio, 2),
            "flat": ratio <= FLAT_RSS_RATIO,
        }
    total_h = sum(e["hours"] for e in extrapolation.values())
    dominant = max(extrapolation, key=lambda k: extrapolation[k]["hours"])
    return {
        "fits": fits,
        "extrapolation": {
            "images": THESIS_IMAGES,
            "cells": THESIS_CELLS,
            "variants": THESIS_VARIANTS,
            "variants_measured": n_variants_measured,
            "measured_cells_per_image": round(cells_per_image, 1),
            "stages": extrapolation,
            "total_hours": round(total_h, 2),
            "dominant_stage": dominant,
            "dominant_share": round(extrapolation[dominant]["hours"] / total_h, 3) if total_h else None,
            "overnight_12h": total_h <= OVERNIGHT_HOURS,
            "notes": [
                "per-variant stages (train, embed, cluster) are the mean over the variants measured, times 9",
                "clustering fits its models on a seeded sample of at most fit_max_cells (50,000) cells and labels the "
                "rest by transform, so a slope measured below that many cells over-states its cost at 3 M cells",
                "training under the configured budget does not grow with the data (constant model when no growth is "
                "measured)",
            ],
        },
        "memory": memory,
        "memory_flat": all(m["flat"] for m in memory.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[100, 400, 1600], help="images per run (3 sizes for a fit)"
    )
    parser.add_argument("--image-size", type=int, default=1024, help="image side in pixels (1024: 1 MP)")
    parser.add_argument("--cultures", type=int, default=2)
    parser.add_argument("--concentrations", type=int, default=5, help="all 5 plated densities by default")
    parser.add_argument(
        "--variants", nargs="+", default=["siamese_b"], help="variants to run (the thesis' best: siamese_b)"
    )
    parser.add_argument("--epochs", type=int, help="training epochs (default: the production TrainingConfig's)")
    parser.add_argument("--max-steps-per-epoch", type=int, help="training batches per epoch (default: production's)")
    parser.add_argument("--max-crops", type=int, help="seeded sample of crops to train on (default: production's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where to write the runs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep each size's data, Dagster instance and MLflow store")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--run-config", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_stage(args.child, args.variant, json.loads(args.run_config))))
        return

    from gbm_assets.assets.encoders import TrainingConfig

    chosen = {"epochs": args.epochs, "max_steps_per_epoch": args.max_steps_per_epoch, "max_crops": args.max_crops}
    train_config = {
        **TrainingConfig().model_dump(include={"epochs", "max_steps_per_epoch", "batch_size", "max_crops", "seed"}),
        **{k: v for k, v in chosen.items() if v is not None},
    }
    training = {"ops": {"trained_encoders": {"config": train_config}}}
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="gbm-scale-", dir=args.workdir))
    started = time.perf_counter()
    sizes = []
    for n in sorted(args.sizes):
        sizes.append(run_size(work, n, args, training))
        print(
            json.dumps(sizes[-1]), file=sys.stderr, flush=True
        )  # each size as it ends: kept if a later one is stopped
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "load_average_at_start": [round(x, 2) for x in load],
                    "niceness": os.nice(0),
                },
                "training": {
                    "config": train_config,
                    "note": "training streams a seeded shuffle of the crops for "
                    "epochs x max_steps_per_epoch batches (a sample, as in the thesis); embed, cluster and report "
                    "handle every cell",
                },
                "variants": args.variants,
                "sizes": sizes,
                **summarize(sizes, len(args.variants)),
                "wall_seconds": round(time.perf_counter() - started, 1),
                **({"workdir": str(work)} if args.keep else {}),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
