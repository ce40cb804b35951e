"""Seconds and peak memory of fit_clusters (UMAP + HDBSCAN + GMM + auto-k) by number of cells.

Prints one JSON object. Each size runs in its own subprocess so that peak RSS
(getrusage ru_maxrss, which only grows) belongs to that size alone.

    python benchmarks/clustering.py                  # 10k, 30k, 100k cells
    python benchmarks/clustering.py --sizes 2000 5000
    GBM_CLUSTERING_CONFIG='{"hdbscan_selection": "leaf", "auto_k_criterion": "bic"}' python benchmarks/clustering.py

The 11 planted types stand in for the thesis' setting (11 clusters on 7,500 cells): the ARI of
each labelling against them is printed beside the time.

Target: 100k cells in under 3 minutes and 4 GiB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np

DIMS = 128
N_TYPES = 11
TARGET_SECONDS = 180
TARGET_RSS_GIB = 4.0
CONFIG_ENV = "GBM_CLUSTERING_CONFIG"  # JSON of ClusteringConfig fields to override, e.g. the pre-issue-13 ones


def synthetic_embeddings(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float32 Gaussian mixture of 11 unequal, overlapping types in 128-D, like an encoder's output."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(N_TYPES, 5.0))
    types = rng.choice(N_TYPES, size=n, p=weights)
    centres = rng.normal(0.0, 0.35, size=(N_TYPES, DIMS))
    x = centres[types] + rng.normal(0.0, 1.0, size=(n, DIMS))
    return x.astype(np.float32), types


def run_one(n: int) -> dict:
    t0 = time.perf_counter()
    from gbm_assets.analysis.clustering import ClusteringConfig, cluster_metrics, fit_clusters

    import_s = time.perf_counter() - t0
    x, types = synthetic_embeddings(n)
    load_before = os.getloadavg()[0]
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    fitted, labels = fit_clusters(x, replace(ClusteringConfig(seed=0), **json.loads(os.environ.get(CONFIG_ENV, "{}"))))
    fit_s = time.perf_counter() - t
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu_after.ru_utime - cpu.ru_utime) + (cpu_after.ru_stime - cpu.ru_stime)
    xy = labels[["umap_x", "umap_y"]].to_numpy()
    return {
        "n_cells": n,
        "seconds": round(fit_s, 1),
        "cpu_seconds": round(cpu_s, 1),  # < seconds * cores means the machine was shared
        "load_average_at_start": round(load_before, 1),
        "stage_seconds": {k: round(v, 1) for k, v in fitted.timings.items()},
        "import_seconds": round(import_s, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "hdbscan_clusters": int(labels["hdbscan"].max() + 1),
        "hdbscan_noise_fraction": round(float(labels["hdbscan_noise"].mean()), 3),
        "auto_k": fitted.auto_k.k,
        "gmm_ari_vs_truth": round(cluster_metrics(xy, labels["gmm"], types)["ari"], 3),
        "auto_ari_vs_truth": round(cluster_metrics(xy, labels["auto"], types)["ari"], 3),
        "hdbscan_ari_vs_truth": round(cluster_metrics(xy, labels["hdbscan"], types)["ari"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child)))
        return
    results = []
    for n in args.sizes:
        proc = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    at_100k = next((r for r in results if r["n_cells"] == 100_000), None)
    print(
        json.dumps(
            {
                "benchmark": "fit_clusters (UMAP + HDBSCAN + GMM + auto-k)",
                "cpus": os.cpu_count(),
                "features": DIMS,
                "results": results,
                "target": f"100000 cells < {TARGET_SECONDS} s and < {TARGET_RSS_GIB} GiB",
                "meets_target_at_100k": None
                if at_100k is None
                else (at_100k["seconds"] < TARGET_SECONDS and at_100k["peak_rss_mib"] < TARGET_RSS_GIB * 1024),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
