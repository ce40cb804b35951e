"""Where the data lives, as a resource so tests and deployments can point it elsewhere.

DataDirs (with gbm_assets.paths, which it delegates to) is the only place that spells the
folders and file names of the data root; assets ask it, never build paths themselves.
"""

from dataclasses import fields
from pathlib import Path
from typing import TypeVar

import dagster as dg

from gbm_assets import paths

P = TypeVar("P")


def core_params(config: dg.Config, params_type: type[P]) -> P:
    """The core's parameter dataclass `params_type` filled from the run config fields of the same
    name (the others, e.g. retry settings, stay with the asset); the dataclass' defaults fill the rest."""
    names = {f.name for f in fields(params_type)}
    return params_type(**{k: v for k, v in config.model_dump().items() if k in names})


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

    def encoder_file(self, variant: str) -> Path:
        """The variant's current trained encoder (Keras format)."""
        return self.encoder_dir(variant) / "encoder.keras"

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

    def evaluation_dir(self, variant: str) -> Path:
        """scores.parquet and the confusion-matrix figures of a variant's embeddings."""
        return self.evaluation / variant

    @property
    def baseline_cache(self) -> Path:
        """Baseline scores (raw pixels, hand-crafted features) of a cell sample, shared by the variants."""
        return self.evaluation / "_baselines"

    def confusion_figures(self, variant: str) -> list[Path]:
        """The variant's confusion matrices of its embedding (one PNG per target), sorted."""
        return sorted(self.evaluation_dir(variant).glob("confusion_embedding_*.png"))

    @property
    def clusters(self) -> Path:
        return self.base / "clusters.parquet"

    def labels_file(self, variant: str) -> Path:
        return paths.variant_file(self.clusters, variant)

    def cluster_models(self, variant: str) -> paths.ClusterModelFiles:
        """The variant's fitted cluster models, their record and its skipped note (cluster_models/<variant>/)."""
        return paths.ClusterModelFiles(self.base / "cluster_models" / variant)

    @property
    def reports(self) -> Path:
        return self.base / "reports"

    def explorer_file(self, variant: str) -> Path:
        """The variant's interactive explorer page."""
        return self.reports / "explorer" / f"{variant}.html"

    @property
    def composition_dir(self) -> Path:
        """The composition report folder (report.html and its figures)."""
        return self.reports / "composition"

    @property
    def composition_report(self) -> Path:
        """The report page, written last into composition_dir (it refers to the figures beside it)."""
        return self.composition_dir / "report.html"
