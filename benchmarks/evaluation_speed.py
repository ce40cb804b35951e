"""Benchmark: where the embeddings stage's evaluation and the clusters stage spend their seconds.

    nice -n 5 .venv/bin/python benchmarks/evaluation_speed.py --data /tmp/run/data [--variant siamese_b]
    nice -n 5 .venv/bin/python benchmarks/evaluation_speed.py [--cultures 10] [--keep DIR]

With --data, a data folder that a pipeline run left (e.g. `benchmarks/features.py --keep DIR`:
DIR/data) with the variant's embeddings; without it, synthesizes hard plates (features.py's options)
and runs the production pipeline for the one variant first. Then times the production code paths:

- evaluation (embeddings asset, analysis.variant_evaluation.evaluate_with_baselines): the sample,
  the baseline features and scores (the first variant only; later variants read them from the
  cache), random forest and linear probe fits, confusion figures; "first_variant_s" and
  "later_variant_s" are the two totals;
- clusters (clusters asset): the fit on the sample (UMAP, HDBSCAN, GMM, automatic k; the fitted
  models' own timings), labelling every cell (cell_labels.write_labels), scoring and the
  explorer page (assets.clusters._score_and_explore), and numba's compilation of UMAP in a fresh
  process with an empty cache against one that finds it cached.

Where the old path is kept as an option, both run in this process and the JSON gives the ratio:
the linear probe's folds one at a time (evaluation.MAX_JOBS = 1) against side by side, and UMAP's
small-data distances through sklearn's per-pair loop against the compiled loop (same layout bytes,
checked). Prints one JSON object; seconds are wall-clock on whatever load the machine has
(load_average says how busy it was).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.features import _environment, add_plate_arguments, write_benchmark_plates  # noqa: E402


class Timers:
    """Seconds spent in named functions, summed over calls (wrapping module attributes in place)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo = contextlib.ExitStack()

    def wrap(self, module, name: str, part: str | None = None, key=None) -> None:
        real = getattr(module, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                label = key(*args, **kwargs) if key else part or name
                self.seconds[label] += time.perf_counter() - t

        setattr(module, name, timed)
        self._undo.callback(setattr, module, name, real)

    def close(self) -> None:
        self._undo.close()


def _round(d: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


def time_evaluation(data, variant: str, work: Path, seed: int = 0) -> dict:
    """Seconds per part of the embeddings asset's evaluation, first variant (baselines computed) and later ones."""
    from gbm_assets.analysis import evaluation
    from gbm_assets.analysis import variant_evaluation as ve
    from gbm_assets.analysis.truth import has_truth, true_morphotypes
    from gbm_assets.models.embedding_table import sample_embeddings

    t = time.perf_counter()
    rows, vectors = sample_embeddings(data.embeddings_file(variant), 10_000, seed=seed)  # EmbeddingConfig's sample
    truth = true_morphotypes(rows, data.raw)
    if has_truth(truth):
        rows["morphotype"] = truth
    sample_s = time.perf_counter() - t
    out = {"n_cells": len(rows), "sample_s": sample_s}
    cache = work / "baseline_cache"
    for run in ("first_variant", "later_variant"):
        timers = Timers()
        timers.wrap(ve, "baseline_features_for", "baseline_features")
        timers.wrap(evaluation, "_fold_predictions", key=lambda classifier, *a, **k: classifier)
        timers.wrap(ve, "plot_confusion", "figures")
        t = time.perf_counter()
        try:
            ve.evaluate_with_baselines(rows, vectors, data.crops, work / run, variant, seed=seed, cache_dir=cache)
        finally:
            timers.close()
        total = time.perf_counter() - t
        parts = dict(timers.seconds)
        parts["other"] = total - sum(parts.values())
        out[run] = _round({**parts, "scoring_s": total, "total_s": total + sample_s})
    out["first_variant_s"], out["later_variant_s"] = out["first_variant"]["total_s"], out["later_variant"]["total_s"]

    # The probe's folds one at a time (before) against side by side (now), on the embedding alone.
    probe = {}
    for label, jobs in (("sequential", 1), ("side_by_side", evaluation.MAX_JOBS)):
        old, evaluation.MAX_JOBS = evaluation.MAX_JOBS, jobs
        t = time.perf_counter()
        try:
            scores = ve.score_features(rows, {"embedding": vectors["embedding"]}, seed, classifiers=("linear_probe",))
        finally:
            evaluation.MAX_JOBS = old
        probe[f"{label}_s"] = time.perf_counter() - t
        probe[f"{label}_accuracy"] = scores["accuracy"].round(6).tolist()
    same = probe.pop("sequential_accuracy") == probe.pop("side_by_side_accuracy")
    out["linear_probe_folds"] = _round(
        {**probe, "ratio": probe["sequential_s"] / probe["side_by_side_s"], "same_scores": same}
    )
    return _round(out)


def time_umap_distances(x) -> dict:
    """UMAP fit with its small-data distances through sklearn's per-pair loop (before) and compiled (now)."""
    import numpy as np

    from gbm_assets.analysis import clustering

    config = clustering.ClusteringConfig()
    if len(x) >= 4096:
        return {"skipped": f"{len(x)} cells: UMAP uses nearest-neighbour descent from 4,096 cells, not all distances"}
    reducer = clustering._umap(config, config.umap_neighbors)
    reducer.fit_transform(x)  # compile (or load) everything once, so both timings below are warm
    out, layouts = {}, {}
    for label, fn in (("sklearn_loop", clustering._sklearn_pairwise_distances), ("compiled", None)):
        if fn is not None:
            clustering.umap.umap_.pairwise_distances = fn
        t = time.perf_counter()
        try:
            layouts[label] = clustering._umap(config, config.umap_neighbors).fit_transform(x)
        finally:
            clustering.umap.umap_.pairwise_distances = clustering._pairwise_distances
        out[f"{label}_s"] = time.perf_counter() - t
    out["ratio"] = out["sklearn_loop_s"] / out["compiled_s"]
    out["same_layout"] = bool(np.array_equal(layouts["sklearn_loop"], layouts["compiled"]))
    return _round(out)


_CHILD = """
import sys, time, numpy as np
t = time.perf_counter()
from gbm_assets.analysis import clustering
x = np.load(sys.argv[1])
c = clustering.ClusteringConfig()
clustering._umap(c, c.umap_neighbors).fit_transform(x)
print(time.perf_counter() - t)
"""


def time_numba_cache(x, work: Path) -> dict:
    """Import + UMAP fit in a fresh process with an empty numba cache (compiles) and with it filled (loads)."""
    import numpy as np

    path = work / "umap_input.npy"
    np.save(path, x)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(work / "numba_cache")}
    out = {}
    for label in ("empty_cache", "filled_cache"):
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path)], env=env, capture_output=True, text=True, check=True
        )
        out[f"{label}_s"] = float(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["empty_cache_s"] / out["filled_cache_s"]
    return _round(out)


def time_clusters(data, variant: str, work: Path) -> dict:
    """Seconds per part of the clusters asset's path (fit on the sample, label every cell, score, explorer)."""
    from gbm_assets.analysis.cell_labels import ClusterModels, fit_on_sample, write_labels
    from gbm_assets.assets.clusters import ClusterConfig, _score_and_explore
    from gbm_assets.models.embedding_table import sample_embeddings

    config = ClusterConfig(vector="embedding", preprocess="none")  # the path timed before per-variant defaults
    t = time.perf_counter()
    fitted, known = fit_on_sample(data.embeddings_file(variant), config.params(), config.fit_max_cells)
    fit_s = time.perf_counter() - t
    record = {"fingerprint": fitted.fingerprint()}
    models = ClusterModels(fitted, known.set_index("crop_id"), record, "fit")
    t = time.perf_counter()
    n_total, _ = write_labels(data.embeddings_file(variant), models, work / "labels.parquet")
    label_s = time.perf_counter() - t
    t = time.perf_counter()
    _score_and_explore(config, data, variant, work / "labels.parquet", work / "explorer.html")
    score_s = time.perf_counter() - t
    out = {
        "n_cells": n_total,
        "fit_s": fit_s,
        "fit_parts": _round(dict(fitted.timings)),
        "label_s": label_s,
        "score_and_explorer_s": score_s,
        "total_s": fit_s + label_s + score_s,
    }
    _, vectors = sample_embeddings(data.embeddings_file(variant), config.fit_max_cells, seed=config.seed)
    x = vectors[config.vector]  # the cells the models were fitted on
    out["umap_small_data_distances"] = time_umap_distances(x)
    out["umap_numba_compilation"] = time_numba_cache(x, work)
    return _round(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a pipeline run's data folder holding the variant's embeddings")
    parser.add_argument("--variant", default="siamese_b")
    parser.add_argument("--keep", type=Path, help="without --data: run the pipeline in this folder and keep it")
    parser.add_argument("--parts", nargs="+", choices=("evaluation", "clusters"), default=["evaluation", "clusters"])
    add_plate_arguments(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gbm-evaluation-speed-") as tmp:
        work = Path(tmp)
        report: dict = {"variant": args.variant}
        if args.data is None:
            run = args.keep or work / "run"
            _environment(run)
            from gbm_assets.pipeline import SilentBar, run_main_job

            report["plates"] = write_benchmark_plates(run / "data" / "raw", args)
            with contextlib.redirect_stdout(sys.stderr):
                report["pipeline_status"] = run_main_job(SilentBar, variants=[args.variant])
            data_root = run / "data"
        else:
            data_root = args.data  # read only: every output goes to a temporary folder
        from gbm_assets.assets.resources import DataDirs

        data = DataDirs(root=str(data_root))
        report["load_average_at_start"] = round(os.getloadavg()[0], 2)
        if "evaluation" in args.parts:
            report["evaluation"] = time_evaluation(data, args.variant, work / "evaluation")
        if "clusters" in args.parts:
            (work / "clusters").mkdir()
            report["clusters"] = time_clusters(data, args.variant, work / "clusters")
        report["load_average_at_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
