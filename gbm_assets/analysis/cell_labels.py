"""Cluster labels for every cell of a variant: fit once on a sample, then label the rest by prediction.

Fitting UMAP/HDBSCAN/GMM costs O(n log n) time and memory, so the models are fitted on a
seeded sample of at most fit_max_cells cells; every other cell, and every cell of a plate that
arrives later, is labelled with the fitted models (clustering.assign_new), batch by batch.
Cells already labelled keep their labels, so a re-run on new plates only labels new cells.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gbm_assets.analysis.clustering import (
    CONTEXT_COLUMNS,
    MIN_CELLS,
    ClusteringConfig,
    FittedClustering,
    TooFewCells,
    assign_new,
    fit_clusters,
    load_clustering,
    neighbor_contact,
    save_clustering,
    shrunk_parameters,
)
from gbm_assets.errors import InputError
from gbm_assets.imaging.crop_dataset import CropSelection, iter_record_batches
from gbm_assets.models.embedding_table import iter_embeddings, sample_embeddings
from gbm_assets.paths import ClusterModelFiles
from gbm_assets.schema import PROVENANCE_COLUMNS, PROVENANCE_SCHEMA
from gbm_assets.staging import Staging
from gbm_assets.storage import AtomicParquetWriter

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("umap_x", "umap_y", "hdbscan", "hdbscan_noise", "gmm", "gmm_prob", "gmm_probs", "auto")


def crop_contact(crops_dir: str | Path) -> pd.Series:
    """Each crop's neighbour contact (clustering.neighbor_contact, 0-1 float64), indexed by crop_id.

    Reads only crop_id and clustering.CONTEXT_COLUMNS of the cell_crops dataset. Raises
    InputError naming the dataset when it lacks them or a crop was not measured (crops made
    before cell_crops carried CellProfiler's neighbour measurements: materialize
    cell_coordinates and cell_crops again).
    """
    table = pd.concat(
        [b.to_pandas() for b in iter_record_batches(CropSelection.of(crops_dir), ["crop_id", *CONTEXT_COLUMNS], 65536)],
        ignore_index=True,
    )
    try:
        return pd.Series(neighbor_contact(table), index=pd.Index(table["crop_id"], name="crop_id"))
    except ValueError as exc:
        raise InputError(crops_dir, str(exc)) from exc


def _context(rows: pd.DataFrame, contact: pd.Series | None) -> np.ndarray | None:
    """The contact of rows' crops (None without one); InputError for a crop it lacks."""
    if contact is None:
        return None
    missing = ~rows["crop_id"].isin(contact.index)
    if missing.any():
        raise InputError(
            "cell_crops",
            f"{int(missing.sum())} embedded cells have no crop (first {rows['crop_id'][missing].iloc[0]!r}): "
            "materialize cell_crops and embeddings again to cluster with neighbor_weight > 0",
        )
    return contact.loc[rows["crop_id"]].to_numpy()


def fit_on_sample(
    embeddings_path: str | Path,
    config: ClusteringConfig,
    fit_max_cells: int,
    vector: str = "embedding",
    contact: pd.Series | None = None,
) -> tuple[FittedClustering, pd.DataFrame]:
    """Fit the clusterings on a seeded sample; return the models and the sample's labels.

    contact: each crop's neighbour contact by crop_id (crop_contact), for config.neighbor_weight > 0."""
    rows, vectors = sample_embeddings(embeddings_path, fit_max_cells, seed=config.seed, vectors=[vector])
    return fit_clusters(rows.assign(embedding=list(vectors[vector])), config, _context(rows, contact))


def label_cells(
    embeddings_path: str | Path,
    fitted: FittedClustering,
    known: pd.DataFrame | None = None,
    vector: str = "embedding",
    batch_size: int = 8192,
    contact: pd.Series | None = None,
) -> Iterator[tuple[pd.DataFrame, int]]:
    """(labels with provenance, number newly assigned) per batch, in the embeddings' row order.

    known: labels already decided (the fit sample, or an earlier run), indexed by crop_id.
    contact: each crop's neighbour contact by crop_id, for models fitted with it.
    """
    known = known if known is not None and len(known) else None
    for rows, x in iter_embeddings(embeddings_path, batch_size=batch_size, vector=vector):
        have = rows["crop_id"].isin(known.index).to_numpy() if known is not None else np.zeros(len(rows), bool)
        parts = []
        if have.any():
            old = known.loc[rows.loc[have, "crop_id"], list(LABEL_COLUMNS)].reset_index(drop=True)
            parts.append((np.flatnonzero(have), pd.concat([rows[have].reset_index(drop=True), old], axis=1)))
        if (~have).any():
            todo = rows[~have].reset_index(drop=True)
            new = assign_new(fitted, todo.assign(embedding=list(x[~have])), _context(todo, contact))
            parts.append((np.flatnonzero(~have), new))
        order = np.concatenate([idx for idx, _ in parts])
        merged = pd.concat([frame for _, frame in parts], ignore_index=True).iloc[np.argsort(order)]
        yield merged[[*PROVENANCE_COLUMNS, *LABEL_COLUMNS]].reset_index(drop=True), int((~have).sum())


def labels_schema(n_components: int, model_fingerprint: str | None = None) -> pa.Schema:
    """Provenance, then the labels (gmm_probs: one probability per mixture component).

    model_fingerprint (FittedClustering.fingerprint of the models that labelled the cells) is
    kept in the file's schema metadata, so a reader can tell which models the labels came from.
    """
    schema = pa.schema(
        list(PROVENANCE_SCHEMA)
        + [
            ("umap_x", pa.float32()),
            ("umap_y", pa.float32()),
            ("hdbscan", pa.int32()),
            ("hdbscan_noise", pa.bool_()),
            ("gmm", pa.int32()),
            ("gmm_prob", pa.float32()),
            ("gmm_probs", pa.list_(pa.float32(), n_components)),
            ("auto", pa.int32()),
        ]
    )
    return schema.with_metadata({MODEL_KEY: model_fingerprint.encode()}) if model_fingerprint else schema


MODEL_KEY = b"gbm.model_fingerprint"


def labels_model_fingerprint(path: str | Path) -> str | None:
    """The fingerprint of the models a labels file was made with (None: not recorded, or no file)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = metadata.get(MODEL_KEY)
    return value.decode() if value else None


def count_cells(embeddings_path: str | Path) -> int:
    """Rows (cells) of an embeddings file, from its footer."""
    return pq.ParquetFile(embeddings_path).metadata.num_rows


def labels_table(labels: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    arrays = []
    for field in schema:
        col = labels[field.name]
        if field.name == "gmm_probs":
            flat = np.concatenate([np.asarray(v, np.float32) for v in col]) if len(col) else np.zeros(0, np.float32)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat), field.type.list_size))
        else:
            arrays.append(pa.array(col.to_numpy(), type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class ClusterModels:
    """The models that label a variant's cells, fitted now or reused, and the cells they already labelled."""

    fitted: FittedClustering
    known: pd.DataFrame  # LABEL_COLUMNS already decided (fit sample or earlier run), indexed by crop_id
    record: dict  # the contents of model.json (encoder run, vector, fingerprint, auto_k, ...)
    mode: str  # "fit" or "assign new cells (no refit)"
    commit_order: list[Path] = dataclass_field(default_factory=list)  # staged model file and record, in swap order
    shrunk: dict = dataclass_field(default_factory=dict)  # shrunk_parameters of the fit (small data)


def load_or_fit(
    embeddings_path: str | Path,
    files: ClusterModelFiles,
    labels_path: str | Path,
    encoder_run_id: str,
    config: ClusteringConfig,
    stage: Staging,
    fit_max_cells: int,
    vector: str = "embedding",
    refit: bool = False,
    logger=log,
    contact: pd.Series | None = None,
) -> ClusterModels:
    """Reuse the stored cluster models of a variant, or fit new ones on a seeded sample and stage them.

    Reused (no refit) only when the record (files.record) names a model file that exists, was
    fitted on the embeddings of `encoder_run_id` with the same `vector`, and its fingerprint is
    the one recorded in the labels at labels_path, and its clustering settings equal `config`
    (a changed setting refits, with a log line naming it); the model is loaded from arrays only and
    verified against that fingerprint. Otherwise the models are fitted on at most
    max(fit_max_cells, MIN_CELLS) cells and written, with the record, into `stage` under a new
    model-<fingerprint>.npz name; older model files and a legacy pickle (model.joblib, never
    loaded) are removed when the stage commits. Commit ClusterModels.commit_order before the
    labels: the record is the switch to the new model. Raises TooFewCells (fit) when the file
    holds fewer than MIN_CELLS cells. logger: any object with info/warning (a Dagster log).
    contact: each crop's neighbour contact by crop_id (crop_contact), for config.neighbor_weight > 0.
    """
    if files.legacy_pickle.is_file():
        logger.warning(
            f"{files.legacy_pickle}: a pickled model of an earlier version; it is never loaded (unpickling "
            "runs code) and is removed when this step's outputs are swapped in"
        )
        stage.remove_on_commit(files.legacy_pickle)
    record = json.loads(files.record.read_text()) if files.record.is_file() else {}
    model_path = files.named(record.get("model_file", "-"))
    if (
        not refit
        and model_path.is_file()
        and Path(labels_path).is_file()
        and record.get("encoder_run_id") == encoder_run_id
        and record.get("vector") == vector
        and labels_model_fingerprint(labels_path) == record.get("fingerprint")
    ):
        fitted = load_clustering(model_path, expected_fingerprint=record["fingerprint"])  # arrays only, verified
        if fitted.config == config:
            # only what label_cells copies (no provenance strings, whose Python objects cost ~0.5 KB a cell)
            known = pd.read_parquet(labels_path, columns=["crop_id", *LABEL_COLUMNS]).set_index("crop_id")
            return ClusterModels(
                fitted,
                known,
                record,
                "assign new cells (no refit)",
                shrunk=shrunk_parameters(fitted.config, fitted.n_train),
            )
        changed = {k: (v, getattr(config, k)) for k, v in asdict(fitted.config).items() if v != getattr(config, k)}
        logger.info(f"clustering settings changed since the stored models were fitted (old, new): {changed}; refitting")
    logger.info(f"fitting UMAP, HDBSCAN and GMMs on up to {fit_max_cells} cells of {embeddings_path}")
    fitted, known = fit_on_sample(embeddings_path, config, max(fit_max_cells, MIN_CELLS), vector, contact)
    fingerprint = fitted.fingerprint()
    model_path = files.model(fingerprint)
    save_clustering(fitted, stage.path(model_path))
    record = {
        "encoder_run_id": encoder_run_id,
        "vector": vector,
        "preprocess": fitted.config.preprocess,
        "neighbor_weight": fitted.config.neighbor_weight,
        "n_train": fitted.n_train,
        "model_file": model_path.name,
        "format": "npz arrays (clustering.save_clustering)",
        "auto_k": int(fitted.auto_k.k),
        "auto_k_rule": fitted.auto_k.rule,
        "min_cluster_size": fitted.min_cluster_size,
        "params": fitted.params,
        "fingerprint": fingerprint,
        "timings_s": fitted.timings,
    }
    stage.path(files.record).write_text(json.dumps(record, indent=2))
    for old in files.models():
        if old != model_path:
            stage.remove_on_commit(old)
    known = known[["crop_id", *LABEL_COLUMNS]].set_index("crop_id")
    return ClusterModels(
        fitted, known, record, "fit", [model_path, files.record], shrunk_parameters(fitted.config, fitted.n_train)
    )


def write_labels(
    embeddings_path: str | Path,
    models: ClusterModels,
    path: str | Path,
    vector: str = "embedding",
    contact: pd.Series | None = None,
) -> tuple[int, int]:
    """Label every cell of the embeddings file into one labels Parquet file (labels_schema); return (cells, newly assigned).

    The file records the models' fingerprint and appears atomically when complete. contact: each
    crop's neighbour contact by crop_id, for models fitted with it.
    """
    n_total = n_new = 0
    schema = labels_schema(models.fitted.gmm.n_components, models.record["fingerprint"])
    with AtomicParquetWriter(path, schema) as writer:
        for labels, new in label_cells(embeddings_path, models.fitted, models.known, vector, contact=contact):
            writer.write(labels_table(labels, schema))
            n_total, n_new = n_total + len(labels), n_new + new
    return n_total, n_new


def stage_not_clustered(
    files: ClusterModelFiles, n_cells: int, encoder_run_id: str, stage: Staging, stale_outputs=()
) -> str:
    """Stage files.skipped saying why a variant with fewer than MIN_CELLS cells has no clusters; return the reason.

    The variant's model files, record, legacy pickle and `stale_outputs` (its labels and pages
    of an earlier run, which would otherwise be reported as current) are removed on commit.
    """
    reason = str(TooFewCells(n_cells))
    stage.path(files.skipped).write_text(
        json.dumps(
            {"reason": reason, "n_cells": n_cells, "min_cells": MIN_CELLS, "encoder_run_id": encoder_run_id}, indent=2
        )
    )
    for stale in (*stale_outputs, files.record, files.legacy_pickle, *files.models()):
        stage.remove_on_commit(stale)
    return reason


def skipped_reason(files: ClusterModelFiles) -> str | None:
    """Why the variant was not clustered (stage_not_clustered's note), or None when it was."""
    return json.loads(files.skipped.read_text())["reason"] if files.skipped.is_file() else None


def clustered_on(record: dict) -> str:
    """One sentence for a variant's report section: what its cells were clustered on (the stored
    models' record: vector, preprocess, neighbor_weight; records written before these keys say
    only the vector)."""
    parts = [f"Clustered on {record.get('vector', 'embedding')}"]
    if record.get("preprocess") not in (None, "none"):
        parts.append(f"{record['preprocess']} before UMAP")
    if record.get("neighbor_weight"):
        parts.append(
            f"with each cell's neighbour contact (1 - Neighbors_FirstClosestDistance_5 / cell diameter) "
            f"at weight {record['neighbor_weight']:g}: cells touching a neighbour lean towards one cell type"
        )
    return ", ".join(parts) + "."
