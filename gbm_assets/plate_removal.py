"""Taking a plate out of the analysis, and finding plates whose outputs outlived their folder.

Pure core (no Dagster): remove_plate_outputs deletes what ingestion materialized for one plate
(cell_coordinates, cell_masks, cell_crops, the plate version record, pending temp files of them),
and the plate folder under raw/ only when asked. Each output leaves its place in one rename (to a
hidden `.removed-...` name that Parquet readers and plate discovery ignore) before it is deleted,
crops first: a reader sees the plate's crops or none, never half of them, and a removal stopped
midway leaves a plate that is ingested less far, which running it again finishes.
pipeline.remove_plate adds the Dagster side (the plate's partition and its materialization records).

plate_sets_differ / plates_without_folder tell the variant stages and `gbm-assets run` that
a plate went away: a variant whose embeddings hold cells of plates that no longer have crops
is stale and is rebuilt without them.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from gbm_assets import paths
from gbm_assets.imaging.plates import MANIFEST_NAME, check_plate_id

REMOVED_PREFIX = ".removed-"


def plate_outputs(plate_id: str, root: Path | None = None) -> list[Path]:
    """The plate's materialized outputs that exist, in the order they are removed (crops first)."""
    root = root or paths.data_root()
    folders = [
        paths.cell_crops_dir(root) / f"plate={plate_id}",
        paths.cell_masks_dir(root) / f"plate={plate_id}",
        paths.cell_coordinates_dir(root) / f"plate={plate_id}",
    ]
    versions = paths.plate_versions_dir(root)
    found = [p for p in folders if p.exists() or p.is_symlink()]
    record = versions / f"{plate_id}.json"
    if record.exists() or record.is_symlink():
        found.append(record)
    return found


def _leftovers(plate_id: str, root: Path) -> list[Path]:
    """Pending temp files of the plate's version record and earlier removals stopped midway."""
    versions = paths.plate_versions_dir(root)
    found = list(versions.glob(f".{plate_id}.json.*.tmp")) if versions.is_dir() else []
    for parent, name in (
        (paths.cell_crops_dir(root), f"plate={plate_id}"),
        (paths.cell_masks_dir(root), f"plate={plate_id}"),
        (paths.cell_coordinates_dir(root), f"plate={plate_id}"),
        (versions, f"{plate_id}.json"),
        (paths.raw_dir(root), plate_id),
    ):
        if parent.is_dir():
            found += parent.glob(f"{REMOVED_PREFIX}{name}.*")
    return found


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # links inside (add-plate links images) are removed, never followed
    else:
        path.unlink(missing_ok=True)


def _take_out(path: Path) -> None:
    """Rename path to a hidden name beside it (one step), then delete it."""
    hidden = path.with_name(f"{REMOVED_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    os.replace(path, hidden)
    _delete(hidden)


def remove_plate_outputs(plate_id: str, root: Path | None = None, raw: bool = False) -> list[Path]:
    """Delete the plate's materialized outputs (and with raw=True its folder under raw/); return what was removed.

    The raw folder (the user's images, or links to them) is kept unless raw is True. Removing a
    plate with nothing left returns []. Raises PlateError for an id that is not a safe plate id.
    """
    check_plate_id(plate_id)
    root = Path(root) if root is not None else paths.data_root()
    targets = plate_outputs(plate_id, root)
    folder = paths.raw_dir(root) / plate_id
    if raw and (folder.exists() or folder.is_symlink()):
        targets.append(folder)
    for path in targets:
        _take_out(path)
    leftovers = _leftovers(plate_id, root)
    for path in leftovers:
        _delete(path)
    return targets + leftovers


def plates_with_outputs(root: Path | None = None) -> list[str]:
    """Plates that have any materialized output (coordinates, masks, crops or a version record), sorted."""
    root = root or paths.data_root()
    found = set()
    for dataset in (paths.cell_crops_dir(root), paths.cell_masks_dir(root), paths.cell_coordinates_dir(root)):
        if dataset.is_dir():
            found |= {p.name[len("plate=") :] for p in dataset.iterdir() if p.name.startswith("plate=")}
    versions = paths.plate_versions_dir(root)
    if versions.is_dir():
        found |= {p.stem for p in versions.glob("*.json") if not p.name.startswith(".")}
    return sorted(found)


def plates_without_folder(root: Path | None = None) -> list[str]:
    """Plates with materialized outputs but no plate folder (with a manifest) under raw/: still analysed."""
    root = root or paths.data_root()
    raw = paths.raw_dir(root)
    return [p for p in plates_with_outputs(root) if not (raw / p / MANIFEST_NAME).is_file()]


def crop_plates(crops_dir: Path) -> set[str]:
    """Plates that have a crops file in the crops dataset."""
    crops_dir = Path(crops_dir)
    if not crops_dir.is_dir():
        return set()
    return {
        p.name[len("plate=") :]
        for p in crops_dir.iterdir()
        if p.name.startswith("plate=") and paths.plate_file(crops_dir, p.name[len("plate=") :]).is_file()
    }


def table_plates(path: Path) -> set[str]:
    """The distinct values of a Parquet file's `plate` column (embeddings, labels)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["plate"]).column("plate")
    return {str(v) for v in pc.unique(column).to_pylist()}


def plates_gone(table: Path, crops_dir: Path) -> list[str]:
    """Plates whose cells a variant's table (embeddings, labels) holds but which have no crops any more, sorted.

    [] when the table does not exist (nothing was made from the plate yet).
    """
    if not Path(table).is_file():
        return []
    return sorted(table_plates(table) - crop_plates(crops_dir))


def plate_of_crop(crop_id: str) -> str:
    """The plate a crop id belongs to (schema.make_crop_id: '<plate>:<image>:<cell>'; plate ids hold no ':')."""
    return str(crop_id).split(":", 1)[0]
