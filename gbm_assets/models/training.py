"""Training one encoder variant on the streamed crops, and embedding crops with it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

from gbm_assets.errors import InputError  # noqa: E402
from gbm_assets.imaging.crop_dataset import (  # noqa: E402
    CropSelection,
    count_crops,
    crop_plates,
    iter_crop_batches,
    iter_record_batches,
    read_crop_size,
)
from gbm_assets.imaging.crops import decode_crops  # noqa: E402
from gbm_assets.models.augmentation import INPUT_MASKS, dihedral_views, dilate_masks, mask_input  # noqa: E402
from gbm_assets.models.dataset import training_dataset  # noqa: E402
from gbm_assets.models.embedding_table import embedding_batch, embedding_schema  # noqa: E402
from gbm_assets.models.encoders import build_autoencoder, build_projector, build_siamese_encoder  # noqa: E402
from gbm_assets.models.losses import barlow_twins_loss  # noqa: E402
from gbm_assets.models.variants import Variant  # noqa: E402
from gbm_assets.schema import PROVENANCE_COLUMNS  # noqa: E402
from gbm_assets.storage import AtomicParquetWriter  # noqa: E402


def limit_cpu_threads(intra_op: int = 2, inter_op: int = 1) -> None:
    """Cap TensorFlow's thread pools (must run before TF's first op; later calls are no-ops)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        pass


STOP_REASONS = ("epochs", "max_minutes", "plateau")


@dataclass
class TrainConfig:
    """What one training run may spend and on which crops.

    Training stops at whichever comes first: `epochs` epochs; `max_minutes` of wall-clock time
    in model.fit (checked after every step, so a run overshoots by at most one step); or a loss
    plateau: `patience` epochs in a row whose training loss is not below the best so far by the
    relative margin `min_delta` (loss < best - min_delta * |best|). None switches the time
    budget or the plateau rule off.
    """

    epochs: int = 10
    max_steps_per_epoch: int | None = None  # None: one pass over the selected crops
    max_minutes: float | None = None  # wall-clock budget of model.fit, minutes
    patience: int | None = None  # epochs without relative improvement min_delta before stopping
    min_delta: float = 0.01  # relative improvement of the training loss that resets patience
    batch_size: int = 128
    crop_size: int | None = None  # None: as stored; else checked against the dataset
    seed: int = 0
    shuffle_buffer: int = 2048  # crops held for shuffling (bounds memory)
    plates: tuple[str, ...] | None = None  # None: all plates
    max_crops: int | None = None  # seeded random subset for quick runs


@dataclass
class TrainResult:
    encoder: keras.Model  # the functional encoder, ready for embedding and logging
    history: list[dict]  # per epoch run: epoch (0-based), loss, seconds, steps, crops_per_s
    n_crops: int
    batch_size: int = 0  # the batch size used (usable_batch_size of the configured one)
    stopped_by: str = "epochs"  # one of STOP_REASONS: what ended training
    steps: int = 0  # optimizer steps run, all epochs together
    minutes: float = 0.0  # wall-clock minutes of model.fit

    @property
    def epochs(self) -> int:
        """Epochs run (the last one partial when the time budget cut it)."""
        return len(self.history)


@dataclass(frozen=True)
class TrainingPlan:
    """What a training run will use, known before it starts (for logging and warnings)."""

    selection: CropSelection
    n_crops: int  # crops selected
    crop_size: int  # crop side S, pixels
    batch_size: int  # usable_batch_size of the configured one
    steps_per_epoch: int
    plates: tuple[str, ...]  # plates with a crops file that the selection reads


def min_batch_size(variant: Variant) -> int:
    """Smallest batch a variant trains on: 2 for Barlow Twins (features are standardised over
    the batch, which needs two crops), 1 for the autoencoder."""
    return 1 if variant.kind == "autoencoder" else 2


def usable_batch_size(n_crops: int, configured: int, variant: Variant, where="crops") -> int:
    """The batch size training uses: the configured one, or all n_crops when there are fewer.

    Every step takes one full batch (no ragged last batch), so the largest batch the data allow
    is n_crops. Raises InputError (naming `where`) when n_crops is below min_batch_size(variant).
    """
    if configured < 1:
        raise InputError(where, f"batch size must be >= 1, got {configured}")
    minimum = min_batch_size(variant)
    if n_crops < minimum:
        why = " (Barlow Twins standardises each feature over a batch of >= 2 crops)" if minimum > 1 else ""
        raise InputError(
            where,
            f"{n_crops} crop{'s' if n_crops != 1 else ''} selected: training {variant.name} "
            f"needs at least {minimum}{why}",
        )
    return min(configured, n_crops)


class BarlowTwins(keras.Model):
    """Siamese wrapper: one shared encoder, trained on the Barlow Twins loss of a pair.

    With a projector (models.encoders.build_projector, the paper's head) the loss is taken on
    projector(encoder(view)) and both are trained; the caller keeps the encoder alone for
    embedding, so the head is dropped after training. The loss is reported as 'bt_loss'
    through its own Mean tracker: a custom train_step returning 'loss' after compile() without
    a loss shows 0.0 in Keras 3.
    """

    def __init__(self, encoder: keras.Model, lambda_: float, projector: keras.Model | None = None, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.projector = projector
        self.lambda_ = lambda_
        self.loss_tracker = keras.metrics.Mean(name="bt_loss")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, inputs, training=False):
        return self.encoder(inputs, training=training)

    def train_step(self, data):
        view1, view2 = data
        with tf.GradientTape() as tape:
            z1 = self.encoder(view1, training=True)
            z2 = self.encoder(view2, training=True)
            if self.projector is not None:
                z1, z2 = self.projector(z1, training=True), self.projector(z2, training=True)
            loss = barlow_twins_loss(z1, z2, self.lambda_)
        weights = self.encoder.trainable_variables
        if self.projector is not None:
            weights = weights + self.projector.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights, strict=False))
        self.loss_tracker.update_state(loss)
        return {"bt_loss": self.loss_tracker.result()}


class EpochLog(keras.callbacks.Callback):
    """Collects loss, steps and throughput per epoch and forwards them to the caller's hook.

    crops_per_s counts batch_size crops per step run when batch_size is given (an epoch cut
    short by the time budget counts only its steps), else crops_per_epoch.
    """

    def __init__(
        self,
        loss_key: str,
        crops_per_epoch: int,
        hook: Callable[[int, dict], None] | None,
        batch_size: int | None = None,
    ):
        super().__init__()
        self.loss_key, self.crops_per_epoch, self.hook, self.batch_size = loss_key, crops_per_epoch, hook, batch_size
        self.history: list[dict] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started, self.steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        crops = self.crops_per_epoch if self.batch_size is None else self.steps * self.batch_size
        row = {
            "epoch": epoch,
            "loss": float(logs[self.loss_key]),
            "seconds": seconds,
            "steps": self.steps,
            "crops_per_s": crops / seconds,
        }
        self.history.append(row)
        if self.hook is not None:
            self.hook(epoch, row)


class LossPlateau:
    """The plateau rule of TrainConfig: update(loss) is True once `patience` losses in a row
    failed to improve on the best so far by the relative margin min_delta.

    A non-finite loss never counts as an improvement. Raises ValueError for patience < 1 or a
    negative min_delta.
    """

    def __init__(self, patience: int, min_delta: float):
        if patience < 1 or min_delta < 0:
            raise ValueError(f"patience must be >= 1 and min_delta >= 0, got {patience} and {min_delta}")
        self.patience, self.min_delta = patience, min_delta
        self.best, self.wait = float("inf"), 0

    def update(self, loss: float) -> bool:
        if np.isfinite(loss) and (not np.isfinite(self.best) or loss < self.best - self.min_delta * abs(self.best)):
            self.best, self.wait = loss, 0
        else:
            self.wait += 1
        return self.wait >= self.patience


class TrainingBudget(keras.callbacks.Callback):
    """Stops model.fit when max_minutes of wall-clock time are spent (checked after every step)
    or when the epoch loss plateaus (LossPlateau, checked after every epoch); records why in
    stopped_by ("epochs" while neither fired) and the minutes spent since fit began."""

    def __init__(
        self, loss_key: str, max_minutes: float | None, patience: int | None, min_delta: float, clock=time.perf_counter
    ):
        super().__init__()
        self.loss_key, self.max_minutes, self.clock = loss_key, max_minutes, clock
        self.plateau = None if patience is None else LossPlateau(patience, min_delta)
        self.stopped_by, self.started, self.minutes = "epochs", None, 0.0

    def _stop(self, reason: str) -> None:
        self.stopped_by = reason
        self.model.stop_training = True

    def on_train_begin(self, logs=None):
        self.started = self.clock()

    def on_train_batch_end(self, batch, logs=None):
        self.minutes = (self.clock() - self.started) / 60.0
        if self.max_minutes is not None and self.minutes >= self.max_minutes:
            self._stop("max_minutes")

    def on_epoch_end(self, epoch, logs=None):
        if self.stopped_by == "epochs" and self.plateau is not None and self.plateau.update(float(logs[self.loss_key])):
            self._stop("plateau")

    def on_train_end(self, logs=None):
        self.minutes = (self.clock() - self.started) / 60.0


def build_trainable(variant: Variant, crop_size: int) -> tuple[keras.Model, keras.Model, str]:
    """(compiled model to fit, its functional encoder, the history key of its loss).

    A siamese variant with projector=True trains BarlowTwins with the paper's projector head
    (build_projector(variant.features, variant.projector_width)); the encoder returned, which
    is what gets embedded, saved and logged, has no head: its output is variant.features wide.
    """
    optimizer = keras.optimizers.Adam(learning_rate=variant.learning_rate)
    if variant.kind == "autoencoder":
        model, encoder = build_autoencoder(crop_size, variant.features)
        model.compile(optimizer=optimizer, loss="mse")
        return model, encoder, "loss"
    encoder = build_siamese_encoder(crop_size, variant.features, variant.downsample)
    projector = build_projector(variant.features, variant.projector_width) if variant.projector else None
    model = BarlowTwins(encoder, variant.lambda_, projector)
    model.compile(optimizer=optimizer)
    return model, encoder, "bt_loss"


def plan_training(variant: Variant, crops_dir, config: TrainConfig) -> TrainingPlan:
    """The crops, crop size, batch size and steps a training run of `variant` will use.

    Raises InputError (naming crops_dir) when the dataset is missing or empty, when fewer crops
    than min_batch_size(variant) are selected, or when config.crop_size differs from the
    stored crops, and (check_budget) for a budget that cannot train.
    """
    check_budget(config)
    selection = CropSelection.of(crops_dir, config.plates, config.max_crops, config.seed)
    n_crops = count_crops(selection)
    batch_size = usable_batch_size(n_crops, config.batch_size, variant, crops_dir)
    crop_size = read_crop_size(crops_dir)
    if config.crop_size not in (None, crop_size):
        raise InputError(crops_dir, f"crops are {crop_size}x{crop_size}, the config asks for {config.crop_size}")
    steps = n_crops // batch_size
    if config.max_steps_per_epoch is not None:
        steps = min(steps, config.max_steps_per_epoch)
    plates = tuple(p for p in crop_plates(crops_dir) if config.plates is None or p in config.plates)
    return TrainingPlan(selection, n_crops, crop_size, batch_size, steps, plates)


def train_encoder(
    variant: Variant,
    crops_dir,
    config: TrainConfig,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    plan: TrainingPlan | None = None,
) -> TrainResult:
    """Train one variant on streamed, freshly augmented crops, within the budget of config.

    An epoch is one pass over the selected crops, or max_steps_per_epoch batches if smaller;
    the stream continues where the previous epoch stopped, so short epochs still cover the data.
    Training stops at whichever comes first of config.epochs, config.max_minutes (wall-clock,
    checked after every step) and a loss plateau (config.patience, config.min_delta); the result
    says which (stopped_by: "epochs", "max_minutes" or "plateau"; "epochs" whenever every planned
    step ran), with the steps run and the minutes spent. Deterministic given config.seed (weights,
    losses, and where the plateau rule stops), except where the time budget cuts: how many steps
    fit in max_minutes depends on the machine and its load.
    on_epoch_end(epoch, row) receives each history row (for progress logs and MLflow metrics).
    Fewer crops than config.batch_size train in batches of all the crops (usable_batch_size,
    reported as TrainResult.batch_size); fewer than min_batch_size(variant) raise InputError, as
    do epochs < 1, max_minutes <= 0, patience < 1 or min_delta < 0.
    plan: plan_training(variant, crops_dir, config) when the caller already made it.
    """
    check_budget(config)
    keras.utils.set_random_seed(config.seed)
    plan = plan or plan_training(variant, crops_dir, config)
    model, encoder, loss_key = build_trainable(variant, plan.crop_size)
    data = training_dataset(plan.selection, variant, plan.batch_size, config.shuffle_buffer, plan.crop_size)
    log = EpochLog(loss_key, plan.steps_per_epoch * plan.batch_size, on_epoch_end, batch_size=plan.batch_size)
    budget = TrainingBudget(loss_key, config.max_minutes, config.patience, config.min_delta)
    model.fit(
        data,
        epochs=config.epochs,
        steps_per_epoch=plan.steps_per_epoch,
        callbacks=[log, budget],
        shuffle=False,
        verbose=0,
    )
    steps = sum(row["steps"] for row in log.history)
    stopped_by = "epochs" if steps >= config.epochs * plan.steps_per_epoch else budget.stopped_by
    return TrainResult(
        encoder=encoder,
        history=log.history,
        n_crops=plan.n_crops,
        batch_size=plan.batch_size,
        stopped_by=stopped_by,
        steps=steps,
        minutes=budget.minutes,
    )


def check_budget(config: TrainConfig, where="TrainConfig") -> None:
    """Raise InputError (naming `where`) for a budget that cannot train: epochs < 1,
    max_minutes <= 0, patience < 1 or min_delta < 0."""
    problems = [
        f"epochs must be >= 1, got {config.epochs}" if config.epochs < 1 else "",
        f"max_minutes must be > 0, got {config.max_minutes}"
        if config.max_minutes is not None and not config.max_minutes > 0
        else "",
        f"patience must be >= 1, got {config.patience}" if config.patience is not None and config.patience < 1 else "",
        f"min_delta must be >= 0, got {config.min_delta}" if not config.min_delta >= 0 else "",
    ]
    if any(problems):
        raise InputError(where, "; ".join(p for p in problems if p))


def embed_batch(encoder: keras.Model, pixels, invariant: bool = False, keep=None) -> np.ndarray:
    """Embeddings (n, features) of one batch (n, S, S, 1) float32 in [0, 1], in inference mode.

    predict_on_batch reuses the model's compiled predict function across calls (no retracing
    per embed_crops call) and measured as fast as a hand-written tf.function. invariant=True
    averages over the 8 rotations/flips (dihedral_8), one transform at a time to bound memory.
    keep: the crops' dilated 0/1 cell masks (n, S, S, 1) for a variant with input_mask="cell":
    the encoder then sees mask_input(pixels, keep), as in training; None embeds pixels as they are.
    """
    if not invariant:
        return encoder.predict_on_batch(_encoder_input(pixels, keep))
    return embed_batch_both(encoder, pixels, keep)[1]


def embed_batch_both(encoder: keras.Model, pixels, keep=None) -> tuple[np.ndarray, np.ndarray]:
    """(plain, rotation/flip-invariant) embeddings in 8 forward passes, not 9.

    The first dihedral view is the identity, so its output is the plain embedding. keep as in
    embed_batch (the masking is done once, before the 8 views).
    """
    x = tf.convert_to_tensor(_encoder_input(pixels, keep))
    outputs = [encoder.predict_on_batch(view) for view in dihedral_views(x)]
    return outputs[0], sum(outputs) / np.float32(8.0)


def _encoder_input(pixels, keep):
    return pixels if keep is None else mask_input(pixels, keep).numpy()


def iter_encoder_inputs(
    crops_dir,
    batch_size: int = 256,
    input_mask: str = "none",
    columns: Sequence[str] = PROVENANCE_COLUMNS,
    plates: Sequence[str] | None = None,
) -> Iterator[tuple[pd.DataFrame, np.ndarray, np.ndarray | None]]:
    """(rows of `columns`, float32 pixels (n, S, S, 1) in [0, 1], keep) per record batch, in dataset order.

    keep is None for input_mask "none"; for "cell" the crops' stored masks dilated as in
    training (dilate_masks), float32 0/1 (n, S, S, 1), to pass to embed_batch. Raises
    ValueError for an unknown input_mask, InputError when the dataset is missing, empty or
    lacks a column.
    """
    if input_mask not in INPUT_MASKS:
        raise ValueError(f"input_mask must be one of {INPUT_MASKS}, got {input_mask!r}")
    if input_mask == "none":
        for rows, pixels in iter_crop_batches(crops_dir, batch_size, columns=columns, plates=plates):
            yield rows, pixels, None
        return
    size = read_crop_size(crops_dir)
    for batch in iter_record_batches(CropSelection.of(crops_dir, plates), [*columns, "pixels", "mask"], batch_size):
        pixels = (decode_crops(batch.column("pixels"), size).astype(np.float32) / np.float32(255.0))[..., None]
        keep = dilate_masks(decode_crops(batch.column("mask"), size)).astype(np.float32)[..., None]
        yield batch.drop_columns(["pixels", "mask"]).to_pandas(), pixels, keep


def embed_crops(
    encoder: keras.Model,
    crops_dir,
    batch_size: int = 256,
    invariant: bool = False,
    plates: Sequence[str] | None = None,
    input_mask: str = "none",
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """(provenance rows, float32 embeddings) per batch; row i of the frame is vector i.

    input_mask: the variant's (Variant.input_mask); "cell" embeds the cell alone, as it trained.
    """
    for rows, pixels, keep in iter_encoder_inputs(crops_dir, batch_size, input_mask, plates=plates):
        yield rows, embed_batch(encoder, pixels, invariant, keep).astype(np.float32, copy=False)


def write_embeddings(
    encoder: keras.Model,
    crops_dir,
    path,
    batch_size: int = 256,
    on_progress: Callable[[int, int, float], None] | None = None,
    input_mask: str = "none",
) -> tuple[int, float]:
    """Embed every crop into one embeddings Parquet file (embedding_table schema); return (crops, seconds).

    Each row holds the crop's provenance, `embedding` and `embedding_invariant` (float32,
    encoder features each; embed_batch_both: 8 forward passes per crop), in dataset order. The
    file appears atomically when complete. on_progress(done, total, crops_per_s) is called
    after the first batch to pass each further tenth of the crops, and at the end. input_mask:
    the variant's (Variant.input_mask); "cell" reads the crops' masks and embeds the cell alone,
    as it trained. Raises InputError when the crops dataset is missing or empty, ValueError for
    an unknown input_mask.
    """
    total = count_crops(CropSelection.of(crops_dir))
    schema = embedding_schema(int(encoder.outputs[0].shape[-1]))
    done, started, next_report = 0, time.perf_counter(), 0.0
    with AtomicParquetWriter(path, schema) as writer:
        for rows, pixels, keep in iter_encoder_inputs(crops_dir, batch_size, input_mask):
            writer.write(embedding_batch(rows, *embed_batch_both(encoder, pixels, keep)))
            done += len(rows)
            if on_progress is not None and (done / total >= next_report or done == total):
                on_progress(done, total, done / max(time.perf_counter() - started, 1e-9))
                next_report += 0.1
    return done, time.perf_counter() - started
