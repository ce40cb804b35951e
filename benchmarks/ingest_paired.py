"""Benchmark: the ingest job's speed against segmentation.py's pool figure, paired plate by plate.

segmentation.py times its pool of 2 worker processes (read + find_cells + extract_crops) and the
production ingest_plate job minutes apart; on a shared machine whose load changes that ratio
swings by +-0.2. Here each plate is timed both ways back to back, in alternating order: the
pool's task over that plate's images (2 spawn workers, warm) and one ingest_plate run of the
plate (raw_plates -> cell_coordinates -> cell_crops in-process, as `gbm-assets run` runs it, on a
temporary on-disk Dagster instance; Dagster step seconds, as segmentation.py counts them). The
ratio of a plate is pool seconds / ingest step seconds (1.0: the job costs nothing beyond cell
finding and cropping). The first run of the process also starts the job's process pool ("cold");
the medians leave it out.

    nice -n 5 .venv/bin/python benchmarks/ingest_paired.py [--images-per-plate 12] [--rounds 2]

Prints one JSON object: per plate run the two timings and the ratio, and their medians.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-plate", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="times each plate is ingested")
    parser.add_argument("--size", type=int, default=1024, help="synthetic image side in pixels")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gbm-ingest-paired-"))
    try:
        report = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(report, indent=2))


def run(args: argparse.Namespace, tmp: Path) -> dict:
    """Write the plates under tmp, time them both ways; the report main prints."""
    (tmp / "dagster_home").mkdir()
    (tmp / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    os.environ.update(
        GBM_ASSETS_DATA=str(tmp / "data"), DAGSTER_HOME=str(tmp / "dagster_home"), DAGSTER_DISABLE_TELEMETRY="1"
    )
    import dagster as dg
    import pandas as pd

    from benchmarks.segmentation import WORKERS, _init_worker, _process
    from gbm_assets.assets.sensors import INGEST_JOB_NAME
    from gbm_assets.definitions import defs
    from gbm_assets.imaging.synthetic import write_plates
    from gbm_assets.pipeline import QUIET, register_plates, step_seconds

    plates = write_plates(
        tmp / "data" / "raw",
        n_cultures=1,
        n_concentrations=5,
        images_per_plate=args.images_per_plate,
        size=args.size,
        seed=args.seed,
        difficulty="hard",
    )
    paths = {p.name: [str(p / name) for name in pd.read_csv(p / "manifest.csv")["image"]] for p in plates}
    instance = dg.DagsterInstance.get()
    keys = register_plates(instance)
    job = defs.resolve_job_def(INGEST_JOB_NAME)

    rows = []
    with ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        list(pool.map(_process, [("ours", paths[keys[0]][0])] * WORKERS))  # imports and first calls

        def pool_seconds(key: str) -> float:
            start = time.perf_counter()
            list(pool.map(_process, [("ours", p) for p in paths[key]], chunksize=1))
            return time.perf_counter() - start

        def ingest_seconds(key: str) -> float:
            result = job.execute_in_process(
                run_config=QUIET, instance=instance, partition_key=key, raise_on_error=False
            )
            if not result.success:
                raise SystemExit(f"ingest of plate {key} failed (run {result.run_id})")
            return sum(step_seconds(instance, result.run_id).values())

        for r in range(args.rounds):
            for i, key in enumerate(keys):
                if (i + r) % 2:
                    pooled, ingest = pool_seconds(key), ingest_seconds(key)
                else:
                    ingest, pooled = ingest_seconds(key), pool_seconds(key)
                rows.append(
                    {
                        "plate": key,
                        "round": r,
                        "cold": not rows,
                        "pool_s": round(pooled, 3),
                        "ingest_step_s": round(ingest, 3),
                        "ratio": round(pooled / ingest, 3),
                    }
                )
    warm = [row for row in rows if not row["cold"]]
    n = args.images_per_plate
    return {
        "images_per_plate": n,
        "plate_runs": len(rows),
        "workers": WORKERS,
        "ratio_median_warm": round(statistics.median(row["ratio"] for row in warm), 3),
        "ratio_all": round(sum(row["pool_s"] for row in rows) / sum(row["ingest_step_s"] for row in rows), 3),
        "pool_images_per_s_median": round(statistics.median(n / row["pool_s"] for row in rows), 2),
        "ingest_images_per_s_median_warm": round(statistics.median(n / row["ingest_step_s"] for row in warm), 2),
        "load_avg_1min": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "runs": rows,
    }


if __name__ == "__main__":
    main()
