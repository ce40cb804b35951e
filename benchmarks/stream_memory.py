"""Peak memory of the core path of the embed, cluster and report stages at several numbers of crops.

Prints one JSON object. For each size the script writes a synthetic crops dataset
(imaging.synthetic_crops, 10 plates, 128-pixel crops, rewritten with one row group per
ROW_GROUP crops as cell_crops writes one per image), then runs each stage in its own child
process and reports its peak RSS (ru_maxrss), the RSS it started from and the peak of
pyarrow's default memory pool:

- embed: models.training.write_embeddings (a small stand-in encoder: the stage's reading and
  writing, not its convolutions) and the evaluation's seeded sample of EVAL_CELLS cells with its
  raw-pixel and hand-crafted baselines (analysis.variant_evaluation.baseline_features_for);
- cluster: analysis.cell_labels.load_or_fit on a fixed FIT_CELLS sample (fitting cost grows
  with fit_max_cells by design, not with the cells), write_labels for every cell, and the
  explorer page of up to EXPLORER_POINTS cells (crop_thumbnails);
- report: analysis.variant_report.build_section on a 20,000-cell labels sample with the
  per-cell table of every cell.

Above EVAL_CELLS, EXPLORER_POINTS and 20,000 crops every sample is full, so what still grows
between two such sizes grows with the crops.

    nice -n 5 python benchmarks/stream_memory.py --sizes 20000 40000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW_GROUP = 64
EVAL_CELLS = 10_000  # EmbeddingConfig.eval_max_cells
FIT_CELLS = 2_000
EXPLORER_POINTS = 20_000  # ClusterConfig.explorer_max_points
PLATES = 10


def write_dataset(root: Path, n_crops: int) -> Path:
    """root/crops: n_crops synthetic 128-pixel crops on PLATES plates, ROW_GROUP rows per row group."""
    import pyarrow.parquet as pq

    from gbm_assets.imaging.synthetic_crops import write_synthetic_crops

    crops = root / "crops"
    for i in range(PLATES):  # one plate at a time: the generator holds a plate's crops as float64
        write_synthetic_crops(crops, [f"P{i}"], n_crops // PLATES, size=128, images=40, seed=i, mixed=True)
    for path in crops.glob("plate=*/part-0.parquet"):
        pq.write_table(pq.read_table(path), path, row_group_size=ROW_GROUP, compression="zstd")
    return crops


def run_stage(root: Path, stage: str) -> dict:
    """Run one stage on root (the child side); return its measurements."""
    import numpy as np
    import pyarrow as pa

    crops, emb, labels = root / "crops", root / "embeddings.parquet", root / "labels.parquet"

    def rss_mib() -> float:
        return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024

    if stage == "embed":
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        import keras

        from gbm_assets.analysis.variant_evaluation import baseline_features_for
        from gbm_assets.models.embedding_table import sample_embeddings
        from gbm_assets.models.training import limit_cpu_threads, write_embeddings

        limit_cpu_threads()
        inputs = keras.Input((128, 128, 1))
        x = keras.layers.Flatten()(keras.layers.AveragePooling2D(16)(inputs))
        encoder = keras.Model(inputs, keras.layers.Dense(64)(x))
        encoder.predict_on_batch(np.zeros((2, 128, 128, 1), np.float32))
        start, t = rss_mib(), time.perf_counter()
        n, _ = write_embeddings(encoder, crops, emb, batch_size=256)
        rows, _ = sample_embeddings(emb, EVAL_CELLS, seed=0)
        baseline_features_for(crops, rows["crop_id"])
    elif stage == "cluster":
        from gbm_assets.analysis.cell_labels import load_or_fit, write_labels
        from gbm_assets.analysis.clustering import ClusteringConfig
        from gbm_assets.analysis.explorer import crop_thumbnails, sample_for_explorer, write_explorer
        from gbm_assets.analysis.variant_report import sample_labels
        from gbm_assets.paths import ClusterModelFiles
        from gbm_assets.staging import Staging

        start, t = rss_mib(), time.perf_counter()
        with Staging() as stage_dir:
            models = load_or_fit(
                emb, ClusterModelFiles(root / "cluster_models"), labels, "run", ClusteringConfig(), stage_dir, FIT_CELLS
            )
            n, _ = write_labels(emb, models, stage_dir.path(labels))
            points = sample_for_explorer(sample_labels(stage_dir.path(labels), 5 * EXPLORER_POINTS), EXPLORER_POINTS)
            write_explorer(root / "explorer.html", "v", points, crop_thumbnails(crops, points["crop_id"]))
            stage_dir.commit([*models.commit_order, labels])
    elif stage == "report":
        import pyarrow.parquet as pq

        from gbm_assets.analysis.variant_report import build_section, sample_labels

        start, t = rss_mib(), time.perf_counter()
        # mixed synthetic plates hold several cultures per replicate: bootstrap over cells, not units
        sample = sample_labels(labels, 20_000).drop(columns=["replicate"])
        build_section(
            "v", sample, crops, root / "report", n_boot=50, n_perm=99, labels_path=labels, embeddings_path=emb
        )
        n = pq.ParquetFile(labels).metadata.num_rows
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return {
        "crops": int(n),
        "seconds": round(time.perf_counter() - t, 1),
        "start_rss_mib": round(start),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "arrow_peak_mib": round(pa.default_memory_pool().max_memory() / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 40_000], help="numbers of crops")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_stage(Path(args.child[0]), args.child[1])))
        return
    results = {}
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="stream_memory_") as tmp:
            write_dataset(Path(tmp), size)
            for stage in ("embed", "cluster", "report"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", tmp, stage], capture_output=True, text=True, check=True
                )
                results.setdefault(stage, {})[str(size)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
