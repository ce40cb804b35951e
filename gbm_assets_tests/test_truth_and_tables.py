"""Ground-truth matching and the embeddings table: provenance stays aligned with vectors."""

from __future__ import annotations

import unicodedata

import numpy as np
import pandas as pd
import pytest

from gbm_assets.analysis.truth import has_truth, true_morphotypes
from gbm_assets.errors import InputError
from gbm_assets.models.embedding_table import embedding_batch, embedding_schema, iter_embeddings, sample_embeddings
from gbm_assets.schema import PROVENANCE_COLUMNS
from gbm_assets.storage import AtomicParquetWriter


def _rows(n: int, plate="p1") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "crop_id": [f"{plate}:img{i % 3}.tif:{i}" for i in range(n)],
            "plate": plate,
            "image": [f"img{i % 3}.tif" for i in range(n)],
            "x": np.arange(n, dtype=np.int32),
            "y": np.arange(n, dtype=np.int32) * 2,
            "culture": ["A", "B"] * (n // 2) + ["A"] * (n % 2),
            "concentration": "1000",
            "replicate": np.int32(1),
            "timepoint_h": 0.0,
            "well": "na",
            "position": "na",
        }
    )


def test_embeddings_table_keeps_rows_and_vectors_aligned(tmp_path):
    path = tmp_path / "e.parquet"
    rows = _rows(50)
    vec = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    with AtomicParquetWriter(path, embedding_schema(4)) as w:
        for s in range(0, 50, 16):
            w.write(embedding_batch(rows.iloc[s : s + 16], vec[s : s + 16], -vec[s : s + 16]))
    got_rows, got = zip(*iter_embeddings(path, batch_size=7), strict=False)
    got_rows, got = pd.concat(got_rows, ignore_index=True), np.concatenate(got)
    pd.testing.assert_frame_equal(got_rows[list(PROVENANCE_COLUMNS)], rows, check_dtype=False)
    assert np.array_equal(got, vec)
    sample, vectors = sample_embeddings(path, max_rows=20, seed=3)
    assert len(sample) == 20 and sample["crop_id"].is_unique
    index = sample["x"].to_numpy()  # x was the row number
    assert np.array_equal(vectors["embedding"], vec[index])
    assert np.array_equal(vectors["embedding_invariant"], -vec[index])


def test_true_morphotypes_match_within_8_px(tmp_path):
    plate = tmp_path / "raw" / "p1"
    plate.mkdir(parents=True)
    pd.DataFrame(
        {
            "image": ["a.tif", "a.tif", "b.tif"],
            "x": [10.0, 100.0, 10.0],
            "y": [10.0, 100.0, 10.0],
            "morphotype": ["round", "fusiform", "clump"],
        }
    ).to_csv(plate / "ground_truth.csv", index=False)
    rows = pd.DataFrame(
        {
            "plate": ["p1", "p1", "p1", "p1", "p2"],
            "image": ["a.tif", "a.tif", "b.tif", "a.tif", "a.tif"],
            "x": [12, 95, 10, 50, 10],
            "y": [11, 101, 30, 50, 10],
        }
    )
    got = true_morphotypes(rows, tmp_path / "raw")
    assert got.tolist() == ["round", "fusiform", None, None, None]
    # The same truth as a European-locale spreadsheet saves it: BOM, semicolons, decimal commas, CRLF.
    (plate / "ground_truth.csv").write_bytes(
        "\ufeffImage;X;Y;Morphotype\r\na.tif;10,0;10;round\r\na.tif;100;100,0;fusiform\r\nb.tif;10;10;clump\r\n".encode()
    )
    assert true_morphotypes(rows, tmp_path / "raw").tolist() == ["round", "fusiform", None, None, None]
    # A name decomposed on disk (macOS) and composed in the table is one image.
    decomposed = rows.assign(image=rows["image"].replace({"a.tif": unicodedata.normalize("NFD", "zürich_a.tif")}))
    (plate / "ground_truth.csv").write_text("image,x,y,morphotype\nzürich_a.tif,10,10,round\n", encoding="utf-8")
    assert true_morphotypes(decomposed, tmp_path / "raw").tolist() == ["round", None, None, None, None]
    (plate / "ground_truth.csv").write_text("image,x,y,type\na.tif,1,1,round\n")
    with pytest.raises(InputError, match=r"p1/ground_truth\.csv: ground truth lacks column\(s\) \['morphotype'\]"):
        true_morphotypes(rows, tmp_path / "raw")
    assert not has_truth(got)  # 2 of 5 known
    assert has_truth(pd.Series(["a", "b", "a", None]))
