"""input_mask="cell": the encoder sees the cell alone, in both training views and when embedding.

The check throughout: rewrite every pixel outside the dilated cell mask (neighbours, background)
with noise; what the encoder is given (training pairs, autoencoder inputs, embeddings) must not
change, while without input masking it does. Also both_views (the first view distorted too).
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from gbm_assets.models.training import limit_cpu_threads  # noqa: E402

limit_cpu_threads(2, 1)

import tensorflow as tf  # noqa: E402

from gbm_assets.imaging.crop_dataset import CropSelection  # noqa: E402
from gbm_assets.imaging.synthetic_crops import write_synthetic_crops  # noqa: E402
from gbm_assets.models import augmentation as aug  # noqa: E402
from gbm_assets.models.dataset import training_dataset  # noqa: E402
from gbm_assets.models.encoders import build_siamese_encoder  # noqa: E402
from gbm_assets.models.training import embed_batch, embed_crops, write_embeddings  # noqa: E402
from gbm_assets.models.variants import VARIANTS, get_variant  # noqa: E402

SIZE = 32


def cells(n: int = 8, seed: int = 0):
    """(images, keep) float32 (n, SIZE, SIZE, 1): a bright ellipse on a noisy background, its dilated mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    a = rng.uniform(0.15, 0.25, (n, 1, 1)) * SIZE
    mask = (xx / a) ** 2 + (yy / (0.6 * a)) ** 2 <= 1
    images = np.clip(0.3 + 0.4 * mask + rng.normal(0, 0.05, (n, SIZE, SIZE)), 0, 1).astype(np.float32)
    return images[..., None], aug.dilate_masks(mask.astype(np.uint8)).astype(np.float32)[..., None]


def scrambled_outside(images, keep, seed: int = 1):
    """images with every pixel outside keep replaced by uniform noise."""
    noise = np.random.default_rng(seed).random(images.shape, dtype=np.float32)
    return np.where(keep > 0.5, images, noise).astype(np.float32)


def scramble_dataset(crops: Path, out: Path) -> Path:
    """A copy of a cell_crops dataset whose pixels outside each dilated cell mask are noise."""
    for source in sorted(crops.glob("plate=*/part-0.parquet")):
        table = pq.read_table(source)
        size = int(table.column("crop_size")[0].as_py())
        pixels = np.stack([np.frombuffer(b, np.uint8).reshape(size, size) for b in table.column("pixels").to_pylist()])
        masks = np.stack([np.frombuffer(b, np.uint8).reshape(size, size) for b in table.column("mask").to_pylist()])
        keep = aug.dilate_masks(masks) > 0
        assert (~keep).any(axis=(1, 2)).all()  # there is something outside to scramble
        noise = np.random.default_rng(len(pixels)).integers(0, 256, pixels.shape, dtype=np.uint8)
        changed = np.where(keep, pixels, noise)
        column = pa.array([c.tobytes() for c in changed], table.schema.field("pixels").type)
        table = table.set_column(table.schema.get_field_index("pixels"), "pixels", column)
        target = out / source.parent.name / source.name
        target.parent.mkdir(parents=True)
        pq.write_table(table, target)
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("input_mask")
    crops = write_synthetic_crops(root / "crops", per_plate=8, size=SIZE)
    return crops, scramble_dataset(crops, root / "scrambled")


def test_mask_input_keeps_the_cell_and_fills_the_rest_with_the_background_band():
    images, keep = cells()
    masked = aug.mask_input(images, keep).numpy()
    inside, outside = keep > 0.5, keep < 0.5
    assert np.array_equal(masked[inside], images[inside])
    band = keep[..., 0] - (-tf.nn.max_pool2d(-keep, 2 * aug.BAND + 1, 1, "SAME")).numpy()[..., 0]
    for i in range(len(images)):
        assert band[i].sum() > 0
        fill = images[i, ..., 0][band[i] > 0].mean()
        np.testing.assert_allclose(masked[i][outside[i]], fill, rtol=1e-5)
    again = aug.mask_input(scrambled_outside(images, keep), keep).numpy()
    assert np.array_equal(masked, again)  # nothing outside the mask reaches the output
    empty = aug.mask_input(images, np.zeros_like(keep)).numpy()
    assert np.isfinite(empty).all()


@pytest.mark.parametrize("both_views", [False, True])
def test_both_training_views_hide_what_lies_outside_the_mask(both_views):
    images, keep = cells()
    other = scrambled_outside(images, keep)
    seed = tf.constant([3, 4])
    kwargs = {"input_mask": "cell", "both_views": both_views, "geometric": True, "photometric": True}
    pair = [np.asarray(v) for v in aug.make_pair(images, keep, seed, "pbr", **kwargs)]
    pair_other = [np.asarray(v) for v in aug.make_pair(other, keep, seed, "pbr", **kwargs)]
    for view, view_other in zip(pair, pair_other, strict=True):
        assert np.array_equal(view, view_other)
    plain = [np.asarray(v) for v in aug.make_pair(images, keep, seed, "pbr", both_views=both_views)]
    plain_other = [np.asarray(v) for v in aug.make_pair(other, keep, seed, "pbr", both_views=both_views)]
    assert not np.array_equal(plain[0], plain_other[0]) and not np.array_equal(plain[1], plain_other[1])
    with pytest.raises(ValueError, match="keep"):
        aug.make_pair(images, None, seed, input_mask="cell")
    with pytest.raises(ValueError, match="input_mask"):
        aug.make_pair(images, keep, seed, input_mask="nucleus")


def test_both_views_distorts_the_first_view_too():
    images, keep = cells()
    seed = tf.constant([5, 6])
    first, second = (np.asarray(v) for v in aug.make_pair(images, keep, seed, both_views=True))
    assert not np.array_equal(first, images) and not np.array_equal(first, second)
    assert np.array_equal(second, aug.make_pair(images, keep, seed)[1].numpy())  # the one-view pair's view
    assert np.array_equal(aug.make_pair(images, keep, seed)[0], images)  # the thesis: the original crop


@pytest.mark.parametrize("kind", ["siamese_b", "autoencoder"])
def test_training_stream_hides_what_lies_outside_the_mask(datasets, kind):
    crops, scrambled = datasets
    variant = replace(get_variant(kind), input_mask="cell", both_views=kind != "autoencoder")

    def first_batch(root, v):
        ds = training_dataset(CropSelection.of(root, seed=0), v, 8, 16)
        return [t.numpy() for t in next(iter(ds.take(1)))]

    masked, masked_other = first_batch(crops, variant), first_batch(scrambled, variant)
    for view, view_other in zip(masked, masked_other, strict=True):
        assert np.array_equal(view, view_other)
    plain = replace(variant, input_mask="none")
    assert not np.array_equal(first_batch(crops, plain)[0], first_batch(scrambled, plain)[0])


def test_embeddings_hide_what_lies_outside_the_mask(datasets, tmp_path):
    crops, scrambled = datasets
    encoder = build_siamese_encoder(SIZE, 8)
    a = np.concatenate([e for _, e in embed_crops(encoder, crops, 16, input_mask="cell")])
    b = np.concatenate([e for _, e in embed_crops(encoder, scrambled, 16, input_mask="cell")])
    np.testing.assert_array_equal(a, b)
    plain = np.concatenate([e for _, e in embed_crops(encoder, crops, 16)])
    plain_other = np.concatenate([e for _, e in embed_crops(encoder, scrambled, 16)])
    assert not np.allclose(plain, plain_other)

    tables = []
    for name, root in (("a", crops), ("b", scrambled)):
        done, _ = write_embeddings(encoder, root, tmp_path / f"{name}.parquet", 16, input_mask="cell")
        assert done == 24
        tables.append(pq.read_table(tmp_path / f"{name}.parquet"))
    for column in ("embedding", "embedding_invariant"):
        assert tables[0].column(column).equals(tables[1].column(column))
    np.testing.assert_allclose(np.stack(tables[0].column("embedding").to_pylist()), a, rtol=1e-5, atol=1e-6)

    images, keep = cells()
    np.testing.assert_array_equal(
        embed_batch(encoder, images, invariant=True, keep=keep),
        embed_batch(encoder, scrambled_outside(images, keep), invariant=True, keep=keep),
    )
    with pytest.raises(ValueError, match="input_mask"):
        next(embed_crops(encoder, crops, 16, input_mask="cells"))


def test_input_mask_both_views_and_rotation_default_off_and_reach_mlflow():
    from types import SimpleNamespace

    from gbm_assets.assets.encoders import TrainingConfig, _training_params

    for v in VARIANTS.values():
        if not v.name.endswith("_cell"):
            assert v.input_mask == "none" and not v.both_views and not v.rotation, v.name
    plan = SimpleNamespace(batch_size=8, crop_size=SIZE, n_crops=24, plates=("P1",))
    recipe = replace(get_variant("siamese_b"), input_mask="cell", both_views=True, rotation=True)
    p = _training_params(recipe, plan, TrainingConfig())
    assert (p["input_mask"], p["both_views"], p["rotation"]) == ("cell", True, True)
    p = _training_params(get_variant("siamese_b"), plan, TrainingConfig())
    assert (p["input_mask"], p["both_views"], p["rotation"], p["downsample"]) == ("none", False, False, 1)
    assert _training_params(get_variant("siamese_b_ds2_cell"), plan, TrainingConfig())["downsample"] == 2
