"""Benchmark: our OpenCV cell finding (+ cropping) against the scikit-image/CellProfiler-style
reference, for speed on a 2-process pool and for quality on real and synthetic images.

    .venv/bin/python benchmarks/segmentation.py [--images-per-plate N] [--cultures N] [--size PX]

Quality, per set, through the production path (imaging.plate_cells.plate_coordinates: the
plate's cell size estimated from its images, every candidate judged, the candidates labelled
"cell" scored): precision, recall and F1 on the 6 real T98G frames (one plate; a detected
centre inside a not-yet-claimed Mask R-CNN cell is a hit), on the 24 hand-annotated Usiigaci
fields (each field its own plate: they come from different days and set-ups; same scoring) and
on the synthetic plates (one-to-one within 8 px of the true centre, also per plated
concentration), beside the reference on the same images at its fixed 40 px diameter; and how
close the size estimate comes to the annotated mean diameter. Speed: images per second through
a pool of 2 worker processes (started as production's are: plate_cells.worker_setup, one OpenCV
thread each and a heap that keeps freed buffers; the reference's alike), reading the image, finding cells and
cropping them, ours against the reference ("speedup"; "speedup_cpu": the same in the workers' CPU
time per image, which the load of other processes changes less); and the end-to-end ingest of 5 synthetic plates of
the thesis' length (144 images each, its hourly time points; --ingest-images-per-plate; the
fixed Dagster cost of a plate run weighs more on short plates, see ingest_paired.py), through
the production ingest_plate job (raw_plates -> cell_coordinates -> cell_crops, run as
benchmarks/scale.py runs it, Dagster step seconds), as images per second and as a ratio to ours,
also without the first plate ("warm": its steps start the process pool, which the pool figure
starts before its clock), and against the pool timed again on the ingest's own images right
after it ("ratio_same_images": the same cells and the same machine load on both sides).
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

from benchmarks.reference_segmentation import reference_find_cells
from gbm_assets.imaging.cell_quality import kept_candidates
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.neighbors import with_neighbors
from gbm_assets.imaging.plate_cells import worker_setup
from gbm_assets.imaging.plate_coordinates import coordinates_summary, plate_coordinates
from gbm_assets.imaging.scoring import score_point_in_mask, score_within_distance
from gbm_assets.imaging.segmentation import SegmentationParams, find_cells, find_cells_boxed
from gbm_assets.imaging.synthetic import GROUND_TRUTH_NAME, write_plates

try:
    from gbm_assets.imaging.crops import extract_crops
except ImportError:  # cropping lives in another module; time cell finding alone without it
    extract_crops = None

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
T98G = SHARED / "t98g"
USIIGACI = SHARED / "usiigaci"
FINDERS = {"ours": find_cells, "reference": reference_find_cells}
WORKERS = 2


def _init_worker() -> None:
    # production's worker start-up (plate_cells' pool): one OpenCV thread, a heap that keeps
    # freed image-sized buffers; for both finders' pools alike
    worker_setup()


def _process(task: tuple[str, str]) -> tuple[str, np.ndarray, int, float]:
    """Read one image, find its cells, crop them; return the path, centres, crop count and the
    worker's CPU seconds for it."""
    finder, path = task
    cpu = time.process_time()
    image = read_image(path)
    if finder == "ours":  # production measures every image's neighbours in the same worker (plate_cells),
        # on the boxes cell finding found
        cells, labels, boxes = find_cells_boxed(image)
        cells = with_neighbors(cells, labels, boxes=boxes)
    else:
        cells, labels = FINDERS[finder](image)
    n_crops = len(extract_crops(image, cells, labels, crop_size=128).cells) if extract_crops else 0
    return path, cells[["x", "y"]].to_numpy(float), n_crops, time.process_time() - cpu


def run_pool(finder: str, paths: list[str], workers: int = WORKERS) -> tuple[dict, float, int, float]:
    """Centres per image, wall seconds for all images (workers warm), crops made, and the
    workers' CPU seconds for all images (what another process's load on the machine changes least)."""
    # spawn: forking a parent whose OpenCV thread pool has run can deadlock the children.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        list(pool.map(_process, [(finder, paths[0])] * workers))  # imports and first calls
        start = time.perf_counter()
        results = list(pool.map(_process, [(finder, p) for p in paths], chunksize=1))
        wall = time.perf_counter() - start
    return {path: xy for path, xy, *_ in results}, wall, sum(r[2] for r in results), sum(r[3] for r in results)


def _pooled(scores: list[dict]) -> dict:
    tp, fp, fn = (sum(s[k] for s in scores) for k in ("tp", "fp", "fn"))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {k: round(v, 4) for k, v in (("precision", precision), ("recall", recall), ("f1", f1))} | {
        "n_cells": tp + fn
    }


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


def annotated_diameter(labels: np.ndarray) -> float:
    """Mean equivalent diameter (px) of the annotated cells of an instance mask."""
    _, areas = np.unique(labels[labels > 0], return_counts=True)
    return float(np.mean(2 * np.sqrt(areas / np.pi))) if len(areas) else float("nan")


def _ours_on_plate(plate_id: str, folder: Path, images: list[str]) -> tuple[dict[str, np.ndarray], dict]:
    """Centres of the candidates labelled "cell" per image (production path) and the plate's
    size estimate and qc counts."""
    plate = plate_coordinates(plate_id, folder, images, SegmentationParams(), estimate_size=True, workers=WORKERS)
    cells = kept_candidates(plate.coordinates)
    centres = {name: cells.loc[cells["image"] == name, ["x", "y"]].to_numpy(float) for name in images}
    info = {
        "estimated_diameter_px": plate.size.diameter_px if plate.size else None,
        "scale_px": plate.params.cell_diameter_px,
        "qc_counts": coordinates_summary(plate)["qc_counts"],
    }
    return centres, info


def _reference_centres(paths: list[str]) -> dict[str, np.ndarray]:
    with ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        results = list(pool.map(_process, [("reference", p) for p in paths], chunksize=1))
    return {path: xy for path, xy, *_ in results}


def _summed(counts: list[dict]) -> dict:
    return {k: sum(c[k] for c in counts) for k in counts[0]} if counts else {}


def ratio_summary(ratios: list[float], tolerance: float = 0.25) -> dict | None:
    """Mean, min and max of size-estimate / annotated-diameter ratios and how many lie within
    tolerance of 1 ("k/n"); None without a ratio."""
    if not ratios:
        return None
    return {
        "mean": round(float(np.mean(ratios)), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
        "within_25_percent": f"{sum(abs(r - 1) <= tolerance for r in ratios)}/{len(ratios)}",
    }


def score_real_set(name: str, folder: Path, per_field: bool) -> dict:
    """Precision/recall/F1 of ours (production path) and the reference on a set of real fields
    with instance masks (images/*.tif, masks/*.png); per_field: each field is its own plate."""
    images = sorted(p.name for p in (folder / "images").glob("*.tif"))
    masks = {n: cv2.imread(str(folder / "masks" / (Path(n).stem + ".png")), cv2.IMREAD_UNCHANGED) for n in images}
    plates = [[n] for n in images] if per_field else [images]
    ours, infos = {}, []
    for i, group in enumerate(plates):
        centres, info = _ours_on_plate(f"{name}{i}", folder / "images", group)
        ours.update(centres)
        infos.append(info)
    reference = _reference_centres([str(folder / "images" / n) for n in images])
    out: dict = {"n_images": len(images), "n_cells": int(sum(len(np.unique(m)) - 1 for m in masks.values()))}
    for finder, centres in (("ours", ours), ("reference", {Path(k).name: v for k, v in reference.items()})):
        scores = [score_point_in_mask(centres[n], masks[n]) for n in images]
        out[finder] = _pooled(scores) | {"n_detected": int(sum(s["tp"] + s["fp"] for s in scores))}
        if finder == "ours":
            out[finder]["f1_per_image"] = [round(s["f1"], 3) for s in scores]
    truth_d = [annotated_diameter(masks[n]) for n in images]
    estimates = [info["estimated_diameter_px"] for info in infos]
    if per_field:
        ratios = [e / t for e, t in zip(estimates, truth_d, strict=False) if e]
    else:
        ratios = [estimates[0] / float(np.mean(truth_d))] if estimates[0] else []
    out["size"] = {
        "annotated_mean_diameter_px": round(float(np.mean(truth_d)), 1),
        "estimate_over_annotated": ratio_summary(ratios),
        "scale_px": sorted({info["scale_px"] for info in infos}),
    }
    out["qc_counts"] = _summed([info["qc_counts"] for info in infos])
    return out


def score_synthetic_set(root: Path) -> dict:
    """Precision/recall of ours (production path, per plate) and the reference on synthetic plates."""
    paths, truth, concentration = synthetic_images(root)
    ours, infos = {}, []
    for plate in sorted(p for p in root.iterdir() if (p / "manifest.csv").is_file()):
        images = pd.read_csv(plate / "manifest.csv")["image"].tolist()
        centres, info = _ours_on_plate(plate.name, plate, images)
        ours.update({str(plate / n): xy for n, xy in centres.items()})
        infos.append(info)
    reference = _reference_centres(paths)
    out: dict = {"n_images": len(paths), "n_plates": len(infos)}
    for finder, centres in (("ours", ours), ("reference", reference)):
        scores = {p: score_within_distance(centres[p], truth[p][["x", "y"]].to_numpy(float), 8.0) for p in paths}
        out[finder] = _pooled(list(scores.values())) | {
            "per_concentration": {
                c: _pooled([s for p, s in scores.items() if concentration[p] == c])
                for c in sorted(set(concentration.values()), key=float)
            }
        }
    out["qc_counts"] = _summed([info["qc_counts"] for info in infos])
    out["scale_px"] = sorted({info["scale_px"] for info in infos})
    return out


def plate_step_seconds(dagster_home: Path) -> list[float]:
    """Step seconds (raw_plates + cell_coordinates + cell_crops) of each run recorded in the
    Dagster instance at dagster_home, in the order the runs were made."""
    import dagster as dg

    from gbm_assets.pipeline import step_seconds

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        runs = instance.get_runs(ascending=True)
        return [round(sum(step_seconds(instance, run.run_id).values()), 2) for run in runs]


def ingest_images_per_s(raw_parent: Path, n_images: int) -> dict:
    """The production ingest_plate job over the plates under raw_parent/data/raw (see scale.py):
    images/s over all its step seconds, and "warm" over the plates after the first (whose
    cell_coordinates step also starts the process pool, as the pool figure's warm-up does)."""
    from benchmarks.scale import _child

    home = raw_parent / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    stage = _child(raw_parent, "ingest", None, {})
    per_plate = plate_step_seconds(home)
    warm = per_plate[1:]
    return {
        "images_per_s": round(n_images / stage["step_seconds"], 2),
        "images_per_s_warm": round(n_images * len(warm) / len(per_plate) / sum(warm), 2) if warm else None,
        "step_seconds": stage["step_seconds"],
        "plate_step_seconds": per_plate,
        "run_seconds": stage["run_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-plate", type=int, default=2)
    parser.add_argument("--cultures", type=int, default=10, help="plates = cultures x 5 concentrations")
    parser.add_argument("--size", type=int, default=1024, help="synthetic image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--difficulty", choices=("easy", "hard"), default="hard", help="synthetic generator (imaging.synthetic)"
    )
    parser.add_argument("--t98g", type=Path, default=T98G, help="folder with images/ and masks/")
    parser.add_argument("--usiigaci", type=Path, default=USIIGACI, help="folder with images/ and masks/")
    parser.add_argument("--no-ingest", action="store_true", help="skip the end-to-end ingest timing")
    parser.add_argument(
        "--ingest-images-per-plate",
        type=int,
        default=144,
        help="images per plate of the ingest timing (default: a plate of the thesis, 144 hourly time points)",
    )
    args = parser.parse_args()

    t98g_paths = sorted(str(p) for p in (args.t98g / "images").glob("*.tif"))
    with tempfile.TemporaryDirectory(prefix="gbm-seg-bench-") as tmp:
        raw = Path(tmp) / "data" / "raw"
        write_plates(
            raw,
            n_cultures=args.cultures,
            n_concentrations=5,
            images_per_plate=args.images_per_plate,
            size=args.size,
            seed=args.seed,
            difficulty=args.difficulty,
        )
        synth_paths = synthetic_images(raw)[0]
        paths = synth_paths + t98g_paths
        megapixels = sum(np.prod(read_image(p).shape) for p in paths) / 1e6
        report: dict = {
            "n_images_timed": len(paths),
            "workers": WORKERS,
            "timed": "read + find_cells (candidates, quality labels) + neighbour measurements (ours) + "
            + ("extract_crops" if extract_crops else "no cropping"),
            "quality": {
                "t98g": score_real_set("t98g", args.t98g, per_field=False),
                "usiigaci": score_real_set("usiigaci", args.usiigaci, per_field=True),
                "synthetic": score_synthetic_set(raw),
            },
        }
        for finder in FINDERS:
            _, wall, n_crops, cpu = run_pool(finder, paths)
            report[f"{finder}_images_per_s"] = round(len(paths) / wall, 2)
            report[f"{finder}_cpu_ms_per_image"] = round(1000 * cpu / len(paths), 1)
            report[f"{finder}_crops"] = n_crops
            if finder == "ours":
                report["megapixels_per_s"] = round(megapixels / wall, 2)
                report["ours_images_per_s_one_worker"] = round(len(paths) / run_pool(finder, paths, workers=1)[1], 2)
        report["speedup"] = round(report["ours_images_per_s"] / report["reference_images_per_s"], 2)
        # the same ratio in worker CPU time: on a shared machine the wall-clock one swings by +-5 %
        report["speedup_cpu"] = round(report["reference_cpu_ms_per_image"] / report["ours_cpu_ms_per_image"], 2)
        if not args.no_ingest:
            # plates of the thesis' length (144 hourly time points, one plate per density): Dagster's
            # fixed cost per plate run (about 0.5 s of event writes) would dominate toy plates of 12
            ingest_dir = Path(tmp) / "ingest"
            plates = write_plates(
                ingest_dir / "data" / "raw",
                n_cultures=1,
                n_concentrations=5,
                images_per_plate=args.ingest_images_per_plate,
                size=args.size,
                seed=args.seed + 1,
                difficulty=args.difficulty,
            )
            ingest = ingest_images_per_s(ingest_dir, len(plates) * args.ingest_images_per_plate)
            # the pool again, right after, on the ingest's own images: the same cells, the same load
            ingest_paths = [str(p / name) for p in plates for name in pd.read_csv(p / "manifest.csv")["image"]]
            pool_same = round(len(ingest_paths) / run_pool("ours", ingest_paths)[1], 2)
            report["ingest"] = ingest | {
                "plates": len(plates),
                "images_per_plate": args.ingest_images_per_plate,
                "ratio_to_ours": round(ingest["images_per_s"] / report["ours_images_per_s"], 2),
                "ratio_to_ours_warm": round(ingest["images_per_s_warm"] / report["ours_images_per_s"], 2)
                if ingest["images_per_s_warm"]
                else None,
                "ours_images_per_s_same_images": pool_same,
                "ratio_same_images": round(ingest["images_per_s"] / pool_same, 2),
            }
    rss_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    report["peak_rss_mb"] = round(rss_kb / 1024, 1)
    report["cpu_count"] = os.cpu_count()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
