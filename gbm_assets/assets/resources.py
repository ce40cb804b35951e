"""Where the data lives, as a resource so tests and deployments can point it elsewhere."""


from pathlib import Path

import dagster as dg

from gbm_assets import paths


class DataDirs(dg.ConfigurableResource):
    """Root of the data folder (inputs under raw/, materialized datasets beside it).

    Empty means GBM_ASSETS_DATA if set, else data/ in the project.
    """

    root: str = ""

    @property
    def base(self) -> Path:
        return Path(self.root).resolve() if self.root else paths.data_root()

    @property
    def raw(self) -> Path:
        return paths.raw_dir(self.base)

    def plate_dir(self, plate_id: str) -> Path:
        return self.raw / plate_id

    def plate_version_file(self, plate_id: str) -> Path:
        """The version of the plate raw_plates last validated (data/plate_versions/<plate>.json)."""
        return paths.plate_versions_dir(self.base) / f"{plate_id}.json"

    @property
    def coordinates(self) -> Path:
        return paths.cell_coordinates_dir(self.base)

    @property
    def masks(self) -> Path:
        return paths.cell_masks_dir(self.base)

    @property
    def crops(self) -> Path:
        return paths.cell_crops_dir(self.base)

    @property
    def encoders(self) -> Path:
        return self.base / "encoders"

    def encoder_dir(self, variant: str) -> Path:
        return self.encoders / variant

    def encoder_record(self, variant: str) -> Path:
        """run.json of the MLflow run that trained the variant's current encoder."""
        return self.encoder_dir(variant) / "run.json"

    @property
    def embeddings(self) -> Path:
        return self.base / "embeddings.parquet"

    def embeddings_file(self, variant: str) -> Path:
        return paths.variant_file(self.embeddings, variant)

    @property
    def evaluation(self) -> Path:
        return self.base / "evaluation"

    @property
    def clusters(self) -> Path:
        return self.base / "clusters.parquet"

    def labels_file(self, variant: str) -> Path:
        return paths.variant_file(self.clusters, variant)

    @property
    def reports(self) -> Path:
        return self.base / "reports"
