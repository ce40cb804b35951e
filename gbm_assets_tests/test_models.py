"""Unit tests of the pure model core: registry, loss, augmentation, encoders, streaming, training."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from scipy import ndimage  # noqa: E402

from gbm_assets.models.training import limit_cpu_threads  # noqa: E402

limit_cpu_threads(2, 1)

import tensorflow as tf  # noqa: E402

from gbm_assets.errors import InputError  # noqa: E402
from gbm_assets.imaging.crop_dataset import (  # noqa: E402
    CropSelection,
    count_crops,
    iter_crop_batches,
    iter_record_batches,
    read_crop_size,
)
from gbm_assets.imaging.crops import decode_crops  # noqa: E402
from gbm_assets.imaging.synthetic_crops import write_synthetic_crops  # noqa: E402
from gbm_assets.models import augmentation as aug  # noqa: E402
from gbm_assets.models.augmentation import dilate_masks  # noqa: E402
from gbm_assets.models.dataset import training_dataset  # noqa: E402
from gbm_assets.models.encoders import build_autoencoder, build_siamese_encoder  # noqa: E402
from gbm_assets.models.losses import barlow_twins_loss  # noqa: E402
from gbm_assets.models.training import TrainConfig, embed_batch, embed_crops, train_encoder  # noqa: E402
from gbm_assets.models.variants import VARIANTS, Variant, get_variant, variant_names  # noqa: E402
from gbm_assets.schema import PROVENANCE_COLUMNS  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def crops_dir(tmp_path_factory) -> Path:
    return write_synthetic_crops(tmp_path_factory.mktemp("crops") / "cell_crops.parquet", size=SIZE)


def read_all(crops_dir: Path) -> pa.Table:
    files = sorted(crops_dir.glob("plate=*/*.parquet"))
    return pa.concat_tables(pq.read_table(f, columns=["crop_id", "pixels"]) for f in files)


# --- variant registry ---------------------------------------------------------------------


def test_registry_matches_thesis_table_1():
    expected = {  # DESIGN.md: features, lambda, segmentation
        "siamese_a": (128, 0.01, "none"),
        "siamese_b": (128, 0.1, "none"),
        "siamese_c": (128, 0.005, "none"),
        "siamese_d": (32, 0.01, "none"),
        "siamese_e": (128, 0.1, "pbr"),
        "siamese_f": (128, 0.01, "pbr"),
        "siamese_g": (128, 0.005, "pbr"),
        "siamese_h": (128, 0.01, "fbr"),
    }
    assert variant_names()[:9] == ["autoencoder", *expected]  # then the recipe rows (test_ssl_recipe.py)
    assert len(VARIANTS) == 9 + sum(name.startswith(tuple(expected)) and name not in expected for name in VARIANTS)
    for name, (features, lambda_, segmentation) in expected.items():
        assert get_variant(name) == Variant(name, "siamese", features, lambda_, segmentation, 0.001)
    assert get_variant("autoencoder") == Variant("autoencoder", "autoencoder", 64, None, "none", 0.01)


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(KeyError, match="siamese_a.*siamese_h"):
        get_variant("siamese_z")
    with pytest.raises(AttributeError):
        get_variant("siamese_a").features = 3  # frozen: a variant cannot drift at run time


# --- Barlow Twins loss --------------------------------------------------------------------


def numpy_barlow_twins(z1, z2, lambda_):
    z1n = (z1 - z1.mean(0)) / z1.std(0)
    z2n = (z2 - z2.mean(0)) / z2.std(0)
    c = z1n.T @ z2n / len(z1)
    return ((1 - np.diag(c)) ** 2).sum() + lambda_ * ((c**2).sum() - (np.diag(c) ** 2).sum())


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(16, 8)).astype(np.float32)
    z2 = (z1 + rng.normal(scale=0.5, size=z1.shape)).astype(np.float32)
    got = float(barlow_twins_loss(z1, z2, 0.01))
    assert got == pytest.approx(numpy_barlow_twins(z1.astype(np.float64), z2.astype(np.float64), 0.01), rel=1e-4)


def test_loss_is_zero_for_identical_decorrelated_views():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 8))
    q, _ = np.linalg.qr(x - x.mean(0))  # centred, orthogonal columns: C = identity
    z = (q * 3.0 + 5.0).astype(np.float32)  # scale and shift do not matter after standardising
    assert float(barlow_twins_loss(z, z, 0.5)) == pytest.approx(0.0, abs=1e-4)


def test_loss_is_non_negative_and_linear_in_lambda():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 32, 6)).astype(np.float32)
    l0, l1, l2 = (float(barlow_twins_loss(z1, z2, lam)) for lam in (0.0, 1.0, 2.0))
    assert min(l0, l1, l2) >= 0
    assert l1 > l0  # random views are correlated off the diagonal
    assert l2 - l0 == pytest.approx(2 * (l1 - l0), rel=1e-4)


# --- augmentation -------------------------------------------------------------------------


def distinct_batch(n=16, size=8):
    """Images whose pixel values are all different, so any transform is identifiable."""
    images = np.random.default_rng(3).permutation(n * size * size).reshape(n, size, size, 1).astype(np.float32)
    masks = (images % 3 == 0).astype(np.float32)
    return images, masks


def which_transform(out: np.ndarray, src: np.ndarray, candidates) -> int:
    matches = [i for i, f in enumerate(candidates) if np.array_equal(out, f(src))]
    assert len(matches) == 1, "output is not exactly one of the allowed pixel permutations"
    return matches[0]


def test_rotation_is_a_pixel_permutation_applied_to_image_and_mask():
    images, masks = distinct_batch()
    out, out_masks = (t.numpy() for t in aug.random_rot90(images, masks, tf.constant([1, 2])))
    rotations = [lambda a, k=k: np.rot90(a, k) for k in range(4)]
    seen = set()
    for i in range(len(images)):
        k = which_transform(out[i], images[i], rotations)
        assert np.array_equal(out_masks[i], np.rot90(masks[i], k))
        seen.add(k)
    assert len(seen) > 1
    again = aug.random_rot90(images, masks, tf.constant([1, 2]))[0].numpy()
    assert np.array_equal(out, again)  # stateless: same seed, same rotation


def test_flips_are_pixel_permutations_applied_to_image_and_mask():
    images, masks = distinct_batch()
    out, out_masks = (t.numpy() for t in aug.random_flips(images, masks, tf.constant([4, 5])))
    flips = [lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a[::-1, ::-1]]
    seen = set()
    for i in range(len(images)):
        f = which_transform(out[i], images[i], flips)
        assert np.array_equal(out_masks[i], flips[f](masks[i]))
        seen.add(f)
    assert len(seen) > 1


def test_blur_is_mild_seeded_and_keeps_flat_images_flat():
    rng = np.random.default_rng(6)
    images = rng.random((8, 16, 16, 1)).astype(np.float32)
    blurred = aug.random_blur(images, tf.constant([7, 8])).numpy()
    assert np.array_equal(blurred, aug.random_blur(images, tf.constant([7, 8])).numpy())
    assert not np.array_equal(blurred, aug.random_blur(images, tf.constant([7, 9])).numpy())
    assert blurred.std() < images.std()
    assert np.abs(blurred.mean() - images.mean()) < 0.01
    flat = np.full((4, 16, 16, 1), 0.7, np.float32)
    np.testing.assert_allclose(aug.random_blur(flat, tf.constant([1, 1])).numpy(), flat, atol=1e-6)


def centre_cell_batch(n=6, size=32):
    rng = np.random.default_rng(9)
    images = rng.uniform(0.1, 1.0, (n, size, size, 1)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 10:19, 12:16] = 1  # an L-shaped cell: no rotation or flip maps it onto itself
    masks[:, 16:19, 16:20] = 1
    keep = dilate_masks(masks)[..., None].astype(np.float32)
    return images, masks, keep


DISC_5X5 = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2  # skimage.morphology.disk(2)


def test_dilation_uses_a_5x5_disc():
    single = np.zeros((1, 9, 9), np.uint8)
    single[0, 4, 4] = 1
    assert np.array_equal(dilate_masks(single)[0, 2:7, 2:7] > 0, DISC_5X5) and DISC_5X5.sum() == 13
    masks = (np.random.default_rng(0).random((4, 20, 20)) > 0.95).astype(np.uint8)
    reference = [ndimage.binary_dilation(m, structure=DISC_5X5) for m in masks]
    assert np.array_equal(dilate_masks(masks).astype(bool), np.stack(reference))


def test_partial_blackout_spares_the_dilated_cell():
    images, _, keep = centre_cell_batch()
    out = aug.partial_blackout(images, keep, tf.constant([3, 3])).numpy()
    kept = keep > 0.5
    assert np.array_equal(out[kept], images[kept])
    zeroed = out == 0
    assert zeroed.any(axis=(1, 2, 3)).all()  # every crop lost some background
    for z, k in zip(zeroed[..., 0], kept[..., 0], strict=False):  # one square, minus the dilated cell
        rows, cols = np.nonzero(z)
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        assert (z[box] | k[box]).all()
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= aug.PBR_SIDE[1] * z.shape[0]
    assert np.array_equal(out[~zeroed], images[~zeroed])


def test_full_blackout_keeps_only_the_dilated_cell():
    images, masks, keep = centre_cell_batch()
    out = aug.full_blackout(images, keep).numpy()
    kept = keep > 0.5
    assert kept.sum() > masks.sum()  # the dilation grew the cell
    assert np.array_equal(out[kept], images[kept])
    assert (out[~kept] == 0).all()


def test_distorted_views_move_image_and_mask_together():
    images, _, keep = centre_cell_batch()
    original, distorted = (np.asarray(t) for t in aug.make_pair(images, keep, tf.constant([0, 1]), "fbr"))
    assert np.array_equal(original, images)
    group = [np.rot90(f(keep[0]), k) for f in (lambda a: a, lambda a: a[:, ::-1]) for k in range(4)]
    for view in distorted:
        assert sum(np.array_equal(view > 0, g > 0.5) for g in group) == 1
    pbr = aug.distort(images, keep, tf.constant([0, 1]), "pbr").numpy()
    assert np.array_equal(pbr, aug.distort(images, keep, tf.constant([0, 1]), "pbr").numpy())
    plain = aug.distort(images, None, tf.constant([0, 1]), "none").numpy()
    assert plain.shape == images.shape and not np.array_equal(plain, images)
    with pytest.raises(ValueError, match="segmentation"):
        aug.distort(images, keep, tf.constant([0, 1]), "partial")


def test_dihedral_8_gives_all_rotations_and_flips():
    images, _ = distinct_batch(n=2)
    views = aug.dihedral_8(images).numpy()
    assert views.shape == (8, *images.shape)
    expected = [np.rot90(f(images[0]), k) for f in (lambda a: a, lambda a: a[:, ::-1]) for k in range(4)]
    for view in views[:, 0]:
        assert sum(np.array_equal(view, e) for e in expected) == 1
    assert len({v.tobytes() for v in views[:, 0]}) == 8


# --- encoders -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 128])
def test_encoder_output_shapes(size):
    x = np.random.default_rng(0).random((2, size, size, 1)).astype(np.float32)
    autoencoder, encoder = build_autoencoder(size, 64)
    assert autoencoder.predict_on_batch(x).shape == (2, size, size, 1)
    assert encoder.predict_on_batch(x).shape == (2, 64)
    assert build_siamese_encoder(size, 32).predict_on_batch(x).shape == (2, 32)


def test_encoders_reject_crop_sizes_they_cannot_halve_four_times():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_siamese_encoder(40, 128)


# --- streaming dataset --------------------------------------------------------------------


def test_record_batches_stream_in_bounded_batches(crops_dir):
    selection = CropSelection.of(crops_dir)
    sizes = [b.num_rows for b in iter_record_batches(selection, ["crop_id"], 10)]
    assert sizes == [10, 10, 4] * 3  # never more than batch_size rows, one plate at a time
    assert count_crops(selection) == 72
    assert read_crop_size(crops_dir) == SIZE


def test_decode_is_exact_and_handles_sliced_columns(crops_dir):
    table = read_all(crops_dir)
    column = table.column("pixels").combine_chunks().slice(5, 7)
    decoded = decode_crops(column, SIZE)
    assert decoded.shape == (7, SIZE, SIZE) and decoded.dtype == np.uint8
    for i in range(7):
        assert decoded[i].tobytes() == column[i].as_py()
    with pytest.raises(InputError, match="16x16"):
        decode_crops(column, 16)


def test_plate_and_max_crops_subsets(crops_dir):
    assert count_crops(CropSelection.of(crops_dir, plates=["P2"])) == 24
    subset = CropSelection.of(crops_dir, max_crops=30, seed=4)
    ids = [i for b in iter_record_batches(subset, ["crop_id"], 8) for i in b.column("crop_id").to_pylist()]
    again = [i for b in iter_record_batches(subset, ["crop_id"], 8) for i in b.column("crop_id").to_pylist()]
    assert count_crops(subset) == len(ids) == len(set(ids)) == 30 and ids == again
    assert {i.split(":")[0] for i in ids} == {"P1", "P2", "P3"}  # random subset, not the first plate
    with pytest.raises(InputError, match="not found"):
        count_crops(CropSelection.of(crops_dir / "missing"))


def take(dataset, n):
    return [tuple(t.numpy() for t in item) for item in dataset.take(n)]


def test_training_stream_is_seeded_and_fresh_every_pass(crops_dir):
    variant = get_variant("siamese_f")
    make = lambda seed: training_dataset(CropSelection.of(crops_dir, seed=seed), variant, 8, 32)  # noqa: E731
    first, second, other = take(make(1), 18), take(make(1), 18), take(make(2), 3)
    for a, b in zip(first, second, strict=False):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert not np.array_equal(first[0][0], other[0][0])
    view1, view2 = first[0]
    assert view1.shape == view2.shape == (8, SIZE, SIZE, 1) and view1.dtype == np.float32
    assert 0.0 <= view1.min() and view1.max() <= 1.0 and not np.array_equal(view1, view2)
    # 72 crops / 8 = 9 batches a pass: the second pass reshuffles and redistorts
    assert not np.array_equal(first[0][1], first[9][1])
    originals = lambda batches: sorted(v.tobytes() for b in batches for v in b[0])  # noqa: E731
    assert originals(first[:9]) == originals(first[9:])  # each pass sees every crop once


def test_autoencoder_stream_yields_input_as_target(crops_dir):
    x, y = take(training_dataset(CropSelection.of(crops_dir), get_variant("autoencoder"), 16), 1)[0]
    assert x.shape == (16, SIZE, SIZE, 1) and np.array_equal(x, y)


def test_inference_batches_keep_provenance_with_pixels(crops_dir):
    batches = list(iter_crop_batches(crops_dir, batch_size=20))
    assert [len(rows) for rows, _ in batches] == [20, 4] * 3
    rows, pixels = batches[0]
    assert list(rows.columns) == list(PROVENANCE_COLUMNS)
    assert pixels.shape == (20, SIZE, SIZE, 1) and pixels.dtype == np.float32
    stored = {r["crop_id"]: r["pixels"] for r in read_all(crops_dir).to_pylist()}
    for crop_id, crop in zip(rows["crop_id"], pixels, strict=False):
        assert np.array_equal(np.rint(crop[..., 0] * 255).astype(np.uint8).tobytes(), stored[crop_id])


# --- training and embedding ---------------------------------------------------------------


def test_autoencoder_trains_and_reports_each_epoch(crops_dir):
    seen = []
    config = TrainConfig(epochs=2, max_steps_per_epoch=3, batch_size=16, seed=0)
    result = train_encoder(get_variant("autoencoder"), crops_dir, config, on_epoch_end=lambda e, row: seen.append(e))
    assert seen == [0, 1] and result.n_crops == 72
    losses = [row["loss"] for row in result.history]
    assert np.isfinite(losses).all() and losses[1] < losses[0]
    assert all(row["seconds"] > 0 and row["crops_per_s"] > 0 for row in result.history)
    assert result.encoder.output_shape == (None, 64)


def test_siamese_training_is_finite_learning_and_seeded(crops_dir):
    config = TrainConfig(epochs=4, max_steps_per_epoch=3, batch_size=24, seed=3)
    result = train_encoder(get_variant("siamese_f"), crops_dir, config)
    losses = [row["loss"] for row in result.history]
    assert result.n_crops == 72
    assert np.isfinite(losses).all() and losses[0] > 0 and losses[-1] < losses[0]
    assert result.encoder.name == "siamese_encoder" and result.encoder.output_shape == (None, 128)
    again = train_encoder(get_variant("siamese_f"), crops_dir, config)
    np.testing.assert_allclose([row["loss"] for row in again.history], losses, rtol=1e-4)


def test_training_rejects_unusable_configs(crops_dir):
    # Fewer crops than a batch train in one batch of all of them (see test_small_data_and_safety);
    # a single crop cannot: Barlow Twins standardises over the batch.
    with pytest.raises(InputError, match="1 crop selected: training siamese_a needs at least 2"):
        train_encoder(get_variant("siamese_a"), crops_dir, TrainConfig(epochs=1, batch_size=128, max_crops=1))
    with pytest.raises(InputError, match="config asks for 64"):
        train_encoder(get_variant("siamese_a"), crops_dir, TrainConfig(epochs=1, batch_size=8, crop_size=64))


def test_embeddings_stay_aligned_with_provenance(crops_dir):
    encoder = build_siamese_encoder(SIZE, 16)
    batches = list(embed_crops(encoder, crops_dir, batch_size=20))
    ids = [i for rows, _ in batches for i in rows["crop_id"]]
    vectors = np.concatenate([v for _, v in batches])
    assert vectors.shape == (72, 16) and vectors.dtype == np.float32
    assert len(set(ids)) == 72
    by_id = {r["crop_id"]: r["pixels"] for r in read_all(crops_dir).to_pylist()}
    probe = [0, 23, 24, 71]
    crops = np.stack([np.frombuffer(by_id[ids[i]], np.uint8).reshape(SIZE, SIZE) for i in probe])
    expected = encoder.predict_on_batch((crops.astype(np.float32) / 255.0)[..., None])
    np.testing.assert_allclose(vectors[probe], expected, rtol=1e-4, atol=1e-5)


def test_invariant_embedding_ignores_rotation_and_flip():
    encoder = build_siamese_encoder(SIZE, 16)
    x = np.random.default_rng(5).random((3, SIZE, SIZE, 1)).astype(np.float32)
    plain = embed_batch(encoder, x, invariant=True)
    for moved in (np.rot90(x, 1, axes=(1, 2)), np.rot90(x, 2, axes=(1, 2)), x[:, :, ::-1]):
        np.testing.assert_allclose(
            embed_batch(encoder, np.ascontiguousarray(moved), invariant=True), plain, rtol=1e-4, atol=1e-5
        )
    assert not np.allclose(embed_batch(encoder, np.rot90(x, 1, axes=(1, 2)).copy()), embed_batch(encoder, x))


def test_embed_batch_both_matches_the_separate_calls():
    from gbm_assets.models.encoders import build_siamese_encoder
    from gbm_assets.models.training import embed_batch, embed_batch_both

    encoder = build_siamese_encoder(32, 8)
    pixels = np.random.default_rng(0).random((5, 32, 32, 1), dtype=np.float32)
    plain, invariant = embed_batch_both(encoder, pixels)
    np.testing.assert_allclose(plain, embed_batch(encoder, pixels), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(invariant, embed_batch(encoder, pixels, invariant=True), rtol=1e-5, atol=1e-5)


def test_training_config_fills_the_core_parameters():
    """Run config to core parameters by field name, as CellFindingConfig.params() does."""
    from gbm_assets.assets.encoders import TrainingConfig

    assert TrainingConfig().params() == TrainConfig(
        epochs=2, max_steps_per_epoch=12, max_minutes=None, patience=3, batch_size=128, seed=0, max_crops=None
    )
    assert TrainingConfig(epochs=5, max_crops=40, seed=2, mlflow_retries=0).params() == TrainConfig(
        epochs=5, max_steps_per_epoch=12, max_minutes=None, patience=3, batch_size=128, seed=2, max_crops=40
    )


def test_write_embeddings_is_embed_crops_plain_and_invariant(crops_dir, tmp_path):
    """The embeddings asset's loop (write_embeddings) stores exactly what embed_crops computes."""
    from gbm_assets.models.embedding_table import iter_embeddings
    from gbm_assets.models.training import write_embeddings

    encoder = build_siamese_encoder(SIZE, 8)
    progress = []
    done, seconds = write_embeddings(
        encoder, crops_dir, tmp_path / "emb.parquet", 16, on_progress=lambda n, total, rate: progress.append((n, total))
    )
    assert done == 72 and seconds > 0 and progress[0] == (16, 72) and progress[-1] == (72, 72)
    for vector, invariant in (("embedding", False), ("embedding_invariant", True)):
        stored = list(iter_embeddings(tmp_path / "emb.parquet", 16, vector=vector))
        computed = list(embed_crops(encoder, crops_dir, 16, invariant=invariant))
        assert [i for r, _ in stored for i in r["crop_id"]] == [i for r, _ in computed for i in r["crop_id"]]
        np.testing.assert_allclose(
            np.concatenate([x for _, x in stored]), np.concatenate([x for _, x in computed]), rtol=1e-5, atol=1e-6
        )
