"""Automation: new crops refresh trained variants and the report; the retraining schedule."""

from __future__ import annotations

import datetime as dt
import json

import dagster as dg

from gbm_assets.assets.automation import nightly_retraining, report_sensor, stale_variants_sensor
from gbm_assets.assets.resources import DataDirs
from gbm_assets.definitions import defs
from gbm_assets.models.variants import variant_names


def _materialized(instance, asset, partition=None):
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))


def _tick(sensor, instance, **resources):
    return sensor(dg.build_sensor_context(instance=instance, resources=resources or None))


def test_new_crops_refresh_only_trained_variants_once(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    data = DataDirs(root=str(tmp_path))
    assert not _tick(stale_variants_sensor, instance, data=data).run_requests
    (tmp_path / "encoders" / "siamese_b").mkdir(parents=True)
    (tmp_path / "encoders" / "siamese_b" / "run.json").write_text(json.dumps({"run_id": "x"}))
    _materialized(instance, "cell_crops", "plate1")
    first = _tick(stale_variants_sensor, instance, data=data)
    assert [(r.partition_key, r.tags["gbm/variant"]) for r in first.run_requests] == [("siamese_b", "siamese_b")]
    # A repeated tick asks for the same run key (Dagster launches it once).
    again = _tick(stale_variants_sensor, instance, data=data)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    _materialized(instance, "embeddings", "siamese_b")
    assert not _tick(stale_variants_sensor, instance, data=data).run_requests
    _materialized(instance, "cell_crops", "plate2")  # a new plate: a new run key
    later = _tick(stale_variants_sensor, instance, data=data)
    assert later.run_requests and later.run_requests[0].run_key != first.run_requests[0].run_key


def test_report_follows_clusters():
    instance = dg.DagsterInstance.ephemeral()
    assert not _tick(report_sensor, instance).run_requests
    _materialized(instance, "clusters", "siamese_b")
    assert len(_tick(report_sensor, instance).run_requests) == 1
    _materialized(instance, "composition_report")
    assert not _tick(report_sensor, instance).run_requests


def test_nightly_schedule_retrains_every_variant():
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(
            instance=instance, scheduled_execution_time=dt.datetime(2026, 11, 25, 2, 0)
        ) as context,
    ):
        requests = list(nightly_retraining(context))
    assert [r.partition_key for r in requests] == variant_names()
    assert len({r.run_key for r in requests}) == len(requests)


def test_named_jobs_exist():
    for name in ("ingest_plate", "train_all_variants", "update_variant", "cluster_all_variants", "refresh_report"):
        assert defs.resolve_job_def(name) is not None


def test_executor_is_deployment_configuration(monkeypatch):
    import sys
    import types

    import pytest

    from gbm_assets.definitions import configured_executor

    monkeypatch.delenv("GBM_EXECUTOR", raising=False)
    assert configured_executor() is None
    fake = types.ModuleType("dagster_celery")
    fake.celery_executor = object()
    monkeypatch.setitem(sys.modules, "dagster_celery", fake)
    monkeypatch.setenv("GBM_EXECUTOR", "celery")
    assert configured_executor() is fake.celery_executor
    monkeypatch.setenv("GBM_EXECUTOR", "spark")
    with pytest.raises(ValueError, match="GBM_EXECUTOR"):
        configured_executor()
