"""trained_encoders and embeddings: one partition per model variant, each reading all plates.

Training is one MLflow run per materialization; embedding and evaluation are logged to the
same run, so the MLflow UI shows a variant's loss curve, scores and confusion matrices together.
"""

import json
import subprocess
import time

import dagster as dg
import numpy as np
import pyarrow as pa

from gbm_assets import paths
from gbm_assets.analysis.safe_csv import to_csv_safe
from gbm_assets.assets.cells import cell_crops
from gbm_assets.assets.mlflow_tracking import MLflowTracking, MLflowUnavailable
from gbm_assets.assets.partitions import variants
from gbm_assets.assets.resources import DataDirs
from gbm_assets.models.variants import get_variant
from gbm_assets.staging import Staging
from gbm_assets.storage import AtomicParquetWriter, write_parquet_atomic

ALL_PLATES = dg.AssetDep(cell_crops, partition_mapping=dg.AllPartitionMapping())
# Training in two processes at once would share 2 cores badly and lock the SQLite MLflow store.
TF_POOL = "tensorflow"


class TrainingConfig(dg.Config):
    """Training budget. The default keeps the demo short on 2 cores; raise epochs for real data."""

    epochs: int = 2
    max_steps_per_epoch: int | None = 12  # None: a full pass over the crops per epoch
    batch_size: int = 128
    seed: int = 0
    max_crops: int | None = None  # seeded random subset of the crops (None: all)
    shuffle_buffer: int = 2048
    mlflow_retries: int = 3  # retries of the step while the MLflow server is unreachable
    mlflow_retry_wait_s: float = 60.0


class EmbeddingConfig(dg.Config):
    batch_size: int = 256
    eval_max_cells: int = 10_000  # cells sampled (seeded) for the random-forest evaluation
    seed: int = 0


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.project_root(), capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _retry_if_unreachable(exc: Exception, tracking: MLflowTracking, config: "TrainingConfig") -> None:
    """Ask Dagster to retry the step later when the tracking server is down (not for other errors)."""
    if isinstance(exc, MLflowUnavailable) or not tracking.reachable():
        raise dg.RetryRequested(max_retries=config.mlflow_retries, seconds_to_wait=config.mlflow_retry_wait_s) from exc


def _crop_plates(data: DataDirs) -> list[str]:
    return sorted(p.name.split("=", 1)[1] for p in data.crops.glob("plate=*") if (p / "part-0.parquet").is_file())


@dg.asset(
    partitions_def=variants,
    deps=[ALL_PLATES],
    group_name="models",
    kinds={"tensorflow", "mlflow"},
    pool=TF_POOL,
    description="One encoder per model variant (thesis Table 1), trained on crops of all plates; an MLflow run each.",
)
def trained_encoders(
    context: dg.AssetExecutionContext, config: TrainingConfig, data: DataDirs, mlflow_tracking: MLflowTracking
) -> dg.MaterializeResult:
    import keras
    import mlflow
    from mlflow.models import infer_signature

    from gbm_assets.models.dataset import CropSelection, count_crops, read_crop_size
    from gbm_assets.models.training import TrainConfig, limit_cpu_threads, train_encoder, usable_batch_size

    limit_cpu_threads()
    variant = get_variant(context.partition_key)
    try:
        mlflow_tracking.check_reachable()  # fail fast, before an hour of training is lost
    except MLflowUnavailable as exc:
        _retry_if_unreachable(exc, mlflow_tracking, config)
    plates_used = _crop_plates(data)
    crop_size = read_crop_size(data.crops)
    n_crops = count_crops(CropSelection.of(data.crops, None, config.max_crops, config.seed))
    batch_size = usable_batch_size(n_crops, config.batch_size, variant, data.crops)
    if batch_size < config.batch_size:
        context.log.warning(f"{variant.name}: only {n_crops} crops, fewer than one batch of {config.batch_size}: "
                            f"training in batches of {batch_size} (all crops per step)")
    train_config = TrainConfig(
        epochs=config.epochs, max_steps_per_epoch=config.max_steps_per_epoch, batch_size=config.batch_size,
        seed=config.seed, shuffle_buffer=config.shuffle_buffer, max_crops=config.max_crops,
    )
    retry = mlflow_tracking.retrying
    out_dir = data.encoder_dir(variant.name)
    final_encoder = out_dir / "encoder.keras"
    # The encoder and its record are staged beside the finals and swapped in only after the
    # run has ended FINISHED (model logged and registered): a failure anywhere leaves the
    # previous encoder and run.json as they were.
    with Staging() as stage:
        with mlflow_tracking.start_run(context, run_name=f"train-{variant.name}") as run:
            retry(mlflow.log_params, {
                "variant": variant.name, "kind": variant.kind, "features": variant.features,
                "lambda": variant.lambda_, "segmentation": variant.segmentation,
                "learning_rate": variant.learning_rate, "batch_size": batch_size, "configured_batch_size": config.batch_size,
                "epochs": config.epochs, "max_steps_per_epoch": config.max_steps_per_epoch, "crop_size": crop_size,
                "seed": config.seed, "n_crops": n_crops, "n_plates": len(plates_used), "git_commit": _git_commit(),
            })
            retry(mlflow.log_text, "\n".join(plates_used), "plates.txt")

            def on_epoch_end(epoch: int, row: dict) -> None:
                retry(mlflow.log_metrics, {"loss": row["loss"], "epoch_seconds": row["seconds"], "crops_per_s": row["crops_per_s"]}, step=epoch)
                context.log.info(f"{variant.name} epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f} ({row['seconds']:.1f} s)")

            context.log.info(f"training {variant.name} on {n_crops} crops from {len(plates_used)} plates")
            result = train_encoder(variant, data.crops, train_config, on_epoch_end=on_epoch_end)
            final_loss = float(result.history[-1]["loss"])
            if not np.isfinite(final_loss):
                raise RuntimeError(f"{variant.name}: training diverged (loss {final_loss}); nothing was saved")

            try:
                keras.saving.save_model(result.encoder, stage.path(final_encoder))
                example = np.zeros((2, crop_size, crop_size, 1), np.float32)
                registered = f"gbm-encoder-{variant.name}"
                info = mlflow.keras.log_model(
                    result.encoder, name="encoder", signature=infer_signature(example, result.encoder.predict_on_batch(example)),
                    registered_model_name=registered, pip_requirements=["tensorflow-cpu", "keras>=3"],
                )
                version = info.registered_model_version
                retry(mlflow.MlflowClient().set_registered_model_alias, registered, "current", version)
            except Exception as exc:
                _retry_if_unreachable(exc, mlflow_tracking, config)
                raise
            record = {"run_id": run.info.run_id, "model_uri": info.model_uri, "registered_model": registered,
                      "version": version, "trained_at": time.time()}
            stage.path(data.encoder_record(variant.name)).write_text(json.dumps(record, indent=2))
            url = mlflow_tracking.run_url(run)
        # The run ended FINISHED: the encoder replaces the old one, then its record (run.json) follows.
        stage.commit([final_encoder, data.encoder_record(variant.name)])
    return dg.MaterializeResult(
        metadata={
            "mlflow_run_id": run.info.run_id,
            "mlflow_run": dg.MetadataValue.url(url),
            "registered_model": f"{registered} v{version} (alias current)",
            "final_loss": final_loss,
            "n_crops": n_crops,
            "batch_size": result.batch_size,
            "n_plates": len(plates_used),
            "epochs": config.epochs,
            "seconds": float(sum(r["seconds"] for r in result.history)),
            "path": dg.MetadataValue.path(str(final_encoder)),
        }
    )


@dg.asset(
    partitions_def=variants,
    deps=[trained_encoders],
    group_name="models",
    kinds={"tensorflow", "parquet"},
    pool=TF_POOL,
    description="Every crop's embedding (and its rotation/flip-invariant mean) with full provenance; scored like the thesis.",
)
def embeddings(
    context: dg.AssetExecutionContext, config: EmbeddingConfig, data: DataDirs, mlflow_tracking: MLflowTracking
) -> dg.MaterializeResult:
    import keras
    import mlflow

    from gbm_assets.analysis.truth import has_truth, true_morphotypes
    from gbm_assets.analysis.variant_evaluation import evaluate_variant, raw_pixels_for, skipped_targets
    from gbm_assets.models.dataset import CropSelection, count_crops, iter_crop_batches
    from gbm_assets.models.embedding_table import embedding_batch, embedding_schema, sample_embeddings
    from gbm_assets.models.training import embed_batch_both, limit_cpu_threads

    limit_cpu_threads()
    variant = get_variant(context.partition_key)
    record = json.loads(data.encoder_record(variant.name).read_text())
    encoder = keras.saving.load_model(data.encoder_dir(variant.name) / "encoder.keras", compile=False)
    total = count_crops(CropSelection.of(data.crops))
    out = data.embeddings_file(variant.name)
    eval_dir = data.evaluation / variant.name
    retry = mlflow_tracking.retrying
    # Embeddings and the evaluation folder are staged, logged, and only then swapped in
    # (embeddings first, then the evaluation files, pruning confusion matrices of targets no
    # longer scored): a failure anywhere leaves the previous ones as they were.
    with Staging() as stage:
        staged_out = stage.path(out)
        done, started, next_log = 0, time.time(), 0.0
        with AtomicParquetWriter(staged_out, embedding_schema(variant.features)) as writer:
            for rows, pixels in iter_crop_batches(data.crops, config.batch_size):
                writer.write(embedding_batch(rows, *embed_batch_both(encoder, pixels)))
                done += len(rows)
                if done / total >= next_log or done == total:
                    context.log.info(f"{variant.name}: embedded {done}/{total} crops ({done / max(time.time() - started, 1e-9):.0f}/s)")
                    next_log += 0.1
        seconds = time.time() - started

        rows, vectors = sample_embeddings(staged_out, config.eval_max_cells, seed=config.seed)
        truth = true_morphotypes(rows, data.raw)
        if has_truth(truth):
            rows["morphotype"] = truth
        features = {**vectors, "raw_pixels": raw_pixels_for(data.crops, rows["crop_id"])}
        staged_eval = stage.directory(eval_dir)
        scores, figures = evaluate_variant(rows, features, staged_eval, variant.name, seed=config.seed)
        write_parquet_atomic(pa.Table.from_pandas(scores, preserve_index=False), staged_eval / "scores.parquet")
        skipped = skipped_targets(scores)
        for target, reason in skipped.items():
            context.log.warning(f"{variant.name}: {target} not evaluated: {reason}")
        scored = scores[scores["skipped"] == ""]
        with mlflow_tracking.start_run(context, run_name="", run_id=record["run_id"]) as run:
            retry(mlflow.log_metrics, {"embedding_seconds": seconds, "embedded_crops_per_s": done / max(seconds, 1e-9), "n_embedded": done})
            retry(mlflow.log_metrics, {f"{r.feature_set}.{r.target}.{m}": getattr(r, m) for r in scored.itertuples() for m in ("accuracy", "kappa", "majority_baseline")})
            if skipped:
                retry(mlflow.set_tags, {f"gbm.evaluation.{target}": f"not evaluated: {reason}" for target, reason in skipped.items()})
            retry(mlflow.log_text, to_csv_safe(scores, index=False), "evaluation/scores.csv")
            for fig in figures:
                retry(mlflow.log_artifact, str(fig), "evaluation")
            url = mlflow_tracking.run_url(run)
        stage.commit([out, eval_dir])
    table = scored.pivot_table(index="feature_set", columns="target", values="accuracy").round(3) if len(scored) else None
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "n_crops": done,
            "crops_per_s": done / max(seconds, 1e-9),
            "mlflow_run": dg.MetadataValue.url(url),
            "accuracy": dg.MetadataValue.md(table.to_markdown() if table is not None else "no target could be evaluated"),
            **({"not_evaluated": dg.MetadataValue.md("\n".join(f"- {t}: {r}" for t, r in skipped.items()))} if skipped else {}),
            **{f"{r.feature_set}_{r.target}_kappa": float(r.kappa) for r in scored.itertuples()},
        }
    )
