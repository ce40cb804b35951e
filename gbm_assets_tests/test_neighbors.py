"""CellProfiler's MeasureObjectNeighbors among an image's cells (imaging.neighbors), and the
clustering's neighbour context (ClusteringConfig.neighbor_weight, issue 13: clump members look
like small round cells once their neighbours are masked out of the crop)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from gbm_assets.analysis.clustering import (
    ClusteringConfig,
    assign_new,
    fit_clusters,
    load_clustering,
    neighbor_contact,
    save_clustering,
)
from gbm_assets.imaging.neighbors import measure_neighbors, neighbor_columns, with_neighbors
from gbm_assets.schema import CROP_SCHEMA, NEIGHBOR_COLUMNS

FAST = dict(seed=0, umap_n_epochs=80, gmm_components=3, auto_k_max=5, auto_k_stability_runs=2)


def three_squares() -> tuple[np.ndarray, pd.DataFrame]:
    """A 100 x 100 label mask: cells 1 and 2 (10 x 10 squares, rows 10-19) 3 px apart edge to
    edge, cell 3 far away (rows and columns 60-69), and debris 4 touching cell 3."""
    labels = np.zeros((100, 100), np.uint16)
    labels[10:20, 10:20] = 1  # centroid (x, y) = (14.5, 14.5)
    labels[10:20, 23:33] = 2  # centroid (27.5, 14.5): 3 background columns between 1 and 2
    labels[60:70, 60:70] = 3  # centroid (64.5, 64.5)
    labels[60:70, 70:72] = 4  # debris, adjacent to 3
    cells = pd.DataFrame({"cell_id": [1, 2, 3, 4], "qc": ["cell", "cell", "cell", "debris"]})
    return labels, cells


def test_neighbour_measurements_of_a_hand_made_image_follow_cellprofiler():
    labels, cells = three_squares()
    out = with_neighbors(cells, labels, distance=5)
    n, pt, first, first_d, second, second_d, angle = (out[c].to_numpy() for c in neighbor_columns(5))
    assert neighbor_columns(5) == list(NEIGHBOR_COLUMNS) and neighbor_columns(5)[0] == "Neighbors_NumberOfNeighbors_5"
    # within 5 px edge to edge: 1 and 2 (3 px apart) are neighbours; 3 has none (debris is no cell)
    np.testing.assert_array_equal(n[:3], [1, 1, 0])
    np.testing.assert_array_equal(first[:3], [2, 1, 2])
    np.testing.assert_array_equal(second[:3], [3, 3, 1])
    # centroid to centroid, px
    np.testing.assert_allclose(first_d[:3], [13.0, 13.0, np.hypot(37, 50)])
    np.testing.assert_allclose(second_d[:3], [np.hypot(50, 50), np.hypot(37, 50), np.hypot(50, 50)])
    # angle at cell 1 between (13, 0) to cell 2 and (50, 50) to cell 3
    assert angle[0] == pytest.approx(45.0)
    # cell 1's outline: 36 px; those within 5.5 px of cell 2: its right column (10) and the next
    # column's top and bottom pixels (2)
    assert pt[0] == pytest.approx(100 * 12 / 36)
    assert pt[2] == 0.0
    # the debris is not measured
    assert out.iloc[3][neighbor_columns(5)].isna().all()
    # at 2 px, cells 1 and 2 are no longer neighbours; centroid distances do not change
    near = measure_neighbors(labels, [1, 2, 3], distance=2)
    np.testing.assert_array_equal(near["Neighbors_NumberOfNeighbors_2"], [0, 0, 0])
    np.testing.assert_allclose(near["Neighbors_FirstClosestDistance_2"], first_d[:3])


def test_cell_findings_boxes_are_find_objects_and_give_the_same_neighbour_measurements():
    from scipy import ndimage as ndi

    from gbm_assets.imaging.segmentation import find_candidates_boxed, find_cells, find_cells_boxed
    from gbm_assets.imaging.synthetic import CULTURE_MIXTURES, synthesize_image

    image = synthesize_image(np.random.default_rng(2), CULTURE_MIXTURES["GBM02"], 40, size=512).image
    candidates, labels, _, boxes = find_candidates_boxed(image)
    assert boxes == ndi.find_objects(labels)
    pd.testing.assert_frame_equal(with_neighbors(candidates, labels, boxes=boxes), with_neighbors(candidates, labels))
    cells, cell_labels, cell_boxes = find_cells_boxed(image)
    assert (cells["qc"] == "cell").sum() > 5 and cell_boxes == ndi.find_objects(cell_labels)
    found = find_cells(image)
    pd.testing.assert_frame_equal(found[0], cells)
    np.testing.assert_array_equal(found[1], cell_labels)
    pd.testing.assert_frame_equal(
        with_neighbors(cells, cell_labels, boxes=cell_boxes), with_neighbors(cells, cell_labels)
    )
    hand, table = three_squares()
    pd.testing.assert_frame_equal(
        measure_neighbors(hand, [1, 2, 3], boxes=ndi.find_objects(hand)), measure_neighbors(hand, [1, 2, 3])
    )


def test_a_cell_alone_has_no_closest_cell_and_bad_input_is_named():
    labels, _ = three_squares()
    alone = measure_neighbors(labels, [3], distance=5).iloc[0]
    assert alone["Neighbors_NumberOfNeighbors_5"] == 0 and alone["Neighbors_FirstClosestObjectNumber_5"] == 0
    assert np.isnan(alone["Neighbors_FirstClosestDistance_5"]) and np.isnan(alone["Neighbors_AngleBetweenNeighbors_5"])
    assert measure_neighbors(labels, [], distance=5).empty
    with pytest.raises(ValueError, match="2-D"):
        measure_neighbors(labels[None], [1])
    with pytest.raises(ValueError, match="repeat"):
        measure_neighbors(labels, [1, 1])
    assert all(c in CROP_SCHEMA.names for c in (*NEIGHBOR_COLUMNS, "cell_diameter_px"))


def test_neighbor_contact_is_one_minus_the_closest_distance_in_cell_diameters():
    cells = pd.DataFrame(
        {
            "Neighbors_FirstClosestDistance_5": [10.0, 25.0, 60.0, np.nan],
            "Neighbors_NumberOfNeighbors_5": [1.0, 1.0, 0.0, 0.0],
            "cell_diameter_px": 50.0,
        }
    )
    np.testing.assert_allclose(neighbor_contact(cells), [0.8, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="materialize"):
        neighbor_contact(cells.drop(columns="cell_diameter_px"))
    with pytest.raises(ValueError, match="without neighbour measurements"):
        neighbor_contact(cells.assign(Neighbors_NumberOfNeighbors_5=np.nan))


def alike_but_touching(n: int = 450, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, 16), contact (n,), type): type 0 "flat" cells sit apart in feature space;
    types 1 ("round") and 2 ("clump") share one feature distribution and differ only in the
    contact: 0 for round cells (alone), 0.4-0.8 for clump members."""
    rng = np.random.default_rng(seed)
    types = np.arange(n) % 3
    x = rng.normal(0, 1.0, (n, 16))
    x[types == 0, :2] += 8.0
    contact = np.where(types == 2, rng.uniform(0.4, 0.8, n), 0.0)
    return x.astype(np.float32), contact, types


def test_neighbor_weight_separates_types_that_differ_only_by_their_neighbours(tmp_path):
    x, contact, types = alike_but_touching()
    _, plain = fit_clusters(x, ClusteringConfig(**FAST))
    assert adjusted_rand_score(types, plain["hdbscan"]) < 0.7  # round and clump cells: one cluster
    config = ClusteringConfig(**FAST, preprocess="spherize", neighbor_weight=1.0)
    fitted, labels = fit_clusters(x, config, context=contact)
    assert adjusted_rand_score(types, labels["hdbscan"]) > 0.9
    assert fitted.n_features == 16 and fitted.umap._raw_data.shape[1] == 17
    # later cells are placed with their context, as the training cells were; the stored models agree
    x2, contact2, types2 = alike_but_touching(90, seed=1)
    new = assign_new(fitted, x2, contact2)
    assert adjusted_rand_score(types2, new["hdbscan"]) > 0.9
    loaded = load_clustering(save_clustering(fitted, tmp_path / "m.npz"), fitted.fingerprint())
    pd.testing.assert_frame_equal(assign_new(loaded, x2, contact2), new)
    with pytest.raises(ValueError, match="context"):
        assign_new(fitted, x2)
    with pytest.raises(ValueError, match="context"):
        fit_clusters(x, config)
    # the weight is part of the models' fingerprint
    other, _ = fit_clusters(x, ClusteringConfig(**FAST, preprocess="spherize", neighbor_weight=2.0), context=contact)
    assert other.fingerprint() != fitted.fingerprint()


def test_clusters_core_path_fits_and_labels_later_cells_with_their_contact(tmp_path):
    """cell_labels.load_or_fit / write_labels (the clusters asset's core) with each crop's contact
    by crop_id: fitted on a sample, the other cells placed with theirs; a changed weight refits."""
    from dataclasses import replace

    from gbm_assets.analysis.cell_labels import load_or_fit, write_labels
    from gbm_assets.errors import InputError
    from gbm_assets.models.embedding_table import embedding_batch
    from gbm_assets.paths import ClusterModelFiles
    from gbm_assets.schema import PROVENANCE_COLUMNS
    from gbm_assets.staging import Staging
    from gbm_assets.storage import write_parquet_atomic

    x, contact, types = alike_but_touching(300)
    ids = [f"P:img{i % 5}.tif:{i}" for i in range(len(x))]
    rows = pd.DataFrame(
        {
            "crop_id": ids,
            "plate": "P",
            "image": [i.split(":")[1] for i in ids],
            "x": np.int32(64),
            "y": np.int32(64),
            "culture": "GBM03",
            "concentration": "1000",
            "replicate": np.int32(1),
            "timepoint_h": 0.0,
            "well": "na",
            "position": "na",
        }
    )[list(PROVENANCE_COLUMNS)]
    emb = write_parquet_atomic(embedding_batch(rows, x, x), tmp_path / "emb.parquet")
    by_crop = pd.Series(contact, index=pd.Index(ids, name="crop_id"))
    files, labels = ClusterModelFiles(tmp_path / "models"), tmp_path / "labels.parquet"
    files.folder.mkdir()
    config = ClusteringConfig(**FAST, preprocess="spherize", neighbor_weight=1.0)

    def run(config, contact=by_crop):
        with Staging() as stage:
            models = load_or_fit(emb, files, labels, "run-1", config, stage, 200, contact=contact)
            counts = write_labels(emb, models, stage.path(labels), contact=contact)
            stage.commit([*models.commit_order, labels])
        return models, counts

    models, counts = run(config)
    assert models.mode == "fit" and counts == (300, 100)
    out = pd.read_parquet(labels).set_index("crop_id").loc[ids]
    assert adjusted_rand_score(types, out["hdbscan"]) > 0.9
    assert run(config)[0].mode.startswith("assign")
    assert run(replace(config, neighbor_weight=2.0))[0].mode == "fit"
    with pytest.raises(InputError, match="no crop"):
        run(replace(config, neighbor_weight=0.5), contact=by_crop.iloc[:250])


def test_crop_contact_names_crops_made_before_neighbour_measurements(tmp_path):
    from gbm_assets.analysis.cell_labels import crop_contact
    from gbm_assets.errors import InputError
    from gbm_assets.imaging.synthetic_crops import write_synthetic_crops

    crops = write_synthetic_crops(tmp_path / "crops", plates=("P1",), per_plate=6)
    with pytest.raises(InputError, match="materialize cell_coordinates and cell_crops again"):
        crop_contact(crops)


def test_cluster_config_takes_the_variants_neighbor_weight_unless_set():
    from gbm_assets.assets.clusters import ClusterConfig
    from gbm_assets.models.variants import get_variant

    row = get_variant("siamese_b_ds2_cell")
    assert ClusterConfig().params(row).neighbor_weight == row.cluster_neighbor_weight
    assert ClusterConfig(neighbor_weight=0.0).params(row).neighbor_weight == 0.0
    assert ClusterConfig(neighbor_weight=1.5).params(get_variant("siamese_b")).neighbor_weight == 1.5
    assert ClusterConfig().params(get_variant("siamese_b")).neighbor_weight == 0.0


def test_cell_coordinates_and_crops_carry_the_neighbour_measurements_of_each_image(tmp_path):
    """plate_coordinates measures every image's cells from its label mask after cell finding; the
    crops made in the same pass carry the same values and the plate's cell diameter."""
    from gbm_assets.imaging.plate_cells import CropRequest, decode_labels
    from gbm_assets.imaging.plate_coordinates import plate_coordinates
    from gbm_assets.imaging.synthetic import write_plates

    # the most crowded of the hard plates: cells touch, some alone
    plate = write_plates(tmp_path, 1, 5, images_per_plate=2, size=512, seed=3, difficulty="hard")[-1]
    manifest = pd.read_csv(plate / "manifest.csv")
    made = []
    request = CropRequest(32, ("cell",), timepoints=dict(zip(manifest["image"], manifest["timepoint_h"], strict=True)))
    found = plate_coordinates("p", plate, manifest["image"], crop=request, on_crops=made.append)
    coords = found.coordinates
    assert set(NEIGHBOR_COLUMNS) <= set(coords.columns)
    cells = coords[coords["qc"] == "cell"]
    assert len(cells) > 2 and cells["Neighbors_NumberOfNeighbors_5"].notna().all()
    assert (cells["Neighbors_NumberOfNeighbors_5"] > 0).any() and (cells["Neighbors_NumberOfNeighbors_5"] == 0).any()
    assert coords.loc[coords["qc"] != "cell", list(NEIGHBOR_COLUMNS)].isna().all().all()
    for mask in found.masks.to_pylist():
        labels = decode_labels(mask["labels_zstd"], (mask["height"], mask["width"]))
        mine = cells[cells["image"] == mask["image"]]
        expected = measure_neighbors(labels, mine["cell_id"].to_numpy(), 5)
        np.testing.assert_allclose(mine[list(NEIGHBOR_COLUMNS)].to_numpy(float), expected.to_numpy(float))
    crops = pd.concat([image.crops[0].assign(image=image.image) for image in made], ignore_index=True)
    joined = crops.merge(cells, on=["image", "cell_id"], suffixes=("", "_coords"))
    assert len(joined) == len(crops) > 0
    for c in (*NEIGHBOR_COLUMNS, "cell_diameter_px"):
        np.testing.assert_allclose(joined[c].to_numpy(float), joined[f"{c}_coords"].to_numpy(float))
