"""Benchmark: cell finding on the real annotated fields made to look like other microscopes.

    nice -n 5 .venv/bin/python benchmarks/microscopes.py [--fields N] [--variants a,b] [--overlays DIR]

The held-out fields come from other labs and set-ups (20x objectives, 696x520 / 704x520 8-bit
cameras). We have only the 24 hand-annotated Usiigaci fields and the 6 T98G frames (10x, 2x2
binning, 1024x1022, 16-bit), so each field and its instance mask are transformed to imitate
another set-up, written as a plate folder, and run through the production path
(benchmarks.segmentation._ours_on_plate: plate_coordinates with the size estimate, the candidates
labelled "cell" scored by score_point_in_mask). Variants (VARIANTS):

- baseline: the field as it is (16-bit TIFF);
- scale_0.5 / 0.75 / 1.5 / 2: other magnifications and pixel sizes (image cv2.INTER_AREA down,
  INTER_LINEAR up; mask INTER_NEAREST), 16-bit;
- tiles_696x520 / tiles_704x520: the field cut into tiles of a smaller camera (evenly spaced,
  overlapping, covering it), each tile its own plate: the size estimate sees one small field;
- 8bit: linear to 8-bit between the 0.1 and 99.9 percentiles (PNG); jpeg85: that, as a JPEG of
  quality 85;
- u373_like / u373_like_plate: x2, cut into 696x520 tiles, 8-bit (the held-out U373 set-up),
  each tile its own plate / the tiles of one field as one plate.

Usiigaci fields are one plate each (as in segmentation.py), the T98G frames one plate. Per
variant and set: pooled precision / recall / F1 and detections, their change from the baseline,
the size estimate against the annotated mean diameter of the source field times the scale
(mean / min / max ratio, plates within 25%, plates with no estimate), the scales cells were
found at, and the failure modes seen (size off by more than 25% on a plate, recall or precision
down by more than 0.1 from the baseline). --overlays writes, per variant and set, the worst
field's image with annotated outlines (green) and detections (blue: true, orange: a second one in
a cell, red: off the cells) as PNGs. recall_away_from_border: recall on the annotated cells that
do not touch the image border (a tile's edge cuts cells).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.segmentation import T98G, USIIGACI, _ours_on_plate, _pooled, annotated_diameter, ratio_summary
from gbm_assets.imaging.io import read_image
from gbm_assets.imaging.scoring import score_point_in_mask

SIZE_TOLERANCE = 0.25  # a size estimate off by more than this (relative) is a failure
DROP = 0.1  # precision or recall this far below the baseline is a collapse


@dataclass
class Field:
    """One annotated field: its name, image (H, W; uint8 or uint16), instance mask (H, W) and the
    annotated mean diameter (px) of the source field at this field's scale."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    diameter_px: float


def _rescaled_size(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    h, w = shape
    return max(1, round(w * factor)), max(1, round(h * factor))


def rescale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """An image seen at `factor` times the magnification: cv2.INTER_AREA when shrinking,
    INTER_LINEAR when enlarging (dtype kept)."""
    how = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, _rescaled_size(image.shape, factor), interpolation=how)


def rescale(image: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """An image (rescale_image) and its instance mask (INTER_NEAREST) seen at `factor` times the magnification."""
    size = _rescaled_size(image.shape, factor)
    return rescale_image(image, factor), cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)


def tile_origins(length: int, tile: int) -> list[int]:
    """Origins of the fewest tiles of `tile` px, evenly spaced, that cover `length` px (one when
    the length is at most a tile)."""
    if length <= tile:
        return [0]
    n = -(-length // tile)
    return [int(round(o)) for o in np.linspace(0, length - tile, n)]


def tiles(image: np.ndarray, width: int, height: int) -> Iterator[tuple[int, int, tuple[slice, slice]]]:
    """(row, column, window) of each tile of width x height px covering image."""
    h, w = image.shape
    for i, y in enumerate(tile_origins(h, height)):
        for j, x in enumerate(tile_origins(w, width)):
            yield i, j, (slice(y, y + height), slice(x, x + width))


def to_8bit(image: np.ndarray, low: float = 0.1, high: float = 99.9) -> np.ndarray:
    """uint8 copy of an image, linear between its `low` and `high` percentiles (clipped)."""
    lo, hi = np.percentile(image, (low, high))
    scaled = (image.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-6))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# A variant maps one source field to plates: lists of (suffix, image, mask, scale) per plate.
Plates = list[list[tuple[str, np.ndarray, np.ndarray, float]]]


def _scaled(factor: float) -> Callable[[np.ndarray, np.ndarray], Plates]:
    return lambda image, mask: [[("", *rescale(image, mask, factor), factor)]]


def _tiled(width: int, height: int, factor: float = 1.0, bits8: bool = False, one_plate: bool = False):
    def make(image: np.ndarray, mask: np.ndarray) -> Plates:
        if factor != 1.0:
            image, mask = rescale(image, mask, factor)
        if bits8:
            image = to_8bit(image)
        cut = [(f"_r{i}c{j}", image[w], mask[w], factor) for i, j, w in tiles(image, width, height)]
        return [cut] if one_plate else [[t] for t in cut]

    return make


VARIANTS: dict[str, Callable[[np.ndarray, np.ndarray], Plates]] = {
    "baseline": _scaled(1.0),
    "scale_0.5": _scaled(0.5),
    "scale_0.75": _scaled(0.75),
    "scale_1.5": _scaled(1.5),
    "scale_2": _scaled(2.0),
    "tiles_696x520": _tiled(696, 520),
    "tiles_704x520": _tiled(704, 520),
    "8bit": lambda image, mask: [[("", to_8bit(image), mask, 1.0)]],
    "jpeg85": lambda image, mask: [[("", to_8bit(image), mask, 1.0)]],  # written as JPEG (SUFFIX)
    "u373_like": _tiled(696, 520, factor=2.0, bits8=True),
    "u373_like_plate": _tiled(696, 520, factor=2.0, bits8=True, one_plate=True),
}
SUFFIX = {"jpeg85": ".jpg"}  # else 16-bit TIFF or 8-bit PNG (lossless)
JPEG_QUALITY = 85


def write_image(folder: Path, stem: str, image: np.ndarray, variant: str) -> str:
    """Write a variant's image into a plate folder as that variant's file type; its file name."""
    name = stem + SUFFIX.get(variant, ".tif" if image.dtype == np.uint16 else ".png")
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if name.endswith(".jpg") else []
    if not cv2.imwrite(str(folder / name), image, params):
        raise OSError(f"could not write {folder / name}")
    return name


def load_set(folder: Path, limit: int | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(stem, image, instance mask) of the fields of a set (images/*.tif, masks/*.png); with
    limit, that many spread evenly over the sorted names."""
    names = sorted((folder / "images").glob("*.tif"), key=lambda p: p.name)
    if limit is not None and limit < len(names):
        names = [names[i] for i in np.unique(np.rint(np.linspace(0, len(names) - 1, limit)).astype(int))]
    return [
        (p.stem, read_image(p), cv2.imread(str(folder / "masks" / (p.stem + ".png")), cv2.IMREAD_UNCHANGED))
        for p in names
    ]


def run_variant(
    variant: str, set_name: str, fields: list[tuple[str, np.ndarray, np.ndarray]], one_plate: bool, tmp: Path
) -> dict:
    """Score one variant of one set through the production path (see module doc)."""
    make = VARIANTS[variant]
    plates: list[list[Field]] = []
    for stem, image, mask in fields:
        source_d = annotated_diameter(mask)
        made = [[Field(stem + s, im, m, source_d * f) for s, im, m, f in plate] for plate in make(image, mask)]
        if one_plate:  # the whole set is one plate
            plates = [[*(plates[0] if plates else []), *(f for p in made for f in p)]]
        else:
            plates.extend(made)
    scores, inner, ratios, no_estimate, scales, per_field = [], [], [], 0, set(), []
    start = time.perf_counter()
    for k, plate in enumerate(plates):
        folder = tmp / f"{set_name}-{variant}-{k}"
        folder.mkdir(parents=True)
        names = [write_image(folder, f.name, f.image, variant) for f in plate]
        centres, info = _ours_on_plate(f"{set_name}{k}", folder, names)
        scales.add(info["scale_px"])
        truth_d = float(np.mean([f.diameter_px for f in plate]))
        if info["estimated_diameter_px"]:
            ratios.append(info["estimated_diameter_px"] / truth_d)
        else:
            no_estimate += 1
        for f, name in zip(plate, names, strict=True):
            s = score_point_in_mask(centres[name], f.mask)
            scores.append(s)
            inner.append(score_point_in_mask(centres[name], away_from_border(f.mask)))
            per_field.append((f, centres[name], s, ratios[-1] if info["estimated_diameter_px"] else None))
    out = _pooled(scores) | {
        "n_images": len(scores),
        "n_plates": len(plates),
        "n_detected": int(sum(s["tp"] + s["fp"] for s in scores)),
        "recall_away_from_border": _pooled(inner)["recall"],
        "size": {
            "annotated_mean_diameter_px": round(float(np.mean([f.diameter_px for f, *_ in per_field])), 1),
            "estimate_over_annotated": ratio_summary(ratios, SIZE_TOLERANCE),
            "plates_without_estimate": no_estimate,
            "scale_px": [round(min(scales), 1), round(max(scales), 1)],
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    worst = sorted(per_field, key=lambda t: (t[2]["f1"], t[0].name))[:3]
    out["worst_fields"] = [
        {
            "field": f.name,
            "precision": round(s["precision"], 3),
            "recall": round(s["recall"], 3),
            "n_cells": s["tp"] + s["fn"],
            "n_detected": s["tp"] + s["fp"],
            "estimate_over_annotated": round(r, 3) if r else None,
        }
        for f, _, s, r in worst
    ]
    out["_worst"] = worst[0] if worst else None
    return out


def away_from_border(mask: np.ndarray) -> np.ndarray:
    """The instance mask without the cells that touch the image border (cut by a tile's edge)."""
    border = np.unique(np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]]))
    return np.where(np.isin(mask, border[border > 0]), 0, mask)


def failure_modes(result: dict, baseline: dict) -> list[str]:
    """The failures of a variant against its set's baseline (see module doc)."""
    found = []
    size = result["size"]
    ratio = size["estimate_over_annotated"]
    if ratio and (abs(ratio["min"] - 1) > SIZE_TOLERANCE or abs(ratio["max"] - 1) > SIZE_TOLERANCE):
        found.append(f"size estimate off by > 25% on some plates ({ratio['within_25_percent']} within)")
    if size["plates_without_estimate"]:
        found.append(f"no size estimate on {size['plates_without_estimate']}/{result['n_plates']} plates")
    for key in ("recall", "precision"):
        if result[key] < baseline[key] - DROP:
            found.append(f"{key} collapses: {result[key]} vs {baseline[key]}")
    return found


def overlay(path: Path, field: Field, centres: np.ndarray) -> None:
    """PNG of a field (8-bit) with annotated outlines (green), true detections (blue), second
    detections in a cell (orange) and detections off the cells (red)."""
    grey = field.image if field.image.dtype == np.uint8 else to_8bit(field.image)
    out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    edges = (cv2.morphologyEx(field.mask.astype(np.uint16), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0) & (
        field.mask > 0
    )
    out[edges] = (0, 200, 0)
    h, w = field.mask.shape
    claimed = set()
    for x, y in np.rint(centres).astype(int):
        cell = int(field.mask[y, x]) if 0 <= y < h and 0 <= x < w else 0
        colour = (0, 0, 255) if cell == 0 else (0, 140, 255) if cell in claimed else (255, 0, 0)
        claimed.add(cell)
        cv2.circle(out, (int(x), int(y)), 4, colour, -1)
    cv2.imwrite(str(path), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t98g", type=Path, default=T98G, help="folder with images/ and masks/")
    parser.add_argument("--usiigaci", type=Path, default=USIIGACI, help="folder with images/ and masks/")
    parser.add_argument("--fields", type=int, default=None, help="Usiigaci fields used, spread evenly (all)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--overlays", type=Path, default=None, help="folder for PNG overlays of the worst fields")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {sorted(unknown)}")
    variants = ["baseline", *(v for v in variants if v != "baseline")]  # the others are compared with it
    sets = {"usiigaci": (load_set(args.usiigaci, args.fields), False), "t98g": (load_set(args.t98g, None), True)}
    report: dict = {"fields": {name: len(f) for name, (f, _) in sets.items()}, "summary": {}, "variants": {}}
    if args.overlays:
        args.overlays.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gbm-microscopes-") as tmp:
        for variant in variants:
            report["variants"][variant] = {}
            for set_name, (fields, one_plate) in sets.items():
                result = run_variant(variant, set_name, fields, one_plate, Path(tmp))
                worst = result.pop("_worst")
                if args.overlays and worst:
                    overlay(args.overlays / f"{variant}-{set_name}-{worst[0].name}.png", worst[0], worst[1])
                base = report["variants"]["baseline"][set_name] if variant != "baseline" else result
                if variant != "baseline":
                    result["change"] = {k: round(result[k] - base[k], 4) for k in ("precision", "recall", "f1")}
                result["failures"] = failure_modes(result, base)
                report["variants"][variant][set_name] = result
                ratio = result["size"]["estimate_over_annotated"]
                report["summary"][f"{variant} {set_name}"] = (
                    f"P {result['precision']:.2f} R {result['recall']:.2f} F1 {result['f1']:.2f}, "
                    f"size x{ratio['mean'] if ratio else float('nan'):.2f}"
                    + (f" ({len(result['failures'])} failure modes)" if result["failures"] else "")
                )
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
