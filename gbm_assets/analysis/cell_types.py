"""Cell types a biologist can read: what each cluster's cells measure and look like, and which are artefacts.

For each cluster: the median CellProfiler-style shape measurements of its cells (area, in µm²
when the pixel size is known, else in pixels²; elongation; solidity; form factor;
eccentricity), the cells nearest its centre and a seeded random set (for the gallery figure),
and a flag for clusters that look like debris or artefacts rather than a cell type. The
per-cell table (write_cell_table) carries every cell's provenance, measurements, labels and
coordinates to downstream tools (pycytominer, CellProfiler Analyst, spreadsheets).

Measurements and the per-cell `qc` label (cell / debris / fragment / edge, where the crops
have one) are read from the crops dataset without its pixel columns; nothing here holds more
than one plate's measurements or one batch of cells at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gbm_assets.analysis.safe_csv import to_csv_safe
from gbm_assets.imaging.cellprofiler import AREASHAPE_COLUMNS
from gbm_assets.paths import plate_file
from gbm_assets.schema import MEASUREMENT_COLUMNS, NEIGHBOR_COLUMNS, PROVENANCE_COLUMNS
from gbm_assets.storage import AtomicParquetWriter, atomic_path, plate_dataset

NOISE = -1
QC_COLUMN = "qc"
QC_GOOD = "cell"  # the other qc labels (debris, fragment, edge) mark cells that are not whole cells
# Artefact rules (a flag to look at the gallery, not a verdict):
# cluster median area below this fraction of all clustered cells' median: debris. Small round cell
# types (the synthetic plates' round morphotype is ~20% of the median) stay unflagged.
SMALL_AREA_FRACTION = 0.1
LOW_SOLIDITY = 0.5  # cluster median solidity below this: ragged outlines (fragments, clumps)
QC_ARTEFACT_SHARE = 0.5  # at least this share of the cluster's cells has a qc label other than "cell"
# The shape summary per cluster: name in the profile table -> how it is computed.
SHAPE_SUMMARY = ("area", "elongation", "solidity", "form_factor", "eccentricity")
CP_NAMES = {v: k for k, v in AREASHAPE_COLUMNS.items()}  # "area" -> "AreaShape_Area"


def _available(crops_dir: str | Path) -> list[str]:
    dataset = plate_dataset(crops_dir)
    names = set(dataset.schema.names)
    for fragment in dataset.get_fragments():  # files of other versions may add qc
        names |= set(fragment.physical_schema.names)
    return [c for c in (*MEASUREMENT_COLUMNS, QC_COLUMN) if c in names]


def read_measurements(crops_dir: str | Path, crop_ids) -> pd.DataFrame:
    """Shape measurements (and qc, where present) of the given crops, in crop_ids order.

    Reads only crop_id, MEASUREMENT_COLUMNS and qc of the crops dataset (never the pixels),
    file by file with a crop_id filter. Returns a DataFrame indexed like crop_ids (positions),
    with column crop_id, the measurement columns the dataset has (float64, NaN for a cell not
    found) and qc (str, None where a plate has no qc labels) when any file has it.
    """
    wanted = pd.Index(pd.Series(crop_ids, dtype=str))
    columns = _available(crops_dir)
    out = pd.DataFrame({"crop_id": wanted.to_numpy()})
    for c in columns:
        out[c] = np.nan if c != QC_COLUMN else None
    if QC_COLUMN in out:
        out[QC_COLUMN] = out[QC_COLUMN].astype(object)
    for fragment in plate_dataset(crops_dir).get_fragments():
        have = [c for c in columns if c in fragment.physical_schema.names]
        table = fragment.to_table(columns=["crop_id", *have], filter=pc.field("crop_id").isin(wanted.tolist()))
        if not table.num_rows:
            continue
        where = wanted.get_indexer(table.column("crop_id").to_pylist())
        for c in have:
            values = table.column(c).to_numpy(zero_copy_only=False)
            out.iloc[where, out.columns.get_loc(c)] = values
    return out


def shape_measurements(cells: pd.DataFrame, pixel_size_um=None) -> pd.DataFrame:
    """Per cell: area (µm² if pixel_size_um is given, else pixels²), elongation, solidity, form factor, eccentricity.

    pixel_size_um: None, one size in µm per pixel, or one per cell (array of len(cells), e.g.
    cell_pixel_sizes' for plates of different set-ups). elongation = major_axis_length /
    minor_axis_length (1 for a circle; NaN where the minor axis is 0). Columns the cells lack come
    back NaN. Raises ValueError for a pixel size that is not > 0 and finite, or a per-cell array of
    another length.
    """
    if pixel_size_um is not None:
        sizes = np.asarray(pixel_size_um, float)
        if not (np.all(sizes > 0) and np.all(np.isfinite(sizes))):
            raise ValueError(f"pixel size must be > 0 µm and finite, got {pixel_size_um}")
        if sizes.ndim and len(sizes) != len(cells):
            raise ValueError(f"{len(sizes)} pixel sizes for {len(cells)} cells")

    def col(name):
        return pd.to_numeric(cells[name], errors="coerce") if name in cells else pd.Series(np.nan, index=cells.index)

    minor = col("minor_axis_length")
    return pd.DataFrame(
        {
            "area": col("area") * (sizes**2 if pixel_size_um is not None else 1.0),
            "elongation": col("major_axis_length") / minor.where(minor > 0),
            "solidity": col("solidity"),
            "form_factor": col("form_factor"),
            "eccentricity": col("eccentricity"),
        },
        index=cells.index,
    )


def area_unit(pixel_size_um) -> str:
    """ "µm²" when a pixel size (one, or one per cell) is given, else "px²"."""
    return "µm²" if pixel_size_um is not None else "px²"


def cell_pixel_sizes(plates, pixel_size_um):
    """The pixel size (µm) to measure each cell in, or None to measure all in pixels.

    pixel_size_um: None, one size (float, returned as it is), or {plate: µm per pixel} (NaN or
    missing where unknown). With a mapping: an array of each cell's plate's size (len(plates),
    float64) when every plate's is known, else None: areas of some plates in µm² and others in
    px² cannot share a table.
    """
    if not isinstance(pixel_size_um, Mapping):
        return pixel_size_um
    sizes = pd.Series(plates, dtype=str).map(lambda p: pixel_size_um.get(p, np.nan)).to_numpy(float)
    return sizes if len(sizes) and np.isfinite(sizes).all() else None


def cluster_profiles(cells: pd.DataFrame, label_column: str = "hdbscan", pixel_size_um=None) -> pd.DataFrame:
    """One row per cluster (noise left out): size, median shape, qc shares, artefact flag.

    cells: one row per cell with label_column and the measurement columns (read_measurements),
    optionally qc. Columns: cluster, n_cells, share (of clustered cells), median_<m> for m in
    SHAPE_SUMMARY (area in area_unit(pixel_size_um); pixel_size_um as in shape_measurements), qc_not_cell (share of cells whose qc label
    is not "cell"; NaN without qc labels), artefact (bool) and artefact_reason (str, "" if none).
    The rules (SMALL_AREA_FRACTION, LOW_SOLIDITY, QC_ARTEFACT_SHARE) are flags for a person to
    check in the gallery.

    Raises
    ------
    KeyError
        If label_column is missing.
    ValueError
        If pixel_size_um is given and not > 0 and finite (shape_measurements).
    """
    labels = cells[label_column].to_numpy()
    clustered = labels != NOISE
    shape = shape_measurements(cells, pixel_size_um)[clustered]
    labels = labels[clustered]
    overall_area = float(np.nanmedian(shape["area"])) if shape["area"].notna().any() else np.nan
    qc = cells[QC_COLUMN][clustered] if QC_COLUMN in cells else None
    rows = []
    for cluster in sorted(pd.unique(labels)):
        members = labels == cluster
        s = shape[members]
        row = {"cluster": cluster, "n_cells": int(members.sum()), "share": float(members.mean())}
        row.update({f"median_{m}": float(s[m].median()) if s[m].notna().any() else np.nan for m in SHAPE_SUMMARY})
        known = qc[members].dropna() if qc is not None else pd.Series([], dtype=object)
        row["qc_not_cell"] = float((known.astype(str) != QC_GOOD).mean()) if len(known) else np.nan
        reasons = []
        if row["median_area"] < SMALL_AREA_FRACTION * overall_area:
            reasons.append(f"small: median area {row['median_area'] / overall_area:.0%} of all cells' (debris?)")
        if row["median_solidity"] < LOW_SOLIDITY:
            reasons.append(f"ragged outline: median solidity {row['median_solidity']:.2f} (fragments or clumps?)")
        if row["qc_not_cell"] >= QC_ARTEFACT_SHARE:
            kinds = known[known.astype(str) != QC_GOOD].astype(str).value_counts()
            top = ", ".join(f"{k} {v / len(known):.0%}" for k, v in kinds.items())
            reasons.append(f"qc labels: {top}")
        row["artefact"] = bool(reasons)
        row["artefact_reason"] = "; ".join(reasons)
        rows.append(row)
    columns = [
        "cluster",
        "n_cells",
        "share",
        *[f"median_{m}" for m in SHAPE_SUMMARY],
        "qc_not_cell",
        "artefact",
        "artefact_reason",
    ]
    return pd.DataFrame(rows, columns=columns)


def nearest_to_centre(xy: np.ndarray, labels, per_cluster: int = 10) -> dict:
    """{cluster: row positions of the per_cluster cells nearest the cluster's centre}, noise left out.

    xy: (n, d) float coordinates the clusters were found in (UMAP); labels: (n,) int cluster
    labels (-1 = noise). The centre is the coordinate-wise median of the cluster's cells (robust
    to a cluster's stragglers). Returns int64 row positions, nearest first.

    Raises
    ------
    ValueError
        If xy is not (n, d) with n = len(labels).
    """
    xy, labels = np.asarray(xy, float), np.asarray(labels)
    if xy.ndim != 2 or len(xy) != len(labels):
        raise ValueError(f"xy must be (n, d) with n = len(labels), got {xy.shape}")
    out = {}
    for cluster in sorted(pd.unique(labels)):
        if cluster == NOISE:
            continue
        members = np.flatnonzero(labels == cluster)
        dist = np.linalg.norm(xy[members] - np.median(xy[members], axis=0), axis=1)
        out[cluster] = members[np.argsort(dist, kind="stable")[:per_cluster]]
    return out


def random_members(labels, per_cluster: int = 10, seed: int = 0) -> dict:
    """{cluster: row positions of per_cluster seeded random cells (all if fewer)}, noise left out."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = {}
    for cluster in sorted(pd.unique(labels)):
        if cluster == NOISE:
            continue
        members = np.flatnonzero(labels == cluster)
        out[cluster] = rng.choice(members, size=min(per_cluster, len(members)), replace=False)
    return out


# --- the per-cell table -----------------------------------------------------------------------

PIXEL_SIZE_METADATA = "Metadata_pixel_size_um"  # µm per pixel of the cell's plate, NaN when unknown
CELL_LABEL_COLUMNS = ("hdbscan", "hdbscan_noise", "gmm", "gmm_prob", "auto", "umap_x", "umap_y")


def _plate_measurements(crops_dir: Path, plate: str) -> pd.DataFrame:
    path = plate_file(crops_dir, plate)
    if not path.is_file():
        return pd.DataFrame(columns=["crop_id"]).set_index("crop_id")
    names = pq.read_schema(path).names
    have = [c for c in (*MEASUREMENT_COLUMNS, *NEIGHBOR_COLUMNS, QC_COLUMN) if c in names]
    return pq.read_table(path, columns=["crop_id", *have]).to_pandas().set_index("crop_id")


class _Rows:
    """The rows of one Parquet file in order, handed out n at a time whatever its row groups are."""

    def __init__(self, path, columns, batch_size: int):
        self._batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=list(columns))
        self._pending: list[pa.RecordBatch] = []
        self._have = 0

    def take(self, n: int) -> pa.Table | None:
        """The next n rows (fewer at the end of the file; None when none are left)."""
        while self._have < n:
            batch = next(self._batches, None)
            if batch is None:
                break
            self._pending.append(batch)
            self._have += batch.num_rows
        if not self._have:
            return None
        table = pa.Table.from_batches(self._pending)
        head, rest = table.slice(0, n), table.slice(n)
        self._pending, self._have = rest.to_batches(), rest.num_rows
        return head


def _aligned(labels_path, embeddings_path, batch_size: int) -> bool:
    """Whether the embeddings file lists exactly the labels file's cells in the same order."""
    if pq.ParquetFile(labels_path).metadata.num_rows != pq.ParquetFile(embeddings_path).metadata.num_rows:
        return False
    embedded = _Rows(embeddings_path, ["crop_id"], batch_size)
    with pq.ParquetFile(labels_path) as labels:
        for batch in labels.iter_batches(batch_size=batch_size, columns=["crop_id"]):
            other = embedded.take(batch.num_rows)
            if other is None or not other.column("crop_id").combine_chunks().equals(batch.column("crop_id")):
                return False
    return True


def _batch_measurements(rows: pd.DataFrame, crops_dir: Path, cache: OrderedDict) -> pd.DataFrame:
    """Measurements and qc of one batch of cells, aligned with rows; keeps the last 4 plates read."""
    parts = []
    for plate, idx in rows.groupby("plate", sort=False).groups.items():
        if plate not in cache:
            cache[plate] = _plate_measurements(crops_dir, str(plate))
            if len(cache) > 4:
                cache.popitem(last=False)
        parts.append(cache[plate].reindex(rows.loc[idx, "crop_id"].to_numpy()).set_axis(idx))
    measured = pd.concat(parts) if parts else pd.DataFrame(index=rows.index)
    return measured.reindex(index=rows.index, columns=[*MEASUREMENT_COLUMNS, *NEIGHBOR_COLUMNS, QC_COLUMN])


def _cell_rows(rows: pd.DataFrame, measured: pd.DataFrame, pixel_sizes: Mapping | None = None) -> pd.DataFrame:
    table = pd.DataFrame({f"Metadata_{c}": rows[c] for c in PROVENANCE_COLUMNS if c in rows})
    qc = measured[QC_COLUMN].astype(object)
    table["Metadata_qc"] = qc.where(qc.notna(), None)
    table[PIXEL_SIZE_METADATA] = rows["plate"].astype(str).map(pixel_sizes or {}).astype(float)
    for c in CELL_LABEL_COLUMNS:
        if c in rows:
            table[f"Metadata_{c}"] = rows[c]
    for m in MEASUREMENT_COLUMNS:
        table[f"Cells_{CP_NAMES[m]}"] = pd.to_numeric(measured[m], errors="coerce").astype(float)
    for m in NEIGHBOR_COLUMNS:  # NaN for crops made before they were measured
        table[f"Cells_{m}"] = pd.to_numeric(measured[m], errors="coerce").astype(float)
    return table


def cell_table_columns(n_embedding: int = 0) -> list[str]:
    """Columns of write_cell_table's files, in order (pycytominer naming)."""
    return (
        [f"Metadata_{c}" for c in PROVENANCE_COLUMNS]
        + ["Metadata_qc", PIXEL_SIZE_METADATA]
        + [f"Metadata_{c}" for c in CELL_LABEL_COLUMNS]
        + [f"Cells_{CP_NAMES[m]}" for m in MEASUREMENT_COLUMNS]
        + [f"Cells_{m}" for m in NEIGHBOR_COLUMNS]
        + [f"Cells_Embedding_{i:03d}" for i in range(n_embedding)]
    )


def write_cell_table(
    labels_path: str | Path,
    crops_dir: str | Path,
    out_stem: str | Path,
    embeddings_path: str | Path | None = None,
    batch_size: int = 4096,
    pixel_sizes: Mapping[str, float] | None = None,
) -> dict:
    """Every cell of a labels file, with its measurements (and embedding), as <out_stem>.parquet and .csv.

    Columns follow pycytominer's convention (cell_table_columns): Metadata_<provenance>,
    Metadata_qc (None where the crops have no qc label), Metadata_pixel_size_um (µm per pixel of
    the cell's plate from pixel_sizes {plate: µm}, NaN where unknown: multiply areas by its square),
    Metadata_<label> for the cluster labels and UMAP coordinates, Cells_AreaShape_<Measurement>
    (CellProfiler names, pixel units, as CellProfiler writes them),
    Cells_Neighbors_<Feature>_<distance> (CellProfiler's MeasureObjectNeighbors; NaN for crops
    made before they were measured) and,
    when embeddings_path lists the same cells in the same order, Cells_Embedding_<i> (float32);
    otherwise the embedding columns are left out and "embedding" in the result says why.
    Streamed: one batch of batch_size labels (with their measurements and embeddings as a pandas
    frame and its CSV text, ~2 KB a cell) and the measurements of the last 4 plates read (never
    pixels) at a time, so memory does not grow with the number of cells; both files are
    written atomically and the CSV through safe_csv (formula-safe, floats to 7 significant
    digits).
    Returns {"parquet", "csv", "n_cells", "embedding"}. Raises FileNotFoundError for a missing
    labels file.
    """
    labels_path, crops_dir, out_stem = Path(labels_path), Path(crops_dir), Path(out_stem)
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path}: no cluster labels to tabulate")
    embedding_note = "no embeddings file given"
    use_embedding = False
    if embeddings_path is not None:
        if not Path(embeddings_path).is_file():
            embedding_note = f"{embeddings_path}: not found"
        elif _aligned(labels_path, embeddings_path, batch_size):
            use_embedding, embedding_note = True, "included"
        else:
            embedding_note = (
                f"{embeddings_path} no longer lists the labelled cells in the same order "
                "(embeddings re-made since clustering): embedding columns left out"
            )
    names = pq.read_schema(labels_path).names
    label_columns = [c for c in (*PROVENANCE_COLUMNS, *CELL_LABEL_COLUMNS) if c in names]
    cache: OrderedDict[str, pd.DataFrame] = OrderedDict()
    embeddings = _Rows(embeddings_path, ["embedding"], batch_size) if use_embedding else None
    parquet_path, csv_path = out_stem.with_suffix(".parquet"), out_stem.with_suffix(".csv")
    n_cells, writer, schema = 0, None, None
    with ExitStack() as stack:
        csv_file = stack.enter_context(
            open(stack.enter_context(atomic_path(csv_path)), "w", encoding="utf-8", newline="")
        )
        pf = stack.enter_context(pq.ParquetFile(labels_path))
        for batch in pf.iter_batches(batch_size=batch_size, columns=label_columns):
            rows = batch.to_pandas()
            table = _cell_rows(rows, _batch_measurements(rows, crops_dir, cache), pixel_sizes)
            if embeddings is not None:
                col = embeddings.take(len(table)).column("embedding").combine_chunks()
                vectors = col.flatten().to_numpy(zero_copy_only=False).reshape(len(table), col.type.list_size)
                table = pd.concat(
                    [
                        table,
                        pd.DataFrame(
                            vectors,
                            index=table.index,
                            columns=[f"Cells_Embedding_{i:03d}" for i in range(vectors.shape[1])],
                        ),
                    ],
                    axis=1,
                )
            arrow = pa.Table.from_pandas(table, preserve_index=False)
            if writer is None:
                schema = arrow.schema.set(
                    arrow.schema.get_field_index("Metadata_qc"), pa.field("Metadata_qc", pa.string())
                )
                writer = stack.enter_context(AtomicParquetWriter(parquet_path, schema))
            writer.write(arrow.cast(schema))
            to_csv_safe(table, csv_file, index=False, header=n_cells == 0, float_format="%.7g")
            n_cells += len(table)
        if writer is None:  # no cells: still a valid, empty pair of files
            empty = pd.DataFrame(columns=cell_table_columns())
            schema = pa.schema(
                [
                    pa.field(c, pa.string() if c.startswith("Metadata_") and c != PIXEL_SIZE_METADATA else pa.float64())
                    for c in empty.columns
                ]
            )
            stack.enter_context(AtomicParquetWriter(parquet_path, schema))
            to_csv_safe(empty, csv_file, index=False)
    return {"parquet": parquet_path, "csv": csv_path, "n_cells": n_cells, "embedding": embedding_note}
