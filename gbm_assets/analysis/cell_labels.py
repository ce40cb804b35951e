"""Cluster labels for every cell of a variant: fit once on a sample, then label the rest by prediction.

Fitting UMAP/HDBSCAN/GMM costs O(n log n) time and memory, so the models are fitted on a
seeded sample of at most fit_max_cells cells; every other cell, and every cell of a plate that
arrives later, is labelled with the fitted models (clustering.assign_new), batch by batch.
Cells already labelled keep their labels, so a re-run on new plates only labels new cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gbm_assets.analysis.clustering import ClusteringConfig, FittedClustering, assign_new, fit_clusters
from gbm_assets.models.embedding_table import iter_embeddings, sample_embeddings
from gbm_assets.schema import PROVENANCE_COLUMNS, PROVENANCE_SCHEMA

LABEL_COLUMNS = ("umap_x", "umap_y", "hdbscan", "hdbscan_noise", "gmm", "gmm_prob", "gmm_probs", "auto")


def fit_on_sample(
    embeddings_path: str | Path, config: ClusteringConfig, fit_max_cells: int, vector: str = "embedding"
) -> tuple[FittedClustering, pd.DataFrame]:
    """Fit the clusterings on a seeded sample; return the models and the sample's labels."""
    rows, vectors = sample_embeddings(embeddings_path, fit_max_cells, seed=config.seed, vectors=[vector])
    return fit_clusters(rows.assign(embedding=list(vectors[vector])), config)


def label_cells(
    embeddings_path: str | Path,
    fitted: FittedClustering,
    known: pd.DataFrame | None = None,
    vector: str = "embedding",
    batch_size: int = 8192,
) -> Iterator[tuple[pd.DataFrame, int]]:
    """(labels with provenance, number newly assigned) per batch, in the embeddings' row order.

    known: labels already decided (the fit sample, or an earlier run), indexed by crop_id.
    """
    known = known if known is not None and len(known) else None
    for rows, x in iter_embeddings(embeddings_path, batch_size=batch_size, vector=vector):
        have = rows["crop_id"].isin(known.index).to_numpy() if known is not None else np.zeros(len(rows), bool)
        parts = []
        if have.any():
            old = known.loc[rows.loc[have, "crop_id"], list(LABEL_COLUMNS)].reset_index(drop=True)
            parts.append((np.flatnonzero(have), pd.concat([rows[have].reset_index(drop=True), old], axis=1)))
        if (~have).any():
            new = assign_new(fitted, rows[~have].reset_index(drop=True).assign(embedding=list(x[~have])))
            parts.append((np.flatnonzero(~have), new))
        order = np.concatenate([idx for idx, _ in parts])
        merged = pd.concat([frame for _, frame in parts], ignore_index=True).iloc[np.argsort(order)]
        yield merged[[*PROVENANCE_COLUMNS, *LABEL_COLUMNS]].reset_index(drop=True), int((~have).sum())


def labels_schema(n_components: int, model_fingerprint: str | None = None) -> pa.Schema:
    """Provenance, then the labels (gmm_probs: one probability per mixture component).

    model_fingerprint (FittedClustering.fingerprint of the models that labelled the cells) is
    kept in the file's schema metadata, so a reader can tell which models the labels came from.
    """
    schema = pa.schema(list(PROVENANCE_SCHEMA) + [
        ("umap_x", pa.float32()), ("umap_y", pa.float32()), ("hdbscan", pa.int32()), ("hdbscan_noise", pa.bool_()),
        ("gmm", pa.int32()), ("gmm_prob", pa.float32()), ("gmm_probs", pa.list_(pa.float32(), n_components)),
        ("auto", pa.int32()),
    ])
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
