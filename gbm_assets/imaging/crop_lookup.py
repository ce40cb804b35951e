"""Fetching particular crops (by crop_id) from the crops dataset, streamed with a filter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from gbm_assets.imaging.crops import decode_crops
from gbm_assets.storage import plate_dataset


def read_crops(crops_dir: str | Path, crop_ids, column: str = "pixels") -> np.ndarray:
    """(n, S, S) uint8 crops (or masks, column="mask") in the order of crop_ids.

    Only matching rows are materialised: the scan filters on crop_id batch by batch.
    """
    wanted = pd.Index(pd.Series(crop_ids, dtype=str))
    dataset = plate_dataset(crops_dir)
    head = dataset.head(1, columns=["crop_size"])
    side = int(head.column("crop_size")[0].as_py()) if head.num_rows else 0
    out = np.zeros((len(wanted), side, side), np.uint8)
    found = np.zeros(len(wanted), bool)
    scanner = dataset.scanner(columns=["crop_id", column], filter=pc.field("crop_id").isin(wanted.tolist()))
    for batch in scanner.to_batches():
        if not batch.num_rows:
            continue
        where = wanted.get_indexer(batch.column("crop_id").to_pylist())
        out[where] = decode_crops(batch.column(column), side)
        found[where] = True
    if not found.all():
        missing = wanted[~found][:3].tolist()
        raise KeyError(f"{crops_dir}: crops not found: {missing} ({(~found).sum()} missing)")
    return out
