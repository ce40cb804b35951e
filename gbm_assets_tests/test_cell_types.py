"""Cell types a biologist can read (issue 13 item 6): shape per cluster, gallery, artefact flags,
composition with replicate-level intervals and tests, and the per-cell table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gbm_assets.analysis.cell_labels import labels_schema, labels_table
from gbm_assets.analysis.cell_types import (
    cell_table_columns,
    cluster_profiles,
    nearest_to_centre,
    random_members,
    read_measurements,
    shape_measurements,
    write_cell_table,
)
from gbm_assets.analysis.composition import (
    chi_square_culture_vs_type,
    composition,
    composition_by_units,
    culture_difference_test,
    experimental_units,
)
from gbm_assets.analysis.report import COMPARISON_COLUMNS, write_report
from gbm_assets.analysis.variant_report import build_section
from gbm_assets.schema import CROP_SCHEMA, MEASUREMENT_COLUMNS, NEIGHBOR_COLUMNS, PROVENANCE_COLUMNS, make_crop_id

SIDE = 16
# cluster -> (area px, major, minor, solidity, form factor): cluster 2 is small debris
SHAPES = {0: (400.0, 30.0, 15.0, 0.9, 0.6), 1: (600.0, 40.0, 10.0, 0.8, 0.3), 2: (20.0, 6.0, 5.0, 0.95, 0.9)}
CENTRES = {0: (0.0, 0.0), 1: (10.0, 0.0), 2: (0.0, 10.0)}


def lab_cells(seed: int = 0, per_plate: int = 60) -> pd.DataFrame:
    """2 cultures x 5 replicate plates x 2 images; culture B has more of cluster 1; some noise cells."""
    rng = np.random.default_rng(seed)
    rows = []
    for culture, mix in (("GBM01", [0.6, 0.2, 0.2]), ("=GBM02", [0.2, 0.6, 0.2])):
        for replicate in (1, 2, 3, 4, 5):
            plate = f"{culture.strip('=')}-r{replicate}"
            for i in range(per_plate):
                cluster = int(rng.choice(3, p=mix)) if i % 10 else -1
                area, major, minor, solidity, ff = SHAPES[max(cluster, 0)]
                cx, cy = CENTRES[max(cluster, 0)]
                image = f"img{i % 2}.tif"
                rows.append(
                    {
                        "crop_id": make_crop_id(plate, image, i),
                        "plate": plate,
                        "image": image,
                        "x": 100 + i,
                        "y": 100,
                        "culture": culture,
                        "concentration": "1000",
                        "replicate": replicate,
                        "timepoint_h": 0.0,
                        "well": "B2",
                        "position": "1",
                        "hdbscan": cluster,
                        "umap_x": cx + rng.normal(0, 1),
                        "umap_y": cy + rng.normal(0, 1),
                        "area": area * rng.uniform(0.9, 1.1),
                        "perimeter": 80.0,
                        "major_axis_length": major,
                        "minor_axis_length": minor,
                        "eccentricity": 0.8,
                        "solidity": solidity,
                        "form_factor": ff,
                    }
                )
    return pd.DataFrame(rows)


def write_lab(root: Path, cells: pd.DataFrame, qc_plates: tuple[str, ...] = ()) -> dict[str, Path]:
    """Crops dataset (pixel value = cluster), labels file and embeddings file of cells."""
    crops = root / "cell_crops.parquet"
    for plate, group in cells.groupby("plate", sort=True):
        columns = {c: group[c].to_numpy() for c in PROVENANCE_COLUMNS}
        columns.update(
            {
                "cell_id": np.arange(len(group), dtype=np.int32),
                **{m: group[m].to_numpy(float) for m in MEASUREMENT_COLUMNS},
                **{m: group["area"].to_numpy(float) % 3 for m in NEIGHBOR_COLUMNS},  # stand-in values
                "cell_diameter_px": np.full(len(group), 40.0),
                # the per-cell quality label: debris for cluster 2 on the qc plates
                "qc": np.where((group["hdbscan"] == 2) & (plate in qc_plates), "debris", "cell"),
                "crop_size": np.full(len(group), SIDE, np.int16),
                "pixels": [bytes([(c + 1) * 60] * SIDE * SIDE) for c in group["hdbscan"]],
                "mask": [bytes(SIDE * SIDE)] * len(group),
            }
        )
        table = pa.table(columns, schema=CROP_SCHEMA)
        if plate not in qc_plates:  # written before cell_crops carried the qc label
            table = table.drop_columns(["qc"])
        (crops / f"plate={plate}").mkdir(parents=True)
        pq.write_table(table, crops / f"plate={plate}" / "part-0.parquet")
    labels = cells.assign(
        hdbscan_noise=cells["hdbscan"] < 0,
        gmm=cells["hdbscan"].clip(lower=0),
        gmm_prob=0.9,
        gmm_probs=[np.array([0.9, 0.05, 0.05], np.float32)] * len(cells),
        auto=cells["hdbscan"].clip(lower=0),
    )
    labels_path = root / "labels.parquet"
    pq.write_table(labels_table(labels, labels_schema(3, "fp")), labels_path)
    vectors = np.random.default_rng(1).normal(size=(len(cells), 4)).astype(np.float32)
    embeddings = pa.table(
        {
            "crop_id": cells["crop_id"].to_numpy(),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4),
        }
    )
    embeddings_path = root / "embeddings.parquet"
    pq.write_table(embeddings, embeddings_path, row_group_size=37)  # row groups unlike the labels file's
    return {"crops": crops, "labels": labels_path, "embeddings": embeddings_path, "vectors": vectors}


# --- shape per cluster, artefact flags --------------------------------------------------------


def test_cluster_profiles_give_medians_in_um2_and_flag_debris():
    cells = lab_cells()
    profiles = cluster_profiles(cells, pixel_size_um=0.5).set_index("cluster")
    assert list(profiles.index) == [0, 1, 2]  # noise left out
    assert profiles.loc[1, "median_area"] == pytest.approx(600 * 0.25, rel=0.1)  # px² -> µm²
    assert profiles.loc[1, "median_elongation"] == pytest.approx(4.0)
    assert profiles.loc[0, "median_solidity"] == pytest.approx(0.9)
    assert profiles.loc[2, "median_form_factor"] == pytest.approx(0.9)
    assert not cluster_profiles(cells.assign(area=np.where(cells["hdbscan"] == 2, 100.0, cells["area"])))[
        "artefact"
    ].any()  # a small round cell type (a fifth of the median area) is not debris
    assert profiles["n_cells"].sum() == (cells["hdbscan"] >= 0).sum()
    assert profiles["share"].sum() == pytest.approx(1.0)
    assert profiles["artefact"].tolist() == [False, False, True]
    assert "small" in profiles.loc[2, "artefact_reason"]
    assert profiles["qc_not_cell"].isna().all()  # no qc labels: none claimed
    pixels = cluster_profiles(cells).set_index("cluster")
    assert pixels.loc[1, "median_area"] == pytest.approx(600, rel=0.1)
    with pytest.raises(ValueError, match="pixel size"):
        shape_measurements(cells, pixel_size_um=0)


def test_qc_labels_flag_a_cluster_whose_cells_are_not_cells():
    cells = lab_cells()
    cells["area"] = 400.0  # shape alone flags nothing
    cells["qc"] = np.where(cells["hdbscan"] == 1, "fragment", "cell")
    profiles = cluster_profiles(cells).set_index("cluster")
    assert profiles["artefact"].tolist() == [False, True, False]
    assert profiles.loc[1, "qc_not_cell"] == 1.0 and "fragment 100%" in profiles.loc[1, "artefact_reason"]


def test_nearest_to_centre_and_random_members():
    xy = np.array([[0, 0], [5, 5], [1, 0], [-1, 0], [0, 3], [50, 50]], float)
    labels = np.array([0, 0, 0, 0, 0, -1])
    near = nearest_to_centre(xy, labels, per_cluster=2)
    assert set(near) == {0} and near[0].tolist() == [0, 2]  # the median centre (0, 0) first, then a tie at 1
    rand = random_members(labels, per_cluster=10, seed=1)
    assert sorted(rand[0]) == [0, 1, 2, 3, 4]  # all of a small cluster, never noise
    assert (random_members(labels, 3, seed=1)[0] == random_members(labels, 3, seed=1)[0]).all()


# --- composition and culture differences with replicates as units ------------------------------


def overdispersed(differ: bool, seed: int, n_units: int = 4, cells: int = 2000):
    """Each replicate's composition varies around its culture's (Dirichlet), as wells do."""
    rng = np.random.default_rng(seed)
    labels, cultures, units = [], [], []
    for culture in "AB":
        base = np.array([0.1, 0.2, 0.3, 0.4] if differ and culture == "B" else [0.4, 0.3, 0.2, 0.1])
        for u in range(n_units):
            labels.append(rng.choice(4, size=cells, p=rng.dirichlet(base * 20)))
            cultures += [culture] * cells
            units += [f"{culture}{u}"] * cells
    return np.concatenate(labels), np.array(cultures), np.array(units)


def test_chi_square_over_cells_overstates_what_replicates_support():
    labels, cultures, units = overdispersed(differ=False, seed=0)
    assert chi_square_culture_vs_type(labels, cultures)["p_value"] < 1e-6  # "significant" from well noise
    null = culture_difference_test(labels, cultures, units, n_perm=2000)
    assert null["p_value"] > 0.2 and not null["clusters"]["differs"].any() and null["n_units"] == 8
    real = culture_difference_test(*overdispersed(differ=True, seed=0), n_perm=2000)
    # 4 + 4 replicates: the smallest p any test on them can give is 2 / C(8, 4) = 0.029
    assert real["p_value"] < 0.05 and real["reason"] == "" and real["min_p"] == pytest.approx(2 / 70)
    assert set(real["clusters"].columns) >= {"cluster", "p_value", "p_adjusted", "differs", "share:A", "share:B"}
    again = culture_difference_test(*overdispersed(differ=True, seed=0), n_perm=2000)
    assert again["p_value"] == real["p_value"]  # seeded


def test_culture_test_says_why_it_cannot_run():
    labels, cultures, _ = overdispersed(differ=True, seed=1, n_units=1)
    one_each = culture_difference_test(labels, cultures, cultures)
    assert np.isnan(one_each["p_value"]) and "2 units" in one_each["reason"]
    one_culture = culture_difference_test(
        labels[cultures == "A"], cultures[cultures == "A"], np.arange((cultures == "A").sum()) % 3
    )
    assert "2 cultures" in one_culture["reason"]
    three_each = culture_difference_test(*overdispersed(differ=True, seed=1, n_units=3), n_perm=500)
    assert three_each["min_p"] == pytest.approx(0.1)  # 3 + 3 replicates can never give p < 0.1
    with pytest.raises(ValueError, match="several cultures"):
        culture_difference_test(labels, cultures, np.zeros(len(labels), int))


def test_unit_bootstrap_intervals_reflect_replicate_variation():
    labels, cultures, units = overdispersed(differ=False, seed=2)
    by_units = composition_by_units(labels, cultures, units, n_boot=500)
    by_cells = composition(labels, cultures, n_boot=500)
    width = lambda c: (c["ci_high"] - c["ci_low"]).mean()  # noqa: E731
    assert width(by_units) > 2 * width(by_cells)  # 8,000 cells per culture are not 8,000 replicates
    pd.testing.assert_series_equal(by_units["proportion"], by_cells["proportion"])
    assert (by_units["n_units"] == 4).all()
    assert (by_units["ci_low"] <= by_units["proportion"]).all() and (
        by_units["proportion"] <= by_units["ci_high"]
    ).all()


def test_experimental_units_choose_replicates_when_cultures_have_several():
    cells = lab_cells(per_plate=4)
    units, level = experimental_units(cells)
    assert level == "replicate" and units.nunique() == 10
    one = cells[cells["replicate"] == 1]
    units, level = experimental_units(one)
    assert level == "image" and units.nunique() == 4  # 2 plates x 2 images
    with pytest.raises(ValueError, match="replicate"):
        experimental_units(cells.drop(columns="replicate"))


# --- crops, the per-cell table, the section ----------------------------------------------------


@pytest.fixture
def lab(tmp_path):
    cells = lab_cells()
    return cells, write_lab(tmp_path, cells, qc_plates=("GBM01-r1",))


def test_read_measurements_reads_plates_with_and_without_qc(lab):
    cells, files = lab
    ids = cells["crop_id"].iloc[::-7].reset_index(drop=True)
    got = read_measurements(files["crops"], ids)
    assert got["crop_id"].tolist() == ids.tolist()
    expected = cells.set_index("crop_id").loc[ids, "area"].to_numpy()
    np.testing.assert_allclose(got["area"].to_numpy(float), expected)
    on_qc_plate = ids.str.startswith("GBM01-r1:").to_numpy()
    assert got["qc"][on_qc_plate].notna().all() and got["qc"][~on_qc_plate].isna().all()


def test_per_cell_table_streams_every_cell_with_pycytominer_columns(lab, tmp_path):
    cells, files = lab
    out = write_cell_table(
        files["labels"], files["crops"], tmp_path / "out" / "cells", embeddings_path=files["embeddings"], batch_size=50
    )  # 8 batches
    assert out["n_cells"] == len(cells) and out["embedding"] == "included"
    table = pd.read_parquet(out["parquet"])
    assert list(table.columns) == cell_table_columns(4)
    assert table["Metadata_crop_id"].tolist() == cells["crop_id"].tolist()
    np.testing.assert_allclose(table["Cells_AreaShape_Area"], cells["area"])
    for m in NEIGHBOR_COLUMNS:  # CellProfiler's neighbour measurements the crops carry
        np.testing.assert_allclose(table[f"Cells_{m}"], cells["area"].to_numpy(float) % 3)
    np.testing.assert_allclose(table[[f"Cells_Embedding_{i:03d}" for i in range(4)]].to_numpy(), files["vectors"])
    assert table["Metadata_hdbscan"].tolist() == cells["hdbscan"].tolist()
    assert set(table.loc[table["Metadata_plate"] == "GBM01-r1", "Metadata_qc"]) <= {"cell", "debris"}
    assert table.loc[table["Metadata_plate"] != "GBM01-r1", "Metadata_qc"].isna().all()
    csv = pd.read_csv(out["csv"])
    assert len(csv) == len(cells) and list(csv.columns) == list(table.columns)
    assert set(csv["Metadata_culture"]) == {"GBM01", "'=GBM02"}  # formula-safe CSV
    # embeddings re-made since clustering: the table is still written, without embedding columns
    pq.write_table(pq.read_table(files["embeddings"]).slice(1), files["embeddings"])
    stale = write_cell_table(files["labels"], files["crops"], tmp_path / "stale", embeddings_path=files["embeddings"])
    assert "left out" in stale["embedding"]
    assert list(pd.read_parquet(stale["parquet"]).columns) == cell_table_columns(0)


def test_section_and_report_name_the_cell_types_that_differ(lab, tmp_path, monkeypatch):
    cells, files = lab
    import gbm_assets.imaging.crop_lookup as crop_lookup

    reads = []
    real_read = crop_lookup.read_crops
    monkeypatch.setattr(
        "gbm_assets.analysis.variant_report.read_crops", lambda d, ids: reads.append(len(ids)) or real_read(d, ids)
    )
    labels = pd.read_parquet(files["labels"]).drop(columns="gmm_probs")
    report_dir = tmp_path / "report"
    section = build_section(
        "B",
        labels,
        files["crops"],
        report_dir / "B",
        n_boot=200,
        n_perm=999,
        labels_path=files["labels"],
        embeddings_path=files["embeddings"],
        pixel_size_um=0.65,
        per_cluster=4,
    )
    assert len(reads) == 1 and reads[0] <= 3 * 4 * 2  # one scan, only the gallery's crops (3 clusters x 2 x 4)
    assert section.unit_level == "replicate" and section.culture_test["n_units"] == 10
    assert section.area_unit == "µm²" and section.profiles["artefact"].tolist() == [False, False, True]
    assert section.gallery.is_file() and section.cell_table["n_cells"] == len(cells)
    differs = section.culture_test["clusters"].set_index("cluster")["differs"]
    assert differs[0] and differs[1] and not differs[2]

    comparison = pd.DataFrame(
        [("raw pixels", np.nan, np.nan, "", 0.30, 0.40, 0.10), ("B", 64, 0.01, "none", 0.50, 0.45, 0.35)],
        columns=list(COMPARISON_COLUMNS),
    )
    page = write_report(report_dir, comparison, [section]).read_text(encoding="utf-8")
    lead = page.split('id="lead">')[1].split("</p>")[0]
    assert "Best variant: B" in lead and "0.250 above raw pixels" in lead
    assert "cluster 0" in lead and "cluster 1" in lead and "cluster 2" not in lead
    assert 'href="B/cells.parquet"' in page and 'href="B/cells.csv"' in page
    assert 'href="B/cell_types.png"' in page


def test_a_culture_of_one_unit_is_left_out_of_the_test_not_an_error():
    """The demo's T98G plate is one unit beside synthetic cultures of several: scipy's permutation
    test refuses a sample of one, which failed the whole report."""
    labels, cultures, units = overdispersed(differ=True, seed=0)
    rng = np.random.default_rng(3)
    labels = np.concatenate([labels, rng.choice(4, size=500)])
    cultures = np.concatenate([cultures, np.full(500, "T98G")])
    units = np.concatenate([units, np.full(500, "t98g")])
    result = culture_difference_test(labels, cultures, units, n_perm=500)
    assert result["reason"] == "" and result["left_out"] == ["T98G"]
    assert result["n_cultures"] == 2 and result["n_units"] == 8 and result["p_value"] < 0.05


def test_section_converts_areas_per_plate_and_says_the_unit(lab, tmp_path):
    """{plate: µm per pixel} from cell_coordinates: every plate known -> areas in µm², each cell with
    its plate's size, unit in the HTML and CSV tables, size in the per-cell table; one plate unknown
    -> px² throughout."""
    cells, files = lab
    labels = pd.read_parquet(files["labels"]).drop(columns="gmm_probs")
    plates = sorted(labels["plate"].unique())
    sizes = {p: (0.5 if p.startswith("GBM01") else 1.0) for p in plates}
    common = dict(n_boot=20, n_perm=99, per_cluster=2)
    section = build_section(
        "B", labels, files["crops"], tmp_path / "B", pixel_size_um=sizes, labels_path=files["labels"], **common
    )
    assert section.area_unit == "µm²"
    measured = cells.set_index("crop_id").loc[labels["crop_id"]]
    scale = labels["plate"].map(sizes).to_numpy() ** 2
    clustered = labels["hdbscan"].to_numpy() == 0
    expected = np.median(measured["area"].to_numpy()[clustered] * scale[clustered])
    assert section.profiles.loc[0, "median_area"] == pytest.approx(expected)
    table = pd.read_parquet(section.cell_table["parquet"])
    assert table["Metadata_pixel_size_um"].tolist() == table["Metadata_plate"].map(sizes).tolist()
    write_report(tmp_path / "report", pd.DataFrame(columns=list(COMPARISON_COLUMNS)), [section])
    assert "median_area_um2" in pd.read_csv(tmp_path / "report" / "B_cell_types.csv").columns
    partly = build_section(
        "B", labels, files["crops"], tmp_path / "B2", pixel_size_um=sizes | {plates[0]: np.nan}, **common
    )
    assert partly.area_unit == "px²"
    expected_px = np.median(measured["area"].to_numpy()[clustered])
    assert partly.profiles.loc[0, "median_area"] == pytest.approx(expected_px)


def test_a_single_unit_culture_left_out_is_named_as_the_reason_the_test_cannot_run():
    """Two cultures, one of a single replicate (a T98G plate beside a plate of two replicates): the
    test cannot run because that culture is left out, not for lack of cells per unit (the message
    said "needs >= 2 cultures with >= 5 clustered cells per unit (found 1)", with 100 per unit)."""
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=300)
    cultures = np.repeat(["T98G", "USI", "USI"], 100)
    units = np.repeat(["t98g:1", "usi:1", "usi:2"], 100)
    result = culture_difference_test(labels, cultures, units, n_perm=99)
    assert np.isnan(result["p_value"]) and result["left_out"] == ["T98G"]
    assert "T98G has a single unit" in result["reason"] and "per unit" not in result["reason"]


def test_a_single_unit_cultures_composition_shows_no_interval_not_a_certain_one():
    from gbm_assets.analysis.report import _composition_wide

    rng = np.random.default_rng(0)
    labels = rng.choice(2, size=300)
    cultures = np.repeat(["T98G", "USI", "USI"], 100)
    units = np.repeat(["t98g:1", "usi:1", "usi:2"], 100)
    wide = _composition_wide(composition_by_units(labels, cultures, units, n_boot=50)).set_index("culture")
    assert all(cell.endswith("[no interval: 1 unit]") for cell in wide.loc["T98G"])
    assert all("no interval" not in cell and cell.count("[") == 1 for cell in wide.loc["USI"])
