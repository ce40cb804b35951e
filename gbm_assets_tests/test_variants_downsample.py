"""The encoder that sees the whole cell (Variant.downsample, issue 13): pixel blocks averaged
before the first convolution, so the last block's 46-pixel field of view spans a whole cell."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dataclasses import replace  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gbm_assets.models.training import limit_cpu_threads  # noqa: E402

limit_cpu_threads(2, 1)

from gbm_assets.imaging.synthetic_crops import write_synthetic_crops  # noqa: E402
from gbm_assets.models.encoders import build_siamese_encoder  # noqa: E402
from gbm_assets.models.training import TrainConfig, build_trainable, embed_batch, iter_encoder_inputs, train_encoder  # noqa: E402
from gbm_assets.models.variants import VARIANTS, get_variant  # noqa: E402

ROW = "siamese_b_ds2_cell"
THESIS = ("siamese_a", "siamese_b", "siamese_c", "siamese_d", "siamese_e", "siamese_f", "siamese_g", "siamese_h")


def _pooling(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.AveragePooling2D)]


def test_downsample_averages_pixel_blocks_before_the_first_convolution():
    encoder = build_siamese_encoder(64, 8, downsample=2)
    assert [layer.pool_size for layer in _pooling(encoder)] == [(2, 2)]
    convolutions = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convolutions[0].input.shape[1:3] == (32, 32)
    assert encoder.output_shape == (None, 8)
    thesis = build_siamese_encoder(64, 8)
    assert not _pooling(thesis) and len(thesis.layers) == len(encoder.layers) - 1
    assert encoder.count_params() == thesis.count_params()  # the pooling has no weights
    # a 2x2 block of pixels counts by its mean only
    x = np.random.default_rng(0).random((2, 64, 64, 1)).astype(np.float32)
    blocks = x.reshape(2, 32, 2, 32, 2, 1).mean(axis=(2, 4), keepdims=True)
    flat = np.broadcast_to(blocks, (2, 32, 2, 32, 2, 1)).reshape(2, 64, 64, 1)
    np.testing.assert_allclose(encoder.predict_on_batch(x), encoder.predict_on_batch(flat), atol=1e-5)


@pytest.mark.parametrize(("crop_size", "downsample", "message"), [(48, 2, "multiple of 32"), (64, 0, "downsample")])
def test_downsample_rejects_crops_it_cannot_divide(crop_size, downsample, message):
    with pytest.raises(ValueError, match=message):
        build_siamese_encoder(crop_size, 8, downsample=downsample)


def test_the_row_is_the_masked_b_at_half_resolution_and_the_thesis_rows_are_untouched():
    row = get_variant(ROW)
    assert row.downsample == 2
    # beyond the encoder, only how the clusters asset clusters it differs (test_cluster_spherize.py)
    same_clustering = dict(cluster_vector="embedding", cluster_preprocess="none", cluster_neighbor_weight=0.0)
    assert replace(row, name="siamese_b_cell", downsample=1, **same_clustering) == get_variant("siamese_b_cell")
    assert all(VARIANTS[name].downsample == 1 for name in THESIS)
    assert not _pooling(build_trainable(get_variant("siamese_b"), 64)[1])


def test_the_row_trains_and_embeds_the_cell_alone(tmp_path):
    crops = write_synthetic_crops(tmp_path / "cell_crops.parquet", per_plate=8, size=32)
    row = get_variant(ROW)
    result = train_encoder(row, crops, TrainConfig(epochs=1, max_steps_per_epoch=1, batch_size=8))
    assert [layer.name for layer in _pooling(result.encoder)] == ["downsample"]
    _, pixels, keep = next(iter_encoder_inputs(crops, 8, row.input_mask))
    assert keep is not None
    embedding = embed_batch(result.encoder, pixels, keep=keep)
    assert embedding.shape == (8, row.features) and np.isfinite(embedding).all()
