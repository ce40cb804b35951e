"""The SSL recipe beyond the thesis: projector head, geometric and photometric jitter, mean fill.

Each opt-in distortion is tested for its effect, and the thesis' variants for drawing exactly
the pairs they drew before the recipe fields existed.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import fields, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gbm_assets.models.training import limit_cpu_threads  # noqa: E402

limit_cpu_threads(2, 1)

import tensorflow as tf  # noqa: E402

from gbm_assets.imaging.crop_dataset import CropSelection, iter_crop_batches  # noqa: E402
from gbm_assets.imaging.synthetic_crops import write_synthetic_crops  # noqa: E402
from gbm_assets.models import augmentation as aug  # noqa: E402
from gbm_assets.models.dataset import training_dataset  # noqa: E402
from gbm_assets.models.encoders import build_projector  # noqa: E402
from gbm_assets.models.training import TrainConfig, build_trainable, embed_batch, train_encoder  # noqa: E402
from gbm_assets.models.variants import VARIANTS, Variant, get_variant  # noqa: E402

SIZE = 32
THESIS = ("siamese_a", "siamese_b", "siamese_c", "siamese_d", "siamese_e", "siamese_f", "siamese_g", "siamese_h")
# the last commit whose augmentation module had only the thesis' distortions
BEFORE_RECIPE = "55cfd66"
REPO = Path(__file__).resolve().parents[1]


def cell_batch(n: int = 16, size: int = SIZE, seed: int = 0):
    """(images, dilated keep masks) as float32 (n, size, size, 1): a bright ellipse on a noisy background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    a = rng.uniform(0.15, 0.25, (n, 1, 1)) * size
    mask = (xx / a) ** 2 + (yy / (0.6 * a)) ** 2 <= 1
    images = np.clip(0.3 + 0.4 * mask + rng.normal(0, 0.05, (n, size, size)), 0, 1).astype(np.float32)
    keep = aug.dilate_masks(mask.astype(np.uint8)).astype(np.float32)
    return images[..., None], keep[..., None]


def centroid(masks: np.ndarray) -> np.ndarray:
    """(n, 2) row/column centroids of (n, S, S, 1) 0/1 masks."""
    rows, cols = np.mgrid[: masks.shape[1], : masks.shape[2]]
    area = masks[..., 0].sum(axis=(1, 2))
    return np.stack([(masks[..., 0] * rows).sum(axis=(1, 2)) / area, (masks[..., 0] * cols).sum(axis=(1, 2)) / area], 1)


# --- the thesis' variants are untouched -------------------------------------------------------


def _module_before_recipe():
    try:
        source = subprocess.run(
            ["git", "show", f"{BEFORE_RECIPE}:gbm_assets/models/augmentation.py"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"git history with commit {BEFORE_RECIPE} is not available")
    path = Path(__file__).parent / "_augmentation_before_recipe.py"
    spec = importlib.util.spec_from_loader("augmentation_before_recipe", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the repository's own past code
    return module


@pytest.mark.parametrize("segmentation", ["none", "pbr", "fbr"])
def test_thesis_distortions_draw_byte_identical_pairs_as_before_the_recipe(segmentation):
    before = _module_before_recipe()
    images, keep = cell_batch()
    for seed in ([0, 1], [3, 7], [11, 123456]):
        old = before.make_pair(images, keep, tf.constant(seed), segmentation)[1].numpy()
        new = aug.make_pair(images, keep, tf.constant(seed), segmentation)[1].numpy()
        assert old.tobytes() == new.tobytes()
    for name in THESIS:  # what the training stream passes for the thesis' rows: the defaults
        v = get_variant(name)
        assert v.distortions == {
            "geometric": False,
            "photometric": False,
            "background_fill": "black",
            "input_mask": "none",
            "both_views": False,
            "rotation": False,
        }
        assert not v.projector


def test_recipe_fields_default_to_the_thesis_recipe():
    defaults = {f.name: f.default for f in fields(Variant) if f.name not in ("name", "kind", "features", "lambda_")}
    assert defaults["projector"] is False and defaults["geometric"] is False and defaults["photometric"] is False
    assert defaults["background_fill"] == "black"
    assert defaults["input_mask"] == "none" and defaults["both_views"] is False
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in VARIANTS)  # Dagster partition keys
    new = [v for v in VARIANTS.values() if v.name not in THESIS and v.kind == "siamese"]
    assert new, "no recipe rows"
    for v in new:  # each new row changes the recipe of the thesis row it names
        base = get_variant(re.match(r"siamese_[a-h]", v.name).group(0))
        assert v.segmentation == base.segmentation and v.features == base.features
        recipe = (v.projector, v.geometric, v.photometric, v.background_fill, v.input_mask, v.both_views, v.rotation)
        assert recipe != (False, False, False, "black", "none", False, False)


# --- mean fill ----------------------------------------------------------------------------------


def test_mean_fill_puts_the_crop_mean_where_black_fill_puts_zero():
    images, keep = cell_batch()
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    seed = tf.constant([2, 5])
    black = aug.partial_blackout(images, keep, seed).numpy()
    filled = aug.partial_blackout(images, keep, seed, fill="mean").numpy()
    blanked = (black == 0) & (images != 0)  # the square outside the cell
    assert blanked.any(axis=(1, 2, 3)).all()
    np.testing.assert_allclose(filled[blanked], np.broadcast_to(mean, images.shape)[blanked], rtol=1e-6)
    assert np.array_equal(filled[~blanked], images[~blanked])

    full = aug.full_blackout(images, keep, fill="mean").numpy()
    outside = keep < 0.5
    np.testing.assert_allclose(full[outside], np.broadcast_to(mean, images.shape)[outside], rtol=1e-6)
    assert np.array_equal(full[~outside], images[~outside])
    assert np.array_equal(aug.full_blackout(images, keep).numpy(), images * keep)  # black: as before

    view = aug.distort(images, keep, seed, "fbr", background_fill="mean").numpy()
    assert not (view == 0).any()  # nothing is black any more
    with pytest.raises(ValueError, match="background_fill"):
        aug.distort(images, keep, seed, "fbr", background_fill="grey")


# --- translation and scale jitter ---------------------------------------------------------------


def test_geometric_jitter_moves_the_cell_by_at_most_the_configured_shift():
    images, keep = cell_batch(n=64)
    moved, moved_keep = (t.numpy() for t in aug.random_resized_crop(images, keep, tf.constant([4, 2])))
    assert moved.shape == moved_keep.shape == images.shape
    assert set(np.unique(moved_keep)) <= {0.0, 1.0}
    shift = np.abs(centroid(moved_keep) - centroid(keep))
    limit = aug.MAX_SHIFT * SIZE
    assert shift.max() <= limit + 1.0  # one pixel of resampling error
    assert shift.max() > limit / 2 and np.median(shift) > 0.5  # it does move the cell
    area = moved_keep.sum(axis=(1, 2, 3)) / keep.sum(axis=(1, 2, 3))
    assert area.min() > 0.8 * aug.ZOOM[0] ** 2 and area.max() < 1.2 * aug.ZOOM[1] ** 2
    assert area.max() - area.min() > 0.15  # scale jitter, not one scale for all
    # the image moved with its mask: the bright cell lies inside the moved mask
    assert moved[moved_keep > 0].mean() > moved[moved_keep == 0].mean() + 0.2
    again = aug.random_resized_crop(images, keep, tf.constant([4, 2]))[0].numpy()
    other = aug.random_resized_crop(images, keep, tf.constant([4, 3]))[0].numpy()
    assert np.array_equal(moved, again) and not np.array_equal(moved, other)


def test_geometric_jitter_without_range_is_the_identity_and_fills_with_the_mean():
    images, keep = cell_batch(n=4)
    same, same_keep = aug.random_resized_crop(images, keep, tf.constant([0, 0]), zoom=(1.0, 1.0), max_shift=0.0)
    np.testing.assert_allclose(same.numpy(), images, atol=1e-5)
    assert np.array_equal(same_keep.numpy(), keep)
    small, _ = aug.random_resized_crop(images, None, tf.constant([0, 0]), zoom=(0.5, 0.5), max_shift=0.0)
    corner = small.numpy()[:, :4, :4]  # zoomed out to half: the corners lie outside the crop
    np.testing.assert_allclose(
        corner, np.broadcast_to(images.mean(axis=(1, 2, 3), keepdims=True), corner.shape), atol=1e-5
    )


# --- photometric jitter -------------------------------------------------------------------------


def test_photometric_jitter_changes_intensities_but_not_the_cell_shape():
    images, keep = cell_batch(n=32)
    seed = tf.constant([9, 1])
    monotone = aug.random_photometric(images, seed, max_noise=0.0).numpy()
    assert monotone.min() >= 0 and monotone.max() <= 1
    flat_in, flat_out = images.reshape(32, -1), monotone.reshape(32, -1)
    order = np.argsort(flat_in, axis=1, kind="stable")
    assert (np.diff(np.take_along_axis(flat_out, order, axis=1), axis=1) >= -1e-6).all()  # pixel order kept
    assert np.median(np.abs(flat_out.mean(1) - flat_in.mean(1))) > 0.01  # brightness moved
    assert np.median(np.abs(flat_out.std(1) / flat_in.std(1) - 1)) > 0.05  # contrast moved
    noisy = aug.random_photometric(images, seed).numpy()
    assert np.array_equal(noisy, aug.random_photometric(images, seed).numpy())
    assert np.abs(noisy - monotone).mean() > 1e-3  # the noise

    plain = aug.distort(images, keep, seed, "fbr").numpy()
    jittered = aug.distort(images, keep, seed, "fbr", photometric=True).numpy()
    assert np.array_equal(plain == 0, jittered == 0)  # same moves, same blacked-out region
    assert not np.allclose(plain, jittered, atol=0.01)


def test_recipe_rows_stream_their_distortions(tmp_path):
    crops = write_synthetic_crops(tmp_path / "cell_crops.parquet", per_plate=8, size=SIZE)
    selection = CropSelection.of(crops, seed=0)
    base = get_variant("siamese_b")
    recipes = [
        base,
        replace(base, name="x_geometric", geometric=True),
        replace(base, name="x_photometric", photometric=True),
        get_variant("siamese_b_recipe"),
    ]
    first = [tuple(t.numpy() for t in next(iter(training_dataset(selection, v, 8, 16).take(1)))) for v in recipes]
    assert all(np.array_equal(first[0][0], x) for x, _ in first)  # same crops, same order
    views = [v.tobytes() for _, v in first]
    assert len(set(views)) == len(views)  # each recipe distorts its own way


# --- projector ----------------------------------------------------------------------------------


def test_projector_is_the_papers_head():
    head = build_projector(16, 24)
    dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [24, 24, 24]
    assert not any(layer.use_bias for layer in dense)
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in head.layers) == 2
    assert head.output_shape == (None, 24)
    with pytest.raises(ValueError, match="width"):
        build_projector(16, 0)


def test_projector_trains_with_the_encoder_and_is_dropped_after_training(tmp_path):
    variant = Variant("siamese_x", "siamese", 16, 0.025, "none", 0.001, projector=True, projector_width=24)
    model, encoder, key = build_trainable(variant, SIZE)
    assert key == "bt_loss" and model.projector is not None
    assert model.projector.output_shape == (None, 24)
    assert encoder.output_shape == (None, 16)
    assert get_variant("siamese_b").projector is False
    assert build_trainable(get_variant("siamese_b"), SIZE)[0].projector is None

    head_before = [w.numpy().copy() for w in model.projector.trainable_weights]
    x = np.random.default_rng(0).random((8, SIZE, SIZE, 1)).astype(np.float32)
    model.fit(
        tf.data.Dataset.from_tensors((x, x[:, ::-1])).repeat(), steps_per_epoch=2, epochs=1, verbose=0, shuffle=False
    )
    assert any(
        not np.array_equal(a, b.numpy()) for a, b in zip(head_before, model.projector.trainable_weights, strict=True)
    )

    crops = write_synthetic_crops(tmp_path / "cell_crops.parquet", per_plate=8, size=SIZE)
    result = train_encoder(variant, crops, TrainConfig(epochs=1, max_steps_per_epoch=1, batch_size=8))
    assert result.encoder.output_shape == (None, 16)  # the embedding, not the 24-wide projection
    assert "projector" not in {layer.name for layer in result.encoder.layers}
    _, pixels = next(iter_crop_batches(crops, 8))
    assert embed_batch(result.encoder, pixels).shape == (8, 16)


def test_mlflow_params_name_the_recipe():
    from types import SimpleNamespace

    from gbm_assets.assets.encoders import TrainingConfig, _training_params

    plan = SimpleNamespace(batch_size=8, crop_size=SIZE, n_crops=24, plates=("P1",))
    recipe = Variant("siamese_x", "siamese", 16, 0.025, "fbr", 0.001, True, 24, True, True, "mean")
    p = _training_params(recipe, plan, TrainingConfig())
    assert (p["projector"], p["geometric"], p["photometric"], p["background_fill"]) == (24, True, True, "mean")
    p = _training_params(get_variant("siamese_b"), plan, TrainingConfig())
    assert (p["projector"], p["geometric"], p["photometric"], p["background_fill"]) == (0, False, False, "black")


# --- any-angle rotation -------------------------------------------------------------------------


def orientation(masks: np.ndarray) -> np.ndarray:
    """(n,) angle in degrees [0, 180) of the major axis of (n, S, S, 1) 0/1 masks (second moments)."""
    rows, cols = np.mgrid[: masks.shape[1], : masks.shape[2]]
    out = []
    for m in masks[..., 0]:
        w = m / m.sum()
        y, x = (w * rows).sum(), (w * cols).sum()
        myy, mxx, mxy = (w * (rows - y) ** 2).sum(), (w * (cols - x) ** 2).sum(), (w * (rows - y) * (cols - x)).sum()
        out.append(np.degrees(0.5 * np.arctan2(2 * mxy, mxx - myy)) % 180)
    return np.array(out)


def test_any_angle_rotation_turns_the_cell_and_its_mask_alike():
    images, keep = cell_batch(n=32, size=48)
    moved, moved_keep = (t.numpy() for t in aug.random_rotation(images, keep, tf.constant([6, 1])))
    assert set(np.unique(moved_keep)) <= {0.0, 1.0}
    area = moved_keep.sum(axis=(1, 2, 3)) / keep.sum(axis=(1, 2, 3))
    assert 0.9 < area.min() and area.max() < 1.1  # a rotation keeps the area
    assert np.abs(centroid(moved_keep) - centroid(keep)).max() < 1.0  # about the centre
    turned = orientation(moved_keep)
    assert np.ptp(orientation(keep)) < 1.0  # all ellipses lie along the rows ...
    assert (np.minimum(turned % 45, 45 - turned % 45) > 5).mean() > 0.5  # ... and are turned by any angle
    assert moved[moved_keep > 0].mean() > moved[moved_keep == 0].mean() + 0.2  # the image turned with its mask
    frame = np.concatenate([images[:, 0, :, 0], images[:, -1, :, 0]], axis=1).mean(1)
    corner = moved[:, 0, 0, 0]  # from outside the crop for most angles: the frame's mean
    assert np.median(np.abs(corner - frame)) < 0.02
    again = aug.random_rotation(images, keep, tf.constant([6, 1]))[0].numpy()
    assert np.array_equal(moved, again)

    plain = aug.distort(images, keep, tf.constant([2, 2]), "fbr").numpy()
    rotated = aug.distort(images, keep, tf.constant([2, 2]), "fbr", rotation=True).numpy()
    assert not np.array_equal(plain == 0, rotated == 0)  # the blackout follows the turned mask
