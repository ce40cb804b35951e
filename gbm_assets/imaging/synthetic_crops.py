"""Synthetic cell crops written as the crops stage writes them, for tests and benchmarks of the model stages.

Three shape classes (round, elongated 2.5:1, ring) whose culture is their shape, so that culture
is learnable from the pixels. Unlike imaging.synthetic (whole plates of images to segment),
these skip cell finding: each crop holds one centred cell and its 0/1 mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gbm_assets.schema import CONTEXT_COLUMNS, CROP_SCHEMA, MEASUREMENT_COLUMNS, make_crop_id

SHAPES = ("round", "long", "ring")


def synthetic_crops(
    shape: np.ndarray, size: int, rng: np.random.Generator, radius: tuple[float, float] = (0.18, 0.26)
) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) uint8 crops and (n, size, size) uint8 0/1 masks of a centred cell per entry of shape.

    shape: (n,) ints indexing SHAPES. radius: the cell's radius range as a fraction of size.
    """
    n = len(shape)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) - (size - 1) / 2
    angle = rng.uniform(0, np.pi, (n, 1, 1))
    r = rng.uniform(*radius, (n, 1, 1)) * size
    aspect = np.where(shape == 1, 2.5, 1.0)[:, None, None]
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = yy * np.cos(angle) - xx * np.sin(angle)
    d = np.sqrt((u / (r * np.sqrt(aspect))) ** 2 + (v * np.sqrt(aspect) / r) ** 2)
    mask = d <= 1
    body = np.where(shape[:, None, None] == 2, np.exp(-(((d - 0.8) / 0.15) ** 2)), 1.0 - 0.5 * d)
    image = 0.2 + 0.6 * mask * body + rng.normal(0, 0.05, (n, size, size))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask.astype(np.uint8)


def write_synthetic_crops(
    root: str | Path,
    plates: Sequence[str] = ("P1", "P2", "P3"),
    per_plate: int | Sequence[int] = 24,
    size: int = 32,
    images: int = 4,
    seed: int = 0,
    mixed: bool = False,
    radius: tuple[float, float] = (0.18, 0.26),
) -> Path:
    """A cell_crops dataset: root/plate=<id>/part-0.parquet in CROP_SCHEMA; returns root.

    per_plate: crops of each plate (one number for all, or one per plate); crop i lies on image
    img<i % images>.tif. mixed=False: plate p is all SHAPES[p % 3]; True: shapes drawn at random.
    Seeded: the same arguments write the same bytes.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = [per_plate] * len(plates) if isinstance(per_plate, int) else list(per_plate)
    for p, (plate, n) in enumerate(zip(plates, counts, strict=False)):
        shape = rng.integers(0, len(SHAPES), n) if mixed else np.full(n, p % len(SHAPES))
        pixels, masks = synthetic_crops(shape, size, rng, radius)
        image = [f"img{i % images}.tif" for i in range(n)]
        columns = {
            "crop_id": [make_crop_id(plate, image[i], i) for i in range(n)],
            "plate": [plate] * n,
            "image": image,
            "x": rng.integers(64, 900, n).astype(np.int32),
            "y": rng.integers(64, 900, n).astype(np.int32),
            "culture": [SHAPES[s] for s in shape],
            "concentration": ["1000"] * n,
            "replicate": np.ones(n, np.int32),
            "timepoint_h": np.zeros(n),
            "well": ["B2"] * n,
            "position": ["1"] * n,
            "cell_id": np.arange(n, dtype=np.int32),
            **{m: rng.random(n) for m in MEASUREMENT_COLUMNS},
            **{m: np.full(n, np.nan) for m in CONTEXT_COLUMNS},  # not measured
            "qc": ["cell"] * n,
            "crop_size": np.full(n, size, np.int16),
            "pixels": [c.tobytes() for c in pixels],
            "mask": [m.tobytes() for m in masks],
        }
        out = root / f"plate={plate}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns, schema=CROP_SCHEMA), out / "part-0.parquet")
    return root
