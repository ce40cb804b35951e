"""Where things live on disk: the data root and the materialized datasets under it.

The data root is GBM_ASSETS_DATA if set, else data/ in the current project directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def project_root() -> Path:
    """The repository root (the folder holding pyproject.toml), else the working directory."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def data_root() -> Path:
    return Path(os.environ.get("GBM_ASSETS_DATA", project_root() / "data")).resolve()


def raw_dir(root: Path | None = None) -> Path:
    """Incoming plates: one folder per plate with a manifest.csv."""
    return (root or data_root()) / "raw"


def cell_coordinates_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "cell_coordinates.parquet"


def cell_masks_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "cell_masks"


def cell_crops_dir(root: Path | None = None) -> Path:
    return (root or data_root()) / "cell_crops.parquet"


def plate_versions_dir(root: Path | None = None) -> Path:
    """What raw_plates validated: one <plate>.json per plate (see imaging.plates.PlateVersion)."""
    return (root or data_root()) / "plate_versions"


def plate_file(dataset_dir: Path, plate_id: str) -> Path:
    """The one Parquet file of a plate inside a hive-partitioned dataset (plate=<id>/part-0.parquet)."""
    return dataset_dir / f"plate={plate_id}" / "part-0.parquet"


def variant_file(dataset_dir: Path, variant: str) -> Path:
    """The one Parquet file of a variant in a hive-partitioned dataset (variant=<name>/part-0.parquet)."""
    return dataset_dir / f"variant={variant}" / "part-0.parquet"


@dataclass(frozen=True)
class ClusterModelFiles:
    """One variant's fitted cluster models: data/cluster_models/<variant>/.

    record: model.json (encoder run, vector, fingerprint, name of the current model file);
    model(fp): model-<fingerprint[:16]>.npz, a new name per fitted model, so that the record
    switches from one model to the next in one rename; skipped: skipped.json, present only when
    the variant had too few cells to cluster; legacy_pickle: model.joblib of earlier versions,
    never loaded.
    """

    folder: Path

    @property
    def record(self) -> Path:
        return self.folder / "model.json"

    @property
    def skipped(self) -> Path:
        return self.folder / "skipped.json"

    @property
    def legacy_pickle(self) -> Path:
        return self.folder / "model.joblib"

    def model(self, fingerprint: str) -> Path:
        return self.folder / f"model-{fingerprint[:16]}.npz"

    def named(self, file_name: str) -> Path:
        """The model file a record names (its base name only: never a path outside the folder)."""
        return self.folder / Path(str(file_name)).name

    def models(self) -> list[Path]:
        """Every model-*.npz in the folder (the current one and any left over)."""
        return sorted(self.folder.glob("model-*.npz"))
