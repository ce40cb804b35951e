"""Shared fixtures: small synthetic plates, the real T98G frames, isolated data folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
T98G = REPO.parent / "shared" / "data" / "t98g"


def t98g_dir() -> Path:
    if not (T98G / "images").is_dir():
        pytest.skip(f"real T98G frames not found at {T98G}")
    return T98G


@pytest.fixture(scope="session")
def t98g() -> Path:
    return t98g_dir()


@pytest.fixture(scope="session")
def synth_plates(tmp_path_factory) -> Path:
    """A small synthetic data set: 2 cultures x 5 concentrations, 2 images of 512x512 each."""
    from gbm_assets.imaging.synthetic import write_plates

    raw = tmp_path_factory.mktemp("data") / "raw"
    write_plates(raw, n_cultures=2, n_concentrations=5, n_replicates=1, images_per_plate=2, size=512, seed=7)
    return raw


@pytest.fixture
def data_root(tmp_path, synth_plates) -> Path:
    """A fresh data folder whose raw/ holds copies of the small synthetic plates."""
    root = tmp_path / "data"
    shutil.copytree(synth_plates, root / "raw")
    return root


def write_tiny_plate(plate_dir: Path, n: int = 2, size=(64, 64), dtype=np.uint16, culture="A") -> Path:
    """A minimal valid plate of flat images (for validation tests)."""
    plate_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        name = f"img{i}.tif"
        tifffile.imwrite(plate_dir / name, rng.integers(0, 1000, size=size).astype(dtype))
        names.append(name)
    pd.DataFrame({"image": names, "culture": culture}).to_csv(plate_dir / "manifest.csv", index=False)
    return plate_dir


def materialize_ingest(data_root, plate_id, instance, assets, crops=None, finding=None, raise_on_error=True):
    """Materialize the ingest assets given (raw_plates, cell_coordinates, cell_crops or some of
    them) for one plate in-process, one worker, 64-px crops unless `crops` (cell_crops' config)
    says otherwise; `finding`: cell_coordinates' config."""
    import dagster as dg

    from gbm_assets.assets.resources import DataDirs

    ops = {
        "cell_crops": {"config": {"crop_size": 64, "workers": 1, **(crops or {})}},
        "cell_coordinates": {"config": {"workers": 1, **(finding or {})}},
    }
    names = {a.key.path[-1] for a in assets}
    return dg.materialize(
        assets,
        partition_key=plate_id,
        instance=instance,
        resources={"data": DataDirs(root=str(data_root))},
        run_config={"ops": {k: v for k, v in ops.items() if k in names}},
        raise_on_error=raise_on_error,
    )


def cropped_in(result) -> str:
    """Where the run's cell_crops took its crops from (its `cropped_in` metadata)."""
    return result.asset_materializations_for_node("cell_crops")[0].metadata["cropped_in"].value
