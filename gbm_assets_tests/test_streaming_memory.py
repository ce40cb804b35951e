"""Peak memory of the stages that read every crop does not grow with the number of crops.

Each test runs a stage's core function on a crops dataset many record batches large and
measures what it held at its peak, without timing or RSS noise: Arrow's allocations through a
proxy memory pool installed as pyarrow's default (its max_memory counts every buffer the
Parquet reader and compute kernels allocate) and NumPy's through tracemalloc. The crops dataset
is written as the cell_crops asset writes it, one row group per image (ROW_GROUP rows here), and
holds ~100 record batches of pixels. Streaming code holds a compressed and a decoded copy of about
one batch; code that holds every crop (all crops before thumbnailing them, every cell of the cell
table in one frame) or reads ahead (a dataset Scanner: up to 4 files x 16 batches, 2.4 MB here)
breaks the bounds. The gallery and evaluation-baseline tests guard the stages' paths at
read_crops' default batch of 256 rows, where the old Scanner's read-ahead also stays below them.
"""

from __future__ import annotations

import os
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gbm_assets.imaging.crop_dataset import read_crops
from gbm_assets.imaging.synthetic_crops import write_synthetic_crops

SIZE = 64  # crop side: 4 KiB of pixels per crop
ROW_GROUP = 32  # rows per row group (cell_crops writes one per image)
PLATES, PER_PLATE = ("P1", "P2", "P3", "P4"), 800  # 3,200 crops: 12.5 MiB of pixels, 12.5 of masks
BATCH = 32  # record batch for the tests that choose one: 128 KiB of pixels, 1/100 of the dataset


def crop_bytes(n: int) -> int:
    return n * SIZE * SIZE


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory) -> Path:
    root = write_synthetic_crops(
        tmp_path_factory.mktemp("big") / "cell_crops.parquet",
        PLATES,
        PER_PLATE,
        size=SIZE,
        images=PER_PLATE // ROW_GROUP,
        seed=3,
        mixed=True,
    )
    for path in root.glob("plate=*/part-0.parquet"):
        table = pq.read_table(path)
        table = table.take(np.argsort(table.column("image").to_numpy(zero_copy_only=False), kind="stable"))
        pq.write_table(table, path, row_group_size=ROW_GROUP, compression="zstd")  # one row group per image
    return root


@pytest.fixture(scope="module")
def crop_ids(crops_dir) -> pd.Series:
    files = sorted(crops_dir.glob("plate=*/part-0.parquet"))
    return pd.concat([pq.read_table(f, columns=["crop_id"]).to_pandas() for f in files], ignore_index=True)["crop_id"]


@contextmanager
def peak_memory():
    """{"arrow": peak bytes Arrow allocated, "numpy": peak bytes traced by tracemalloc} inside the block."""
    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)
    pa.set_memory_pool(pool)
    tracemalloc.start()
    peaks: dict[str, int] = {}
    try:
        yield peaks
    finally:
        peaks["numpy"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        pa.set_memory_pool(previous)
        peaks["arrow"] = pool.max_memory()


def test_iter_crops_by_id_yields_the_crops_asked_for_across_plates_and_row_groups(crops_dir, crop_ids):
    from gbm_assets.imaging.crop_dataset import iter_crops_by_id

    rng = np.random.default_rng(0)
    ids = crop_ids.iloc[rng.choice(len(crop_ids), 57, replace=False)].reset_index(drop=True)
    expected = {}
    for path in crops_dir.glob("plate=*/part-0.parquet"):
        table = pq.read_table(path, columns=["crop_id", "pixels", "mask"]).to_pydict()
        for i, crop_id in enumerate(table["crop_id"]):
            expected[crop_id] = (table["pixels"][i], table["mask"][i])
    seen = np.zeros(len(ids), int)
    for where, crops in iter_crops_by_id(crops_dir, ids, batch_size=5):
        assert crops.dtype == np.uint8 and crops.shape == (len(where), SIZE, SIZE) and len(where) <= 5
        for position, crop in zip(where, crops, strict=True):
            assert crop.tobytes() == expected[ids[position]][0]
        seen[where] += 1
    assert (seen == 1).all()
    masks = read_crops(crops_dir, ids, column="mask", batch_size=7)
    assert all(masks[i].tobytes() == expected[c][1] for i, c in enumerate(ids))
    with pytest.raises(ValueError, match="twice"):
        read_crops(crops_dir, [ids[0], ids[1], ids[0]])
    with pytest.raises(KeyError, match="nope"):
        read_crops(crops_dir, [ids[0], "nope"])


def test_read_crops_holds_about_one_batch_of_pixels(crops_dir, crop_ids):
    """The lookup under the gallery, the explorer and the evaluation baselines: a few crops of many."""
    ids = crop_ids.sample(20, random_state=1)
    with peak_memory() as peak:
        crops = read_crops(crops_dir, ids, batch_size=BATCH)
    assert crops.shape == (20, SIZE, SIZE)
    # a compressed page, its decoded batch and the rows taken from it; the Scanner read ~100 batches
    assert peak["arrow"] <= 4 * crop_bytes(BATCH), peak
    assert peak["numpy"] <= crops.nbytes + 2 * crop_bytes(BATCH), peak


def test_embed_stage_evaluation_baselines_read_only_their_sample(crops_dir, crop_ids):
    """embeddings asset: the raw-pixel and hand-crafted baselines of its evaluation sample (here 20 cells)
    read those crops and masks without holding the dataset's (read_crops' default batch: 256 rows)."""
    from gbm_assets.analysis.variant_evaluation import baseline_features_for

    ids = crop_ids.sample(20, random_state=2)
    with peak_memory() as peak:
        features = baseline_features_for(crops_dir, ids)
    assert features["raw_pixels"].shape[0] == 20 and features["handcrafted"].shape[0] == 20
    assert peak["arrow"] <= 4 * crop_bytes(256) < crop_bytes(len(crop_ids)) // 3, peak


def test_embed_stage_write_embeddings_streams(crops_dir, tmp_path):
    """write_embeddings holds a few batches, not every crop (pixels as float32 are 4 bytes each)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    from gbm_assets.models.embedding_table import iter_embeddings
    from gbm_assets.models.training import write_embeddings

    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Flatten()(keras.layers.AveragePooling2D(16)(inputs))
    encoder = keras.Model(inputs, keras.layers.Dense(4)(x))
    encoder.predict_on_batch(np.zeros((BATCH, SIZE, SIZE, 1), np.float32))  # compile outside the measurement
    with peak_memory() as peak:
        done, _ = write_embeddings(encoder, crops_dir, tmp_path / "embeddings.parquet", batch_size=BATCH)
    assert done == len(PLATES) * PER_PLATE == sum(len(r) for r, _ in iter_embeddings(tmp_path / "embeddings.parquet"))
    assert peak["arrow"] <= 4 * crop_bytes(BATCH), peak
    # float32 pixels (4 bytes each) and their 8 dihedral views pass through NumPy one batch at a time
    assert peak["numpy"] <= 4 * 4 * crop_bytes(BATCH) < crop_bytes(done), peak


def test_cluster_stage_explorer_thumbnails_stream(crops_dir, crop_ids):
    """clusters asset: the explorer's thumbnails of every shown cell, one batch of full-size crops at a time,
    the same thumbnails as shrinking all the crops read at once."""
    from gbm_assets.analysis.explorer import crop_thumbnails, make_thumbnails

    ids = crop_ids.sample(frac=1.0, random_state=4)  # every crop, in an order unlike the files'
    with peak_memory() as peak:
        thumbs = crop_thumbnails(crops_dir, ids, size=16, batch_size=BATCH)
    assert thumbs.shape == (len(ids), 16, 16) and thumbs.dtype == np.uint8
    # besides ~one batch: the wanted crop ids as an Arrow set (strings and hash table, ~64 bytes each)
    assert peak["arrow"] <= 4 * crop_bytes(BATCH) + 64 * len(ids), peak
    # and the ids as Python strings in a pandas Index (~200 bytes each); all the crops would be 12.5 MiB
    assert peak["numpy"] <= thumbs.nbytes + 3 * crop_bytes(BATCH) + 200 * len(ids) < crop_bytes(len(ids)) // 4, peak
    some = ids.iloc[::97]
    assert np.array_equal(thumbs[::97], make_thumbnails(read_crops(crops_dir, some), 16))


def test_report_stage_gallery_reads_only_the_picked_crops(crops_dir, crop_ids):
    """composition_report: the cluster gallery's crops (a few per cluster) from a dataset of many."""
    from gbm_assets.analysis.variant_report import gallery_crops

    picks = {0: [5, 900, 3100], 1: [17, 2500], 2: [5]}  # a cell picked twice is read once
    with peak_memory() as peak:
        shown = gallery_crops(crops_dir, crop_ids, picks)
    assert {c: len(v) for c, v in shown.items()} == {0: 3, 1: 2, 2: 1}
    assert np.array_equal(shown[2][0], shown[0][0])
    assert peak["arrow"] <= 4 * crop_bytes(256) < crop_bytes(len(crop_ids)) // 3, peak


def _labelled_cells(root: Path, plates: int, n_per_plate: int, features: int = 16) -> tuple[Path, Path, Path]:
    """(crops dir, labels file, embeddings file) of small crops on many plates, labels and embeddings in one order."""
    from gbm_assets.analysis.cell_labels import labels_schema, labels_table
    from gbm_assets.models.embedding_table import embedding_batch
    from gbm_assets.schema import PROVENANCE_COLUMNS

    crops = write_synthetic_crops(
        root / "cell_crops.parquet", [f"P{i:02d}" for i in range(plates)], n_per_plate, size=16, seed=5, mixed=True
    )
    rows = pd.concat(
        [
            pq.read_table(f, columns=list(PROVENANCE_COLUMNS)).to_pandas()
            for f in sorted(crops.glob("plate=*/part-0.parquet"))
        ],
        ignore_index=True,
    )
    rng, n = np.random.default_rng(5), len(rows)
    labels = rows.assign(
        umap_x=rng.normal(size=n),
        umap_y=rng.normal(size=n),
        hdbscan=rng.integers(-1, 4, n),
        hdbscan_noise=rng.random(n) < 0.1,
        gmm=rng.integers(0, 3, n),
        gmm_prob=rng.random(n),
        gmm_probs=list(rng.dirichlet(np.ones(3), n)),
        auto=rng.integers(0, 3, n),
    )
    labels_path, embeddings_path = root / "labels.parquet", root / "embeddings.parquet"
    pq.write_table(labels_table(labels, labels_schema(3, "f" * 16)), labels_path, row_group_size=2048)
    vectors = rng.normal(size=(n, features)).astype(np.float32)
    pq.write_table(embedding_batch(rows, vectors, vectors), embeddings_path, row_group_size=2048)
    return crops, labels_path, embeddings_path


def test_report_stage_cell_table_streams_in_small_batches(tmp_path):
    """composition_report: the per-cell table of 24,576 cells on 16 plates holds one default batch of cells
    (4,096) and a few plates' measurements, not every cell (the old default batch, 65,536 cells, held up to
    that many rows as Arrow, a pandas frame and CSV text), and the files do not depend on the batch size."""
    from gbm_assets.analysis.cell_types import write_cell_table

    crops, labels_path, embeddings_path = _labelled_cells(tmp_path, 16, 1536)
    with peak_memory() as peak:
        table = write_cell_table(labels_path, crops, tmp_path / "streamed", embeddings_path=embeddings_path)
    assert table["n_cells"] == 24_576 and table["embedding"] == "included"
    whole = write_cell_table(
        labels_path, crops, tmp_path / "whole", embeddings_path=embeddings_path, batch_size=1 << 16
    )
    assert Path(table["csv"]).read_text() == Path(whole["csv"]).read_text()
    assert pq.read_table(table["parquet"]).equals(pq.read_table(whole["parquet"]))
    # measured: 11 MB in batches of 4,096 cells, 30 MB with every cell in one batch
    assert peak["numpy"] + peak["arrow"] <= 16 << 20, peak
