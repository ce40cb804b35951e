"""Benchmark: our OpenCV cell finding (+ cropping) against the scikit-image/CellProfiler-style
reference, for speed on a 2-process pool and for quality on real and synthetic images.

    .venv/bin/python benchmarks/segmentation.py [--images-per-plate N] [--cultures N] [--size PX]

Quality: F1 on the real T98G frames (a detected centre inside a not-yet-claimed Mask R-CNN
cell is a hit) and precision/recall on synthetic plates (one-to-one within 8 px of the true
centre), per plated concentration. Speed: images per second through a pool of 2 worker
processes (one OpenCV thread each), reading the image, finding cells and cropping them.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gbm_assets.imaging.io import read_image
from benchmarks.reference_segmentation import reference_find_cells
from gbm_assets.imaging.scoring import score_point_in_mask, score_within_distance
from gbm_assets.imaging.segmentation import find_cells
from gbm_assets.imaging.synthetic import GROUND_TRUTH_NAME, write_plates

try:
    from gbm_assets.imaging.crops import extract_crops
except ImportError:  # cropping lives in another module; time cell finding alone without it
    extract_crops = None

T98G = Path(__file__).resolve().parents[2] / "shared" / "data" / "t98g"
FINDERS = {"ours": find_cells, "reference": reference_find_cells}
WORKERS = 2


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _process(task: tuple[str, str]) -> tuple[str, np.ndarray, int]:
    """Read one image, find its cells, crop them; return the path, centres and crop count."""
    finder, path = task
    image = read_image(path)
    cells, labels = FINDERS[finder](image)
    n_crops = len(extract_crops(image, cells, labels, crop_size=128).cells) if extract_crops else 0
    return path, cells[["x", "y"]].to_numpy(float), n_crops


def run_pool(finder: str, paths: list[str], workers: int = WORKERS) -> tuple[dict, float, int]:
    """Centres per image, wall seconds for all images (workers warm), and crops made."""
    # spawn: forking a parent whose OpenCV thread pool has run can deadlock the children.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        list(pool.map(_process, [(finder, paths[0])] * workers))  # imports and first calls
        start = time.perf_counter()
        results = list(pool.map(_process, [(finder, p) for p in paths], chunksize=1))
        wall = time.perf_counter() - start
    return {path: xy for path, xy, _ in results}, wall, sum(n for _, _, n in results)


def _pooled(scores: list[dict]) -> dict:
    tp, fp, fn = (sum(s[k] for s in scores) for k in ("tp", "fp", "fn"))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {k: round(v, 4) for k, v in (("precision", precision), ("recall", recall), ("f1", f1))} | {"n_cells": tp + fn}


def synthetic_images(root: Path) -> tuple[list[str], dict[str, pd.DataFrame], dict[str, str]]:
    """Image paths, true centres per image and plated concentration per image."""
    paths, truth, concentration = [], {}, {}
    for plate in sorted(p for p in root.iterdir() if (p / "manifest.csv").is_file()):
        manifest = pd.read_csv(plate / "manifest.csv", dtype={"concentration": str})
        cells = pd.read_csv(plate / GROUND_TRUTH_NAME)
        for row in manifest.itertuples(index=False):
            path = str(plate / row.image)
            paths.append(path)
            truth[path] = cells[cells["image"] == row.image]
            concentration[path] = row.concentration
    return paths, truth, concentration


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-plate", type=int, default=2)
    parser.add_argument("--cultures", type=int, default=10, help="plates = cultures x 5 concentrations")
    parser.add_argument("--size", type=int, default=1024, help="synthetic image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", choices=("easy", "hard"), default="hard", help="synthetic generator (imaging.synthetic)")
    parser.add_argument("--t98g", type=Path, default=T98G, help="folder with images/ and masks/")
    args = parser.parse_args()

    t98g_paths = sorted(str(p) for p in (args.t98g / "images").glob("*.tif"))
    with tempfile.TemporaryDirectory(prefix="gbm-seg-bench-") as tmp:
        write_plates(
            tmp, n_cultures=args.cultures, n_concentrations=5, images_per_plate=args.images_per_plate,
            size=args.size, seed=args.seed, difficulty=args.difficulty,
        )
        synth_paths, truth, concentration = synthetic_images(Path(tmp))
        paths = synth_paths + t98g_paths
        megapixels = sum(np.prod(read_image(p).shape) for p in paths) / 1e6
        report: dict = {
            "n_images": len(paths),
            "n_synthetic_images": len(synth_paths),
            "n_t98g_images": len(t98g_paths),
            "workers": WORKERS,
            "timed": "read + find_cells + " + ("extract_crops" if extract_crops else "no cropping (no extract_crops)"),
        }
        for finder in FINDERS:
            centres, wall, n_crops = run_pool(finder, paths)
            report[f"{finder}_images_per_s"] = round(len(paths) / wall, 2)
            report[f"{finder}_crops"] = n_crops
            if finder == "ours":
                report["megapixels_per_s"] = round(megapixels / wall, 2)
                one_worker_wall = run_pool(finder, paths, workers=1)[1]
                report["ours_images_per_s_one_worker"] = round(len(paths) / one_worker_wall, 2)
            frames = []
            for path in t98g_paths:
                mask_path = args.t98g / "masks" / (Path(path).stem + ".png")
                truth_labels = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
                frames.append(score_point_in_mask(centres[path], truth_labels))
            report[f"{finder}_f1"] = round(float(np.mean([s["f1"] for s in frames])), 4) if frames else None
            report[f"{finder}_f1_per_frame"] = [round(s["f1"], 4) for s in frames]
            scores = {
                p: score_within_distance(centres[p], truth[p][["x", "y"]].to_numpy(float), 8.0) for p in synth_paths
            }
            overall = _pooled(list(scores.values()))
            report[f"{finder}_synthetic_precision"] = overall["precision"]
            report[f"{finder}_synthetic_recall"] = overall["recall"]
            report[f"{finder}_synthetic_per_concentration"] = {
                c: _pooled([s for p, s in scores.items() if concentration[p] == c])
                for c in sorted(set(concentration.values()), key=float)
            }
        report["speedup"] = round(report["ours_images_per_s"] / report["reference_images_per_s"], 2)
    rss_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    report["peak_rss_mb"] = round(rss_kb / 1024, 1)
    report["cpu_count"] = os.cpu_count()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
