"""`gbm-assets run` ends with the wall time of each stage, taken from Dagster's step records."""

from __future__ import annotations

import re
import shutil

import pytest

from gbm_assets.pipeline import SilentBar, run_main_job

TINY = {
    "ingest_plate": {"ops": {"cell_crops": {"config": {"crop_size": 64}}}},
    "train_all_variants": {
        "ops": {
            "trained_encoders": {"config": {"epochs": 1, "max_steps_per_epoch": 2, "batch_size": 16}},
            "embeddings": {"config": {"batch_size": 64}},
        }
    },
}
ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<seconds>-?\d+\.\d)\s+(?P<share>-?\d+\.\d)%$")


@pytest.fixture
def tiny_lab(tmp_path, synth_plates, monkeypatch):
    """Three of the small synthetic plates (two cultures), isolated Dagster home and MLflow store."""
    data = tmp_path / "data"
    for plate in sorted(synth_plates.iterdir())[:2] + sorted(synth_plates.iterdir())[-1:]:
        shutil.copytree(plate, data / "raw" / plate.name)
    (tmp_path / "dagster_home").mkdir()
    monkeypatch.setenv("GBM_ASSETS_DATA", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACT_ROOT", (tmp_path / "artifacts").as_uri())
    return data


def _table(out: str) -> dict[str, tuple[float, float]]:
    text = out.split("wall time per stage (Dagster step records):\n", 1)[1]
    lines = text.strip().splitlines()
    assert lines[0].split() == ["stage", "seconds", "share"]
    rows = {}
    for line in lines[1:]:
        match = ROW.match(line)
        assert match, f"not a table row: {line!r}"
        rows[match["label"]] = (float(match["seconds"]), float(match["share"]))
    return rows


def test_run_prints_wall_time_of_every_stage(tiny_lab, capsys):
    variants = ["autoencoder"]  # one variant keeps the test short; each variant gets its own rows
    assert run_main_job(SilentBar, variants=variants, run_config=TINY) == 0
    rows = _table(capsys.readouterr().out)
    expected = [
        "ingest (3 plates)",
        *(f"{stage} {v}" for v in variants for stage in ("train", "embed")),
        *(f"cluster {v}" for v in variants),
        "report",
        "other (run start-up, bookkeeping)",
        "total",
    ]
    assert list(rows) == expected
    assert all(seconds >= 0 and share >= 0 for seconds, share in rows.values())
    assert rows["ingest (3 plates)"][0] > 0 and rows["train autoencoder"][0] > 0  # real work was timed
    stages = sum(seconds for label, (seconds, _) in rows.items() if label != "total")
    assert stages == pytest.approx(rows["total"][0], abs=0.1 * len(rows))  # rows add up to the total
    assert rows["total"][1] == 100.0

    # A second run has nothing to ingest or train: the ingest row says 0 plates, clustering and report still run.
    assert run_main_job(SilentBar, variants=variants, run_config=TINY) == 0
    again = _table(capsys.readouterr().out)
    assert list(again) == [
        "ingest (0 plates)",
        *(f"cluster {v}" for v in variants),
        "report",
        "other (run start-up, bookkeeping)",
        "total",
    ]
    assert again["ingest (0 plates)"][0] == 0.0


def test_a_failed_run_is_reported_by_the_assets_own_error():
    """The one line `gbm-assets run` prints for a failed plate or variant names the asset's error,
    not Dagster's wrapper ("Error occurred while executing op ...")."""
    import dagster as dg

    from gbm_assets.pipeline import _first_error

    @dg.op
    def validate():
        raise ValueError("plate p1: manifest.csv line 3: no culture")

    @dg.job
    def ingest():
        validate()

    result = ingest.execute_in_process(raise_on_error=False)
    assert _first_error(result) == "ValueError: plate p1: manifest.csv line 3: no culture"
