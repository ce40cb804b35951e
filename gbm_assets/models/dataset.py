"""Streaming crops from the cell_crops Parquet dataset into tf.data, with flat memory.

The crops are read by gbm_assets.imaging.crop_dataset (record batches, a few plates in
round-robin so that a batch mixes plates, decoded without copying); this module turns them
into endless, shuffled, augmented training batches. Memory depends on the batch and
shuffle-buffer sizes, never on the number of crops.
"""

from __future__ import annotations

import itertools

import tensorflow as tf

from gbm_assets.imaging.crop_dataset import CropSelection, iter_record_batches, read_crop_size
from gbm_assets.imaging.crops import decode_crops
from gbm_assets.models.augmentation import dilate_masks, make_pair, mask_input
from gbm_assets.models.variants import Variant

READ_ROWS = 256  # rows per Parquet record batch while training


def training_dataset(
    selection: CropSelection,
    variant: Variant,
    batch_size: int = 128,
    shuffle_buffer: int = 2048,
    crop_size: int | None = None,
) -> tf.data.Dataset:
    """An endless, seeded stream of training batches: (x, x) for the autoencoder, else a pair.

    Each pass over the data (an epoch of the generator) gets a new plate order, a reshuffle
    and new distortion seeds, so a siamese variant sees fresh pairs every epoch. Masks are read
    (and dilated, in NumPy) only for PBR/FBR variants and variants with input_mask="cell" (whose
    crops, both views, and the autoencoder's input and target, are mask_input's). Augmenting whole batches in a parallel
    map, then prefetching, keeps the CPU work off the training step's critical path. Batches depend only on the selection's seed (and TF's global seed,
    which training sets from the same seed).
    """
    size = crop_size or read_crop_size(selection.crops_dir)
    siamese = variant.kind == "siamese"
    with_masks = (siamese and variant.segmentation != "none") or variant.input_mask == "cell"
    columns = ["pixels", "mask"] if with_masks else ["pixels"]
    passes = itertools.count()

    def generate():
        order_seed = selection.seed * 1_000_003 + next(passes)
        for batch in iter_record_batches(selection, columns, READ_ROWS, order_seed):
            pixels = decode_crops(batch.column("pixels"), size)
            yield (pixels, dilate_masks(decode_crops(batch.column("mask"), size))) if with_masks else (pixels,)

    spec = tf.TensorSpec((None, size, size), tf.uint8)
    ds = tf.data.Dataset.from_generator(generate, output_signature=(spec,) * len(columns))
    ds = ds.unbatch().shuffle(shuffle_buffer, seed=selection.seed).batch(batch_size, drop_remainder=True)
    ds = ds.repeat().enumerate()

    def to_inputs(step, crops):
        x = tf.cast(crops[0], tf.float32)[..., None] / 255.0
        keep = tf.cast(crops[1], tf.float32)[..., None] if with_masks else None
        if not siamese:
            x = mask_input(x, keep) if variant.input_mask == "cell" else x
            return x, x
        seed = tf.stack([tf.cast(selection.seed, tf.int64), step])
        return make_pair(x, keep, seed, variant.segmentation, **variant.distortions)

    ds = ds.map(to_inputs, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
