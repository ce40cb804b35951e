"""The embeddings Parquet table: provenance columns plus fixed-size float32 vectors, streamed.

One file per variant (embeddings.parquet/variant=<name>/part-0.parquet). Columns: every
PROVENANCE_COLUMNS entry, `embedding` (the encoder's output) and `embedding_invariant` (the mean
over the 8 rotations/flips of the crop).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gbm_assets.schema import PROVENANCE_COLUMNS, PROVENANCE_SCHEMA
from gbm_assets.storage import sample_batches

VECTOR_COLUMNS = ("embedding", "embedding_invariant")


def embedding_schema(features: int) -> pa.Schema:
    vector = pa.list_(pa.float32(), features)
    return pa.schema(list(PROVENANCE_SCHEMA) + [(name, vector) for name in VECTOR_COLUMNS])


def _vectors(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def vector_matrix(column: pa.FixedSizeListArray | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size list column of n vectors as an (n, width) float32 array."""
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def embedding_batch(rows: pd.DataFrame, embedding: np.ndarray, invariant: np.ndarray) -> pa.Table:
    """One batch of the table; rows[i] is the provenance of embedding[i] and invariant[i]."""
    if not (len(rows) == len(embedding) == len(invariant)):
        raise ValueError(f"{len(rows)} rows but {len(embedding)} / {len(invariant)} vectors")
    schema = embedding_schema(embedding.shape[1])
    arrays = [pa.array(rows[c].to_numpy(), type=schema.field(c).type) for c in PROVENANCE_COLUMNS]
    return pa.Table.from_arrays(arrays + [_vectors(embedding), _vectors(invariant)], schema=schema)


def iter_embeddings(
    path: str | Path, batch_size: int = 4096, columns: Sequence[str] = PROVENANCE_COLUMNS, vector: str = "embedding"
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """(provenance rows, (n, features) float32) per record batch of an embeddings file."""
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=batch_size, columns=[*columns, vector]):
            yield batch.drop_columns([vector]).to_pandas(), vector_matrix(batch.column(vector))


def sample_embeddings(
    path: str | Path, max_rows: int | None, seed: int = 0, vectors: Sequence[str] = VECTOR_COLUMNS
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """A seeded uniform sample of at most max_rows rows and their vectors, read in batches."""
    frames, mats = [], {v: [] for v in vectors}
    for batch in sample_batches(path, max_rows, seed, [*PROVENANCE_COLUMNS, *vectors]):
        frames.append(batch.select(list(PROVENANCE_COLUMNS)).to_pandas())
        for v in vectors:
            mats[v].append(vector_matrix(batch.column(v)))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(PROVENANCE_COLUMNS))
    return rows, {v: np.concatenate(m) if m else np.zeros((0, 0), np.float32) for v, m in mats.items()}
