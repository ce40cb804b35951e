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
from gbm_assets.imaging.crop_dataset import CropSelection, count_crops, crop_plates, iter_crop_batches, read_crop_size  # noqa: E402
from gbm_assets.models.augmentation import dihedral_views  # noqa: E402
from gbm_assets.models.dataset import training_dataset  # noqa: E402
from gbm_assets.models.embedding_table import embedding_batch, embedding_schema  # noqa: E402
from gbm_assets.models.encoders import build_autoencoder, build_siamese_encoder  # noqa: E402
from gbm_assets.models.losses import barlow_twins_loss  # noqa: E402
from gbm_assets.models.variants import Variant  # noqa: E402
from gbm_assets.storage import AtomicParquetWriter  # noqa: E402


def limit_cpu_threads(intra_op: int = 2, inter_op: int = 1) -> None:
    """Cap TensorFlow's thread pools (must run before TF's first op; later calls are no-ops)."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        pass


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps_per_epoch: int | None = None  # None: one pass over the selected crops
    batch_size: int = 128
    crop_size: int | None = None  # None: as stored; else checked against the dataset
    seed: int = 0
    shuffle_buffer: int = 2048  # crops held for shuffling (bounds memory)
    plates: tuple[str, ...] | None = None  # None: all plates
    max_crops: int | None = None  # seeded random subset for quick runs


@dataclass
class TrainResult:
    encoder: keras.Model  # the functional encoder, ready for embedding and logging
    history: list[dict]  # per epoch: epoch (0-based), loss, seconds, crops_per_s
    n_crops: int
    batch_size: int = 0  # the batch size used (usable_batch_size of the configured one)


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

    The loss is reported as 'bt_loss' through its own Mean tracker: a custom train_step
    returning 'loss' after compile() without a loss shows 0.0 in Keras 3.
    """

    def __init__(self, encoder: keras.Model, lambda_: float, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
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
            loss = barlow_twins_loss(z1, z2, self.lambda_)
        weights = self.encoder.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights, strict=False))
        self.loss_tracker.update_state(loss)
        return {"bt_loss": self.loss_tracker.result()}


class EpochLog(keras.callbacks.Callback):
    """Collects loss and throughput per epoch and forwards them to the caller's hook."""

    def __init__(self, loss_key: str, crops_per_epoch: int, hook: Callable[[int, dict], None] | None):
        super().__init__()
        self.loss_key, self.crops_per_epoch, self.hook = loss_key, crops_per_epoch, hook
        self.history: list[dict] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        row = {
            "epoch": epoch,
            "loss": float(logs[self.loss_key]),
            "seconds": seconds,
            "crops_per_s": self.crops_per_epoch / seconds,
        }
        self.history.append(row)
        if self.hook is not None:
            self.hook(epoch, row)


def build_trainable(variant: Variant, crop_size: int) -> tuple[keras.Model, keras.Model, str]:
    """(compiled model to fit, its functional encoder, the history key of its loss)."""
    optimizer = keras.optimizers.Adam(learning_rate=variant.learning_rate)
    if variant.kind == "autoencoder":
        model, encoder = build_autoencoder(crop_size, variant.features)
        model.compile(optimizer=optimizer, loss="mse")
        return model, encoder, "loss"
    encoder = build_siamese_encoder(crop_size, variant.features)
    model = BarlowTwins(encoder, variant.lambda_)
    model.compile(optimizer=optimizer)
    return model, encoder, "bt_loss"


def plan_training(variant: Variant, crops_dir, config: TrainConfig) -> TrainingPlan:
    """The crops, crop size, batch size and steps a training run of `variant` will use.

    Raises InputError (naming crops_dir) when the dataset is missing or empty, when fewer crops
    than min_batch_size(variant) are selected, or when config.crop_size differs from the
    stored crops.
    """
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
    """Train one variant on streamed, freshly augmented crops; deterministic given config.seed.

    An epoch is one pass over the selected crops, or max_steps_per_epoch batches if smaller;
    the stream continues where the previous epoch stopped, so short epochs still cover the data.
    on_epoch_end(epoch, row) receives each history row (for progress logs and MLflow metrics).
    Fewer crops than config.batch_size train in batches of all the crops (usable_batch_size,
    reported as TrainResult.batch_size); fewer than min_batch_size(variant) raise InputError.
    plan: plan_training(variant, crops_dir, config) when the caller already made it.
    """
    keras.utils.set_random_seed(config.seed)
    plan = plan or plan_training(variant, crops_dir, config)
    model, encoder, loss_key = build_trainable(variant, plan.crop_size)
    data = training_dataset(plan.selection, variant, plan.batch_size, config.shuffle_buffer, plan.crop_size)
    log = EpochLog(loss_key, plan.steps_per_epoch * plan.batch_size, on_epoch_end)
    model.fit(
        data, epochs=config.epochs, steps_per_epoch=plan.steps_per_epoch, callbacks=[log], shuffle=False, verbose=0
    )
    return TrainResult(encoder=encoder, history=log.history, n_crops=plan.n_crops, batch_size=plan.batch_size)


def embed_batch(encoder: keras.Model, pixels, invariant: bool = False) -> np.ndarray:
    """Embeddings (n, features) of one batch in inference mode.

    predict_on_batch reuses the model's compiled predict function across calls (no retracing
    per embed_crops call) and measured as fast as a hand-written tf.function. invariant=True
    averages over the 8 rotations/flips (dihedral_8), one transform at a time to bound memory.
    """
    if not invariant:
        return encoder.predict_on_batch(pixels)
    return embed_batch_both(encoder, pixels)[1]


def embed_batch_both(encoder: keras.Model, pixels) -> tuple[np.ndarray, np.ndarray]:
    """(plain, rotation/flip-invariant) embeddings in 8 forward passes, not 9.

    The first dihedral view is the identity, so its output is the plain embedding.
    """
    outputs = [encoder.predict_on_batch(view) for view in dihedral_views(tf.convert_to_tensor(pixels))]
    return outputs[0], sum(outputs) / np.float32(8.0)


def embed_crops(
    encoder: keras.Model, crops_dir, batch_size: int = 256, invariant: bool = False, plates: Sequence[str] | None = None
) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """(provenance rows, float32 embeddings) per batch; row i of the frame is vector i."""
    for rows, pixels in iter_crop_batches(crops_dir, batch_size, plates=plates):
        yield rows, embed_batch(encoder, pixels, invariant).astype(np.float32, copy=False)


def write_embeddings(
    encoder: keras.Model,
    crops_dir,
    path,
    batch_size: int = 256,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> tuple[int, float]:
    """Embed every crop into one embeddings Parquet file (embedding_table schema); return (crops, seconds).

    Each row holds the crop's provenance, `embedding` and `embedding_invariant` (float32,
    encoder features each; embed_batch_both: 8 forward passes per crop), in dataset order. The
    file appears atomically when complete. on_progress(done, total, crops_per_s) is called
    after the first batch to pass each further tenth of the crops, and at the end. Raises
    InputError when the crops dataset is missing or empty.
    """
    total = count_crops(CropSelection.of(crops_dir))
    schema = embedding_schema(int(encoder.outputs[0].shape[-1]))
    done, started, next_report = 0, time.perf_counter(), 0.0
    with AtomicParquetWriter(path, schema) as writer:
        for rows, pixels in iter_crop_batches(crops_dir, batch_size):
            writer.write(embedding_batch(rows, *embed_batch_both(encoder, pixels)))
            done += len(rows)
            if on_progress is not None and (done / total >= next_report or done == total):
                on_progress(done, total, done / max(time.perf_counter() - started, 1e-9))
                next_report += 0.1
    return done, time.perf_counter() - started
