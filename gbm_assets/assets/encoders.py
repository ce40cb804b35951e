"""trained_encoders and embeddings: one partition per model variant, each reading all plates.

Training is one MLflow run per materialization; embedding and evaluation are logged to the
same run, so the MLflow UI shows a variant's loss curve, scores and confusion matrices together.
"""

import json
import subprocess
import time
from functools import partial

import dagster as dg
import numpy as np
import pyarrow as pa

from gbm_assets import paths
from gbm_assets.analysis.safe_csv import to_csv_safe
from gbm_assets.assets.cells import cell_crops
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import variants
from gbm_assets.assets.resources import DataDirs, core_params
from gbm_assets.models.variants import Variant, get_variant
from gbm_assets.staging import Staging
from gbm_assets.storage import write_parquet_atomic

ALL_PLATES = dg.AssetDep(cell_crops, partition_mapping=dg.AllPartitionMapping())
# Training in two processes at once would share 2 cores badly and lock the SQLite MLflow store.
TF_POOL = "tensorflow"


class TrainingConfig(dg.Config):
    """Training budget: whichever comes first of `epochs`, `max_minutes` of wall-clock time and a
    loss plateau (`patience` epochs without a relative improvement of `min_delta`); None switches
    the time limit or the plateau rule off. The defaults (2 epochs of 12 batches, no time limit)
    keep the demo short on 2 cores and reproducible: a time limit cuts at a step that depends on
    the machine's speed and load. For real data raise epochs and unset max_steps_per_epoch, with
    max_minutes as a ceiling if you need one.

    params() gives the core's models.training.TrainConfig (fields of the same name).
    """

    epochs: int = 2
    max_steps_per_epoch: int | None = 12  # None: a full pass over the crops per epoch
    max_minutes: float | None = None  # wall-clock limit of training, per variant (None: none)
    patience: int | None = 3  # epochs without improvement before stopping (None: never)
    min_delta: float = 0.01  # relative loss improvement that counts (0.01: 1 %)
    batch_size: int = 128
    seed: int = 0
    max_crops: int | None = None  # seeded random subset of the crops (None: all)
    shuffle_buffer: int = 2048
    mlflow_retries: int = 3  # retries of the step while the MLflow server is unreachable
    mlflow_retry_wait_s: float = 60.0

    def params(self):
        from gbm_assets.models.training import TrainConfig

        return core_params(self, TrainConfig)


class EmbeddingConfig(dg.Config):
    batch_size: int = 256
    eval_max_cells: int = 10_000  # cells sampled (seeded) for the random-forest evaluation
    seed: int = 0


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=paths.project_root(), capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _training_params(variant: Variant, plan, config: TrainingConfig) -> dict:
    """The MLflow params of a training run."""
    return {
        "variant": variant.name,
        "kind": variant.kind,
        "features": variant.features,
        "lambda": variant.lambda_,
        "segmentation": variant.segmentation,
        "projector": variant.projector_width if variant.projector else 0,  # its width; 0: none
        **variant.distortions,  # geometric, photometric, background_fill, input_mask, both_views
        "downsample": variant.downsample,  # pixel blocks averaged before the first convolution
        "learning_rate": variant.learning_rate,
        "batch_size": plan.batch_size,
        "configured_batch_size": config.batch_size,
        "epochs": config.epochs,
        "max_steps_per_epoch": config.max_steps_per_epoch,
        "max_minutes": config.max_minutes,
        "patience": config.patience,
        "min_delta": config.min_delta,
        "crop_size": plan.crop_size,
        "seed": config.seed,
        "n_crops": plan.n_crops,
        "n_plates": len(plan.plates),
        "git_commit": _git_commit(),
    }


def _epoch_logger(context, mlflow_tracking: MLflowTracking, variant: str, epochs: int):
    """train_encoder's on_epoch_end hook: the epoch's loss, seconds and crops/s to MLflow and the Dagster log."""
    import mlflow

    def on_epoch_end(epoch: int, row: dict) -> None:
        mlflow_tracking.retrying(
            mlflow.log_metrics,
            {"loss": row["loss"], "epoch_seconds": row["seconds"], "crops_per_s": row["crops_per_s"]},
            step=epoch,
        )
        context.log.info(f"{variant} epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} ({row['seconds']:.1f} s)")

    return on_epoch_end


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
    """Train the variant's encoder, log it to MLflow (registered, alias current), then swap it in.

    The encoder and its record (run.json) are staged beside the finals and swapped in only after
    the run has ended FINISHED: a failure anywhere leaves the previous encoder and record as
    they were. An unreachable tracking server makes Dagster retry the step later.
    """
    import mlflow

    from gbm_assets.models.device import use_training_device
    from gbm_assets.models.training import limit_cpu_threads, plan_training, train_encoder

    limit_cpu_threads()
    device = use_training_device()  # the first GPU TensorFlow sees (mixed precision where it pays), else the CPU
    variant, retry = get_variant(context.partition_key), mlflow_tracking.retrying
    unreachable = partial(mlflow_tracking.retry_step_if_unreachable, config.mlflow_retries, config.mlflow_retry_wait_s)
    with unreachable():
        mlflow_tracking.check_reachable()  # fail fast, before an hour of training is lost
    plan = plan_training(variant, data.crops, config.params())
    if plan.batch_size < config.batch_size:
        context.log.warning(
            f"{variant.name}: only {plan.n_crops} crops, fewer than one batch of {config.batch_size}: "
            f"training in batches of {plan.batch_size} (all crops per step)"
        )
    final_encoder, final_record = data.encoder_file(variant.name), data.encoder_record(variant.name)
    with Staging() as stage:
        with mlflow_tracking.start_run(context, run_name=f"train-{variant.name}") as run:
            retry(mlflow.log_params, {**_training_params(variant, plan, config), **device.mlflow_params()})
            retry(mlflow.log_text, "\n".join(plan.plates), "plates.txt")
            context.log.info(f"training {variant.name} on {plan.n_crops} crops from {len(plan.plates)} plates")
            result = train_encoder(
                variant,
                data.crops,
                config.params(),
                plan=plan,
                on_epoch_end=_epoch_logger(context, mlflow_tracking, variant.name, config.epochs),
            )
            final_loss = float(result.history[-1]["loss"])
            retry(mlflow.log_param, "stopped_by", result.stopped_by)
            retry(
                mlflow.log_metrics,
                {"epochs_run": result.epochs, "steps_run": result.steps, "training_minutes": result.minutes},
            )
            context.log.info(
                f"{variant.name}: training stopped by {result.stopped_by} after {result.epochs} epochs, "
                f"{result.steps} steps, {result.minutes:.2f} min"
            )
            if not np.isfinite(final_loss):
                raise RuntimeError(f"{variant.name}: training diverged (loss {final_loss}); nothing was saved")
            with unreachable():
                record = mlflow_tracking.log_encoder(
                    result.encoder, f"gbm-encoder-{variant.name}", stage.path(final_encoder), plan.crop_size
                )
            stage.path(final_record).write_text(json.dumps({**record, "trained_at": time.time()}, indent=2))
            url = mlflow_tracking.run_url(run)
        stage.commit([final_encoder, final_record])  # the run ended FINISHED: encoder first, then its record
    return dg.MaterializeResult(
        metadata={
            "mlflow_run_id": run.info.run_id,
            "mlflow_run": dg.MetadataValue.url(url),
            "registered_model": f"{record['registered_model']} v{record['version']} (alias current)",
            "final_loss": final_loss,
            "n_crops": plan.n_crops,
            "batch_size": result.batch_size,
            "n_plates": len(plan.plates),
            "stopped_by": result.stopped_by,
            "epochs": result.epochs,
            "configured_epochs": config.epochs,
            "steps": result.steps,
            "minutes": round(result.minutes, 3),
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
    """Embed every crop (models.training.write_embeddings), score the embeddings, log to the training run, swap in.

    Embeddings and the evaluation folder are staged, logged, and only then swapped in
    (embeddings first, then the evaluation files, pruning confusion matrices of targets no
    longer scored): a failure anywhere leaves the previous ones as they were.
    """
    from gbm_assets.analysis.variant_evaluation import accuracy_table, image_split, plate_split
    from gbm_assets.models.training import limit_cpu_threads, write_embeddings

    limit_cpu_threads()
    variant = get_variant(context.partition_key)
    record = json.loads(data.encoder_record(variant.name).read_text())
    encoder = mlflow_tracking.load_encoder(data.encoder_file(variant.name))
    out, eval_dir = data.embeddings_file(variant.name), data.evaluation_dir(variant.name)
    with Staging() as stage:
        staged_out = stage.path(out)
        done, seconds = write_embeddings(
            encoder,
            data.crops,
            staged_out,
            config.batch_size,
            on_progress=lambda n, total, rate: context.log.info(
                f"{variant.name}: embedded {n}/{total} crops ({rate:.0f}/s)"
            ),
            input_mask=variant.input_mask,  # "cell": reads the mask column, embeds the cell alone
        )
        scores, figures = _evaluate(context, config, data, variant.name, staged_out, stage.directory(eval_dir))
        scored, skipped = _scored(scores)
        url = _log_embedding_run(context, mlflow_tracking, record["run_id"], done, seconds, scores, figures)
        stage.commit([out, eval_dir])
    table = accuracy_table(scored)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "n_crops": done,
            "crops_per_s": done / max(seconds, 1e-9),
            "mlflow_run": dg.MetadataValue.url(url),
            "accuracy": dg.MetadataValue.md(
                table.to_markdown() if table is not None else "no target could be evaluated"
            ),
            **(
                {"not_evaluated": dg.MetadataValue.md("\n".join(f"- {t}: {r}" for t, r in skipped.items()))}
                if skipped
                else {}
            ),
            **{f"{r.feature_set}_{r.target}_kappa": float(r.kappa) for r in image_split(scored).itertuples()},
            **{
                f"{r.feature_set}_{r.target}_plate_split_kappa": float(r.kappa)
                for r in plate_split(scored).itertuples()
            },
        }
    )


def _scored(scores):
    """(rows of scores that were evaluated, {target: why not evaluated})."""
    from gbm_assets.analysis.variant_evaluation import skipped_targets

    return scores[scores["skipped"] == ""], skipped_targets(scores)


def _evaluate(context, config: EmbeddingConfig, data: DataDirs, variant: str, embeddings_path, eval_dir):
    """Score a seeded sample of the embeddings beside the baselines (raw pixels, hand-crafted features), by
    image and by plate, random forest and linear probe; write scores.parquet and figures into eval_dir."""
    from gbm_assets.analysis.truth import has_truth, true_morphotypes
    from gbm_assets.analysis.variant_evaluation import evaluate_with_baselines
    from gbm_assets.models.embedding_table import sample_embeddings

    rows, vectors = sample_embeddings(embeddings_path, config.eval_max_cells, seed=config.seed)
    truth = true_morphotypes(rows, data.raw)
    if has_truth(truth):
        rows["morphotype"] = truth
    scores, figures = evaluate_with_baselines(
        rows, vectors, data.crops, eval_dir, variant, seed=config.seed, cache_dir=data.baseline_cache
    )
    write_parquet_atomic(pa.Table.from_pandas(scores, preserve_index=False), eval_dir / "scores.parquet")
    for target, reason in _scored(scores)[1].items():
        context.log.warning(f"{variant}: {target} not evaluated: {reason}")
    return scores, figures


def _log_embedding_run(
    context, mlflow_tracking: MLflowTracking, run_id: str, done: int, seconds: float, scores, figures
) -> str:
    """Add embedding speed, scores and figures to the encoder's training run; return its URL."""
    import mlflow

    from gbm_assets.analysis.variant_evaluation import evaluation_params, score_metrics

    retry = mlflow_tracking.retrying
    scored, skipped = _scored(scores)
    with mlflow_tracking.start_run(context, run_name="", run_id=run_id) as run:
        retry(
            mlflow.log_metrics,
            {"embedding_seconds": seconds, "embedded_crops_per_s": done / max(seconds, 1e-9), "n_embedded": done},
        )
        retry(mlflow.log_params, evaluation_params())
        retry(mlflow.log_metrics, score_metrics(scored))  # fold means, and their sd as "..._sd"
        if skipped:
            retry(
                mlflow.set_tags,
                {f"gbm.evaluation.{target}": f"not evaluated: {reason}" for target, reason in skipped.items()},
            )
        retry(mlflow.log_text, to_csv_safe(scores, index=False), "evaluation/scores.csv")
        for fig in figures:
            retry(mlflow.log_artifact, str(fig), "evaluation")
        return mlflow_tracking.run_url(run)
