"""The one reader of the crops dataset (imaging.crop_dataset), the data layout (DataDirs) and run configs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gbm_assets.assets.clusters import ClusterConfig
from gbm_assets.assets.resources import DataDirs
from gbm_assets.imaging.crop_dataset import (
    CropSelection,
    count_crops,
    crop_plates,
    iter_crop_batches,
    iter_record_batches,
    read_crops,
)
from gbm_assets.imaging.synthetic_crops import write_synthetic_crops
from gbm_assets.storage import sample_batches

ASSETS = Path(__file__).resolve().parent.parent / "gbm_assets" / "assets"


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory) -> Path:
    return write_synthetic_crops(
        tmp_path_factory.mktemp("crops") / "cell_crops.parquet", ("P1", "P2"), (40, 9), size=16
    )


def test_reading_crops_and_embeddings_imports_no_tensorflow(crops_dir):
    code = (
        "import sys\n"
        "from gbm_assets.imaging.crop_dataset import iter_crop_batches\n"
        "import gbm_assets.imaging.crop_lookup, gbm_assets.models.embedding_table, gbm_assets.analysis.cell_labels\n"
        f"assert sum(len(r) for r, _ in iter_crop_batches({str(crops_dir)!r}, 16)) == 49\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_max_crops_picks_the_rows_storage_samples(crops_dir):
    """One seeded sampler: a crop subset of one plate is the sample sample_batches draws from its file."""
    selection = CropSelection.of(crops_dir, ["P1"], max_crops=7, seed=5)
    ids = [i for b in iter_record_batches(selection, ["crop_id"], 8) for i in b.column("crop_id").to_pylist()]
    expected = [
        i
        for b in sample_batches(crops_dir / "plate=P1" / "part-0.parquet", 7, 5, ["crop_id"], 8)
        for i in b.column("crop_id").to_pylist()
    ]
    assert ids == expected and len(set(ids)) == 7 == count_crops(selection)
    assert count_crops(CropSelection.of(crops_dir, max_crops=100)) == 49  # more than there are: all of them


def test_plates_batches_and_lookup_agree(crops_dir):
    assert crop_plates(crops_dir) == ["P1", "P2"]
    rows, pixels = zip(*iter_crop_batches(crops_dir, 16), strict=False)
    assert [len(r) for r in rows] == [16, 16, 8, 9]  # batches never span two plate files
    assert pixels[0].dtype == np.float32 and pixels[0].shape == (16, 16, 16, 1) and pixels[0].max() <= 1.0
    ids = [rows[3]["crop_id"].iloc[2], rows[0]["crop_id"].iloc[0]]
    looked_up = read_crops(crops_dir, ids)
    assert looked_up.dtype == np.uint8 and looked_up.shape == (2, 16, 16)
    assert np.array_equal(looked_up[1], np.rint(pixels[0][0, ..., 0] * 255).astype(np.uint8))
    assert np.array_equal(looked_up[0], np.rint(pixels[3][2, ..., 0] * 255).astype(np.uint8))


def test_data_dirs_name_every_model_output(tmp_path):
    data = DataDirs(root=str(tmp_path))
    models = data.cluster_models("siamese_b")
    assert models.record == tmp_path / "cluster_models" / "siamese_b" / "model.json"
    assert models.named("../../elsewhere/model-x.npz") == models.folder / "model-x.npz"
    assert data.encoder_file("siamese_b") == tmp_path / "encoders" / "siamese_b" / "encoder.keras"
    assert data.explorer_file("siamese_b") == tmp_path / "reports" / "explorer" / "siamese_b.html"
    assert data.composition_dir == tmp_path / "reports" / "composition"
    assert data.baseline_cache == tmp_path / "evaluation" / "_baselines"
    (data.evaluation_dir("siamese_b")).mkdir(parents=True)
    for name in ("confusion_embedding_culture.png", "confusion_raw_pixels_culture.png", "scores.parquet"):
        (data.evaluation_dir("siamese_b") / name).write_bytes(b"")
    assert [p.name for p in data.confusion_figures("siamese_b")] == ["confusion_embedding_culture.png"]


@pytest.mark.parametrize("module", ["encoders.py", "clusters.py"])
def test_asset_modules_spell_no_file_names(module):
    """DataDirs (and gbm_assets.paths) are the only places that know where outputs live."""
    tree = ast.parse((ASSETS / module).read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node) is not None
    }
    source = "\n".join(
        node.value
        for node in ast.walk(tree)  # string literals and f-string parts, not docstrings
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    )
    for spelled in (
        "encoder.keras",
        "model.json",
        "model.joblib",
        "skipped.json",
        "cluster_models",
        ".npz",
        "confusion_embedding",
        '"reports"',
        '"composition"',
        "plate=",
        "part-0.parquet",
        ".html",
        "_baselines",
    ):
        assert spelled not in source, f"{module} spells {spelled!r}"


def test_cluster_config_fills_the_core_parameters():
    from gbm_assets.analysis.clustering import ClusteringConfig

    assert ClusterConfig().params() == ClusteringConfig()
    assert ClusterConfig(
        seed=3, gmm_components=5, hdbscan_min_samples=4, hdbscan_min_cluster_size=30, refit=True, fit_max_cells=9
    ).params() == ClusteringConfig(seed=3, gmm_components=5, hdbscan_min_samples=4, hdbscan_min_cluster_size=30)
    # the clustering preprocessing is a run-config setting of the clusters asset too
    assert ClusterConfig(preprocess="pca_whiten", pca_components=5).params() == ClusteringConfig(
        preprocess="pca_whiten", pca_components=5
    )
