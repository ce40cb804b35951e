"""Errors for bad input: each names the file (or plate) and the problem, so a user can fix it."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: a file or plate that cannot be used as it is."""

    def __init__(self, where: str | Path, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # Errors cross process-pool boundaries: rebuild them from both fields, not from args.
        return (type(self), (self.where, self.problem))


class ImageReadError(InputError):
    """An image file that is missing, unreadable, corrupt or of an unsupported kind."""


class PlateError(InputError):
    """A plate folder or manifest that breaks the plate format."""


class MissingCropsError(InputError, KeyError):
    """Cells that a table (embeddings, labels) lists but whose crops are gone: their plate's outputs
    were removed. A KeyError too, as the lookup it comes from; its message is shown unquoted."""

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def missing_crops_error(crops_dir: str | Path, missing_ids, n_missing: int) -> MissingCropsError:
    """The error for crop ids not in the crops dataset, naming the plates they belong to and what to run."""
    by_plate: dict[str, int] = {}
    for crop_id in missing_ids:
        plate = str(crop_id).split(":", 1)[0]  # schema.make_crop_id: '<plate>:<image>:<cell>'
        by_plate[plate] = by_plate.get(plate, 0) + 1
    plates = ", ".join(f"{p!r} ({n} cells)" for p, n in sorted(by_plate.items()))
    return MissingCropsError(
        crops_dir,
        f"{n_missing} cells have no crops: the cell_crops output of plate(s) {plates} is missing "
        "(removed, or its plate=ID folder deleted), but embeddings made before still list them. "
        "Run `gbm-assets run` to rebuild the variants without that plate (in the Dagster UI: materialize "
        "trained_encoders and embeddings, then clusters), or `gbm-assets run --refresh` to ingest it again "
        "if its folder is still under raw/",
    )
