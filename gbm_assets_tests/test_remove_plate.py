"""Removing a plate from the analysis, plates whose folder went away, and `gbm-assets run --variants/--config`."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gbm_assets import pipeline
from gbm_assets.assets.automation import stale_variants_sensor
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import new_plate_sensor
from gbm_assets.cli import main
from gbm_assets.errors import MissingCropsError, PlateError
from gbm_assets.imaging.crop_dataset import read_crops
from gbm_assets.imaging.plates import manifest_sha256
from gbm_assets.imaging.synthetic_crops import write_synthetic_crops
from gbm_assets.paths import plate_file
from gbm_assets.plate_removal import remove_plate_outputs
from gbm_assets_tests.conftest import write_tiny_plate


def _outputs(root, plate_id):
    """Fake materialized outputs of one plate (a file per dataset, the version record, a pending temp file)."""
    data = DataDirs(root=str(root))
    for dataset in (data.coordinates, data.masks, data.crops):
        path = plate_file(dataset, plate_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"plate": [plate_id]}), path)
    data.plate_version_file(plate_id).parent.mkdir(parents=True, exist_ok=True)
    data.plate_version_file(plate_id).write_text("{}")
    (data.plate_version_file(plate_id).parent / f".{plate_id}.json.host.1.0badcafe.tmp").write_text("half")
    return data


def test_remove_plate_outputs_takes_every_output_and_keeps_the_images(tmp_path):
    data = _outputs(tmp_path, "t98g")
    _outputs(tmp_path, "t98g-um")
    write_tiny_plate(data.plate_dir("t98g"))
    removed = remove_plate_outputs("t98g", tmp_path)
    assert len(removed) == 5  # three datasets, the version record, the pending temp file
    for dataset in (data.coordinates, data.masks, data.crops):
        assert not (dataset / "plate=t98g").exists()
        assert plate_file(dataset, "t98g-um").is_file()  # the other plate untouched
        assert not [p for p in dataset.iterdir() if p.name.startswith(".")]  # nothing hidden left behind
    left = sorted(p.name for p in data.plate_version_file("x").parent.iterdir())
    assert left == [".t98g-um.json.host.1.0badcafe.tmp", "t98g-um.json"]  # the other plate's, untouched
    assert (data.plate_dir("t98g") / "manifest.csv").is_file()  # the user's images stay without the flag
    assert remove_plate_outputs("t98g", tmp_path) == []
    assert remove_plate_outputs("t98g", tmp_path, raw=True) == [data.plate_dir("t98g")]
    assert not data.plate_dir("t98g").exists()
    with pytest.raises(PlateError, match="safe"):
        remove_plate_outputs("../t98g-um", tmp_path)


def test_remove_plate_forgets_the_partition_and_its_records(tmp_path, monkeypatch):
    monkeypatch.setenv("GBM_ASSETS_DATA", str(tmp_path))
    instance = dg.DagsterInstance.ephemeral()
    data = _outputs(tmp_path, "t98g")
    instance.add_dynamic_partitions(plates.name, ["t98g", "t98g-um"])
    for asset in ("raw_plates", "cell_coordinates", "cell_crops"):
        for plate in ("t98g", "t98g-um"):
            instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=plate))
    removed, known = pipeline.remove_plate("t98g", instance, data)
    assert known and len(removed) == 5
    assert instance.get_dynamic_partitions(plates.name) == ["t98g-um"]
    # Added again with the same manifest, the plate is ingested again: its crops are gone (SQLite event
    # logs cannot wipe one partition's records, so the files decide).
    write_tiny_plate(data.plate_dir("t98g"))
    assert pipeline.plates_to_ingest(instance, ["t98g"]) == ["t98g"]
    # The sensor agrees with `gbm-assets run` (before, it read the records alone and left the plate
    # without crops on SQLite).
    tick = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
    assert [r.partition_key for r in tick.run_requests] == ["t98g"]
    with pytest.raises(PlateError, match="no such plate.*t98g-um"):
        pipeline.remove_plate("t98g", instance, data)


def test_missing_crops_name_the_plate_and_what_to_run(tmp_path):
    crops = write_synthetic_crops(tmp_path / "cell_crops.parquet", ["P1"], 4, size=16, images=1)
    ids = pd.read_parquet(crops, columns=["crop_id"], partitioning=None)["crop_id"].tolist()
    with pytest.raises(MissingCropsError) as caught:
        read_crops(crops, [*ids, "t98g:img0.tif:1", "t98g:img0.tif:2"])
    message = str(caught.value)
    assert "plate(s) 't98g' (2 cells)" in message and "gbm-assets run" in message
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ValueError)  # the CLI shows it in a line
    assert not message.startswith("'")  # not KeyError's quoted repr


def _embeddings(data, variant, plate_ids):
    path = data.embeddings_file(variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"crop_id": [f"{p}:a.tif:1" for p in plate_ids], "plate": plate_ids}), path)
    (data.encoder_dir(variant)).mkdir(parents=True, exist_ok=True)
    data.encoder_record(variant).write_text(json.dumps({"run_id": "x"}))


def test_run_retrains_variants_made_with_a_removed_plate_and_warns_of_folderless_plates(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    monkeypatch.setenv("GBM_ASSETS_DATA", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    data = DataDirs()
    write_tiny_plate(data.plate_dir("p1"))
    write_synthetic_crops(data.crops, ["p1", "p3"], 2, size=16, images=1)  # p3: outputs, no folder
    _embeddings(data, "siamese_b", ["p1", "p2"])  # p2's crops were removed
    _embeddings(data, "autoencoder", ["p1", "p3"])
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(plates.name, ["p1"])
    done = {"manifest_sha256": manifest_sha256(data.plate_dir("p1"))}  # p1 is ingested at today's manifest
    instance.report_runless_asset_event(dg.AssetMaterialization("cell_crops", partition="p1", metadata=done))
    for variant in ("siamese_b", "autoencoder"):
        instance.report_runless_asset_event(dg.AssetMaterialization("embeddings", partition=variant))
    runs = []
    monkeypatch.setattr(pipeline, "run_partitions", lambda _i, _d, job, keys, *a, **k: runs.append((job, keys)) or [])
    pipeline.run_main_job(pipeline.SilentBar, variants=["siamese_b", "autoencoder"])
    out = capsys.readouterr()
    assert ("train_all_variants", ["siamese_b"]) in runs  # not autoencoder: its plates all have crops
    assert "siamese_b: made with plate(s) p2" in out.out
    assert "p3" in out.err and "gbm-assets remove-plate ID" in out.err


def test_sensor_updates_a_variant_made_with_a_removed_plate(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    data = DataDirs(root=str(tmp_path))
    write_synthetic_crops(data.crops, ["p1"], 2, size=16, images=1)
    _embeddings(data, "siamese_b", ["p1", "p2"])
    instance.report_runless_asset_event(dg.AssetMaterialization("cell_crops", partition="p1"))
    instance.report_runless_asset_event(dg.AssetMaterialization("embeddings", partition="siamese_b"))
    tick = stale_variants_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
    assert [(r.partition_key, r.run_key) for r in tick.run_requests] == [("siamese_b", f"siamese_b@{1}-without-p2")]


def test_cli_remove_plate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    data = _outputs(tmp_path / "data", "t98g")
    write_tiny_plate(data.plate_dir("t98g"))
    assert main(["remove-plate", "t98g", "--data", str(tmp_path / "data")]) == 0
    assert "removed 5 output(s)" in capsys.readouterr().out
    assert not (data.crops / "plate=t98g").exists() and data.plate_dir("t98g").is_dir()
    assert main(["remove-plate", "nope", "--data", str(tmp_path / "data")]) == 1
    assert "'nope': no such plate" in capsys.readouterr().err


def test_run_variants_and_config_reach_the_job_and_bad_ones_fail_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    write_tiny_plate(tmp_path / "data" / "raw" / "p1")
    config = tmp_path / "short.yaml"
    config.write_text("ops:\n  trained_encoders:\n    config: {epochs: 1, max_steps_per_epoch: 2}\n")
    seen = {}
    monkeypatch.setattr(pipeline, "run_main_job", lambda **kw: seen.update(kw) or 0)
    args = ["run", "--data", str(tmp_path / "data"), "--no-synth"]
    assert main([*args, "--variants", "siamese_b, autoencoder", "--config", str(config)]) == 0
    assert seen["variants"] == ["siamese_b", "autoencoder"]
    assert seen["run_config"] == {
        "train_all_variants": {"ops": {"trained_encoders": {"config": {"epochs": 1, "max_steps_per_epoch": 2}}}}
    }
    seen.clear()
    assert main([*args, "--variants", "siamese_z"]) == 1
    err = capsys.readouterr().err
    assert "unknown model variant(s) 'siamese_z'" in err and "siamese_b" in err and not seen
    config.write_text("ops:\n  trained_encoders:\n    config: {epoch: 1}\n")
    assert main([*args, "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert str(config) in err and 'unexpected config entry "epoch"' in err and len(err.splitlines()) == 1
