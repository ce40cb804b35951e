"""Faults and bad input: each leaves everything already materialized intact and says what went wrong."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.encoders import trained_encoders
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.assets.sensors import new_plate_sensor
from gbm_assets.imaging.plates import find_ready_plates
from gbm_assets.paths import plate_file
from gbm_assets.storage import plate_dataset

INGEST = [raw_plates, cell_coordinates, cell_crops]
SMALL = {"ops": {"cell_crops": {"config": {"crop_size": 64}}}}


def _ingest(root, plate_id, instance):
    return dg.materialize(
        INGEST,
        partition_key=plate_id,
        instance=instance,
        resources={"data": DataDirs(root=str(root))},
        run_config=SMALL,
        raise_on_error=False,
    )


@pytest.fixture
def two_ingested(data_root):
    ids = find_ready_plates(data_root / "raw")[-2:]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, ids)
    for plate_id in ids:
        assert _ingest(data_root, plate_id, instance).success
    return data_root, ids, instance


def _snapshot(root, ids):
    return {p: plate_file(root / "cell_crops.parquet", p).read_bytes() for p in ids} | {
        f"coords:{p}": plate_file(root / "cell_coordinates.parquet", p).read_bytes() for p in ids
    }


def test_corrupt_image_mid_plate_keeps_previous_outputs(two_ingested):
    root, ids, instance = two_ingested
    before = _snapshot(root, ids)
    (root / "raw" / ids[0] / "img001.tif").write_bytes(b"II*\x00 truncated")
    result = _ingest(root, ids[0], instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "img001.tif" in failure.step_failure_data.error.to_string()
    assert _snapshot(root, ids) == before  # neither this plate's earlier outputs nor the other plate changed


def test_plate_deleted_after_registration(two_ingested):
    root, ids, instance = two_ingested
    before = _snapshot(root, ids)
    shutil.rmtree(root / "raw" / ids[0])
    result = _ingest(root, ids[0], instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "plate folder not found" in failure.step_failure_data.error.to_string()
    assert _snapshot(root, ids) == before
    # The sensor carries on with the plates that are there.
    tick = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": DataDirs(root=str(root))}))
    assert ids[0] not in [r.partition_key for r in tick.run_requests]


def test_racing_sensor_ticks_register_a_plate_once(data_root):
    instance = dg.DagsterInstance.ephemeral()
    data = DataDirs(root=str(data_root))
    # Two ticks evaluated before either result is applied, as when two daemons race.
    a = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
    b = new_plate_sensor(dg.build_sensor_context(instance=instance, resources={"data": data}))
    for result in (a, b):
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(plates.name, request.partition_keys)
    keys = instance.get_dynamic_partitions(plates.name)
    assert sorted(keys) == find_ready_plates(data_root / "raw") and len(keys) == len(set(keys))
    # Identical run keys: Dagster launches each plate's run once however many ticks ask.
    assert [r.run_key for r in a.run_requests] == [r.run_key for r in b.run_requests]
    assert len({r.run_key for r in a.run_requests}) == len(a.run_requests)


def test_path_traversal_in_manifest_is_refused(two_ingested):
    root, ids, instance = two_ingested
    before = _snapshot(root, ids)
    manifest = root / "raw" / ids[0] / "manifest.csv"
    m = pd.read_csv(manifest)
    m.loc[0, "image"] = f"../{ids[1]}/img000.tif"  # a real file, outside the plate
    m.to_csv(manifest, index=False)
    result = _ingest(root, ids[0], instance)
    assert not result.success
    assert (
        "escapes the plate folder"
        in next(e for e in result.all_events if e.is_step_failure).step_failure_data.error.to_string()
    )
    assert _snapshot(root, ids) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_unreachable_fails_clearly_retries_and_keeps_previous_encoder(tmp_path):
    enc = tmp_path / "encoders" / "siamese_a"
    enc.mkdir(parents=True)
    (enc / "encoder.keras").write_bytes(b"previous encoder")
    (enc / "run.json").write_text(json.dumps({"run_id": "previous"}))
    tracking = MLflowTracking(tracking_uri=f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    result = dg.materialize(
        [trained_encoders],
        partition_key="siamese_a",
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        resources={"data": DataDirs(root=str(tmp_path)), "mlflow_tracking": tracking},
        run_config={"ops": {"trained_encoders": {"config": {"mlflow_retries": 1, "mlflow_retry_wait_s": 0.1}}}},
    )
    assert not result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 1
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "is unreachable" in failure.step_failure_data.error.to_string()
    assert (enc / "encoder.keras").read_bytes() == b"previous encoder"
    assert json.loads((enc / "run.json").read_text())["run_id"] == "previous"
    assert sorted(p.name for p in enc.iterdir()) == ["encoder.keras", "run.json"]


WRITER = textwrap.dedent("""
    import sys, time
    import pyarrow as pa
    from gbm_assets.storage import AtomicParquetWriter
    schema = pa.schema([("plate", pa.string()), ("v", pa.int64())])
    with AtomicParquetWriter(sys.argv[1], schema) as w:
        for i in range(1000):
            w.write(pa.table({"plate": ["new"] * 1000, "v": list(range(1000))}, schema=schema))
            if i == 0:
                print("writing", flush=True)
            time.sleep(0.05)
""")


def test_process_killed_during_parquet_write_keeps_previous_file(tmp_path):
    final = tmp_path / "crops.parquet" / "plate=p1" / "part-0.parquet"
    final.parent.mkdir(parents=True)
    previous = pa.table({"plate": ["p1"] * 3, "v": [1, 2, 3]})
    pq.write_table(previous, final)
    before = final.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert final.read_bytes() == before
    assert pq.read_table(final).equals(previous)
    # The killed writer's hidden temp file is ignored by dataset readers.
    assert plate_dataset(final.parent.parent).to_table().num_rows == 3
