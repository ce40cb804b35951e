"""The training budget: epochs, a wall-clock limit and a loss plateau, whichever comes first (issue 13 item 1)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gbm_assets.models.training import limit_cpu_threads  # noqa: E402

limit_cpu_threads(2, 1)

from gbm_assets.errors import InputError  # noqa: E402
from gbm_assets.imaging.synthetic_crops import write_synthetic_crops  # noqa: E402
from gbm_assets.models.training import LossPlateau, TrainConfig, TrainingBudget, plan_training, train_encoder  # noqa: E402
from gbm_assets.models.variants import get_variant  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory) -> Path:
    return write_synthetic_crops(tmp_path_factory.mktemp("crops") / "cell_crops.parquet", size=SIZE)


def test_time_budget_stops_training_within_the_first_epoch(crops_dir):
    config = TrainConfig(epochs=5, max_steps_per_epoch=3, batch_size=16, seed=0, max_minutes=0.001)
    result = train_encoder(get_variant("autoencoder"), crops_dir, config)
    assert result.stopped_by == "max_minutes"
    # 0.06 s is spent in the first step (graph tracing alone takes longer): one step, one partial epoch.
    assert result.epochs == 1 < config.epochs and result.steps == 1
    assert [row["steps"] for row in result.history] == [1]
    assert result.minutes >= 0.001


def test_all_epochs_run_when_no_limit_fires(crops_dir):
    config = TrainConfig(epochs=2, max_steps_per_epoch=3, batch_size=16, seed=0, max_minutes=60.0, patience=5)
    result = train_encoder(get_variant("autoencoder"), crops_dir, config)
    assert result.stopped_by == "epochs" and result.epochs == 2 and result.steps == 6
    assert [row["steps"] for row in result.history] == [3, 3]
    assert 0 < result.minutes < 60.0


def test_plateau_stops_siamese_training(crops_dir):
    # No epoch can improve by 100 % of the best loss: with patience 2, epochs 1 and 2 fail, training stops after 3.
    config = TrainConfig(epochs=6, max_steps_per_epoch=2, batch_size=16, seed=3, patience=2, min_delta=1.0)
    result = train_encoder(get_variant("siamese_f"), crops_dir, config)
    assert result.stopped_by == "plateau" and result.epochs == 3 and result.steps == 6


@pytest.mark.parametrize(
    ("losses", "patience", "min_delta", "stops_at"),
    [
        ([5.0, 5.0, 5.0, 5.0], 2, 0.0, 2),  # constant loss: no improvement after the first epoch
        ([10.0, 9.0, 8.95, 8.94, 8.93], 2, 0.01, 3),  # 9.0 improves by 10 %; 8.95 and 8.94 by < 1 %
        ([10.0, 9.0, 8.0, 7.0, 6.0], 1, 0.01, None),  # steady progress never plateaus
        ([10.0, float("nan"), 9.0], 1, 0.01, 1),  # a non-finite loss is no improvement
        ([-2.0, -2.01, -2.5], 1, 0.01, 1),  # relative to |best| for negative losses too
    ],
)
def test_loss_plateau_rule(losses, patience, min_delta, stops_at):
    rule = LossPlateau(patience, min_delta)
    stops = [rule.update(loss) for loss in losses]
    assert (stops.index(True) if True in stops else None) == stops_at


def test_time_budget_callback_reads_its_clock():
    class Model:
        stop_training = False

    now = [0.0]
    budget = TrainingBudget("loss", max_minutes=0.5, patience=None, min_delta=0.0, clock=lambda: now[0])
    budget.set_model(Model())
    budget.on_train_begin()
    now[0] = 29.0
    budget.on_train_batch_end(0)
    assert not budget.model.stop_training and budget.stopped_by == "epochs"
    now[0] = 30.0
    budget.on_train_batch_end(1)
    assert budget.model.stop_training and budget.stopped_by == "max_minutes" and budget.minutes == 0.5


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be >= 1"),
        ("max_minutes", 0.0, "max_minutes must be > 0"),
        ("patience", 0, "patience must be >= 1"),
        ("min_delta", -0.1, "min_delta must be >= 0"),
    ],
)
def test_budget_that_cannot_train_is_refused_before_training(crops_dir, field, value, message):
    config = TrainConfig(**{"epochs": 1, "batch_size": 16, field: value})
    with pytest.raises(InputError, match=message):
        plan_training(get_variant("autoencoder"), crops_dir, config)


def test_budget_and_stop_reason_land_in_mlflow_and_dagster_metadata(crops_dir, tmp_path):
    """trained_encoders logs the budget as MLflow params, what stopped training as a param and
    metrics, and the same in its Dagster metadata."""
    import shutil

    import dagster as dg
    import mlflow

    from gbm_assets.assets.encoders import trained_encoders
    from gbm_assets.assets.mlflow_tracking import MLflowTracking
    from gbm_assets.assets.resources import DataDirs

    data = DataDirs(root=str(tmp_path / "data"))
    shutil.copytree(crops_dir, data.crops)
    tracking = MLflowTracking(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "artifacts").as_uri()
    )
    budget = {"epochs": 4, "max_steps_per_epoch": 3, "batch_size": 16, "max_minutes": 0.001, "patience": 2}
    result = dg.materialize(
        [trained_encoders],
        partition_key="autoencoder",
        instance=dg.DagsterInstance.ephemeral(),
        resources={"data": data, "mlflow_tracking": tracking},
        run_config={"ops": {"trained_encoders": {"config": budget}}},
    )
    assert result.success
    meta = {k: v.value for k, v in result.asset_materializations_for_node("trained_encoders")[0].metadata.items()}
    assert meta["stopped_by"] == "max_minutes" and meta["epochs"] == 1 and meta["configured_epochs"] == 4
    assert meta["steps"] == 1 and meta["minutes"] >= 0.001
    mlflow.set_tracking_uri(tracking.resolved_uri())
    run = mlflow.MlflowClient().get_run(meta["mlflow_run_id"])
    params, metrics = run.data.params, run.data.metrics
    assert params["max_minutes"] == "0.001" and params["patience"] == "2" and params["min_delta"] == "0.01"
    assert params["epochs"] == "4" and params["stopped_by"] == "max_minutes"
    assert metrics["epochs_run"] == 1 and metrics["steps_run"] == 1 and metrics["training_minutes"] >= 0.001
