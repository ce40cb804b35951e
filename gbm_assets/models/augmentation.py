"""Distortions for Barlow Twins pairs, as batched TensorFlow ops with stateless seeds.

Every TF function takes a whole batch (B, S, S, 1) of float32 images in [0, 1] (and, where it
matters, the matching 0/1 masks, moved exactly like the images) and a seed of shape [2].
Batched ops amortise the per-op cost inside tf.data; stateless seeds make a pair depend only
on its seed, so a training run is reproducible and every epoch can still draw fresh
distortions from a fresh seed.

PBR/FBR spare the cell: the stored mask (already only the connected component at the crop
centre) dilated with a 5x5 disc. Dilation commutes with rotations and flips, so it is done once
per crop at decode time, in NumPy (dilate_masks), where it is about 10x cheaper than any TF op.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

MAX_BLUR_SIGMA = 1.5  # "mild": at most a 1.5-pixel Gaussian
BLUR_RADIUS = 3  # kernel half-width, 2 sigma at the strongest blur
PBR_SIDE = (0.25, 0.5)  # side of the PBR square as a fraction of the crop side
SEGMENTATIONS = ("none", "pbr", "fbr")

_ROTATIONS = tuple((k, False, False) for k in range(4))  # (quarter turns, flip lr, flip ud)
_FLIPS = ((0, False, False), (0, True, False), (0, False, True), (0, True, True))
_ROTATIONS_AND_FLIPS = tuple((k, lr, ud) for k, _, _ in _ROTATIONS for _, lr, ud in _FLIPS)


def disc(radius: int) -> np.ndarray:
    """Binary disc, as skimage.morphology.disk (13 pixels in a 5x5 square for radius 2).

    Returns an (N, N) ndarray of bool, N = 2 radius + 1: True within radius pixels of the centre.
    """
    return np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius


def dilate_masks(masks: np.ndarray, radius: int = 2) -> np.ndarray:
    """Dilate 0/1 uint8 masks (n, S, S) with a disc: the maximum over the disc's pixel shifts.

    Parameters
    ----------
    masks : (n, S, S) ndarray of uint8
        0/1 cell masks (pixels outside the crop count as 0).
    radius : int
        Radius of the disc (see disc), in pixels.

    Returns
    -------
    dilated : (n, S, S) ndarray of uint8
        A new array; the input is left as it is.
    """
    _, h, w = masks.shape
    padded = np.pad(masks, ((0, 0), (radius, radius), (radius, radius)))
    out = masks.copy()
    for dy, dx in np.argwhere(disc(radius)):
        np.maximum(out, padded[:, dy : dy + h, dx : dx + w], out=out)
    return out


@tf.autograph.experimental.do_not_convert
def _permutation_tables(size: int, transforms) -> tf.Tensor:
    """For each (turns, flip lr, flip ud): the source pixel of every output pixel, flattened."""
    grid = np.arange(size * size, dtype=np.int32).reshape(size, size)
    tables = []
    for turns, lr, ud in transforms:
        t = np.rot90(grid, turns)
        t = t[:, ::-1] if lr else t
        t = t[::-1] if ud else t
        tables.append(t.ravel())
    return tf.constant(np.stack(tables))


def _random_permutation(images, masks, seed, transforms):
    """Move the pixels of each crop, and of its mask alike, by one randomly chosen transform.

    Each transform is a lookup table and the whole batch moves in one gather: an exact pixel
    permutation, several times cheaper on CPU than computing every transform of the batch and
    picking per crop with tf.where. masks may be None (variants without blackout).
    """
    size = images.shape[1]
    tables = _permutation_tables(size, transforms)
    both = images if masks is None else tf.concat([images, masks], axis=-1)
    shape = tf.shape(both)
    choice = tf.random.stateless_uniform([shape[0]], seed, 0, len(transforms), dtype=tf.int32)
    flat = tf.reshape(both, [shape[0], size * size, -1])
    moved = tf.reshape(tf.gather(flat, tf.gather(tables, choice), batch_dims=1), shape)
    return (moved, None) if masks is None else (moved[..., :1], moved[..., 1:])


def random_rot90(images, masks, seed):
    """Rotate each crop and its mask by the same random multiple of 90 degrees.

    Parameters
    ----------
    images : (B, S, S, 1) float32 tensor
        Crops with intensities in [0, 1].
    masks : (B, S, S, 1) float32 tensor or None
        The crops' 0/1 masks, moved exactly like the images; None when there are none.
    seed : (2,) int tensor
        Stateless seed: the same seed moves the same crops the same way.

    Returns
    -------
    images, masks : (B, S, S, 1) float32 tensors
        The moved crops and masks (masks None when None was given).
    """
    return _random_permutation(images, masks, seed, _ROTATIONS)


def random_flips(images, masks, seed):
    """Flip each crop and its mask left-right and (independently) up-down, each with p = 0.5.

    images and masks: (B, S, S, 1) float32 tensors (masks may be None), seed: (2,) int tensor;
    returns the moved (images, masks), as random_rot90 does.
    """
    return _random_permutation(images, masks, seed, _FLIPS)


def random_rot90_and_flips(images, masks, seed):
    """A random rotation, then random flips, as one gather (16 equally likely combinations).

    images and masks: (B, S, S, 1) float32 tensors (masks may be None), seed: (2,) int tensor;
    returns the moved (images, masks), as random_rot90 does.
    """
    return _random_permutation(images, masks, seed, _ROTATIONS_AND_FLIPS)


def random_blur(images, seed, max_sigma: float = MAX_BLUR_SIGMA):
    """Gaussian blur with a per-crop sigma drawn from [0, max_sigma] (sigma ~ 0 leaves it as is).

    The batch is moved to the channel axis so that one separable depthwise convolution blurs
    every crop with its own kernel; reflect padding avoids darkening the border.

    images is a (B, S, S, 1) float32 tensor with S > BLUR_RADIUS, seed a (2,) int tensor,
    max_sigma in pixels; returns the blurred (B, S, S, 1) float32 tensor.
    """
    b = tf.shape(images)[0]
    sigma = tf.random.stateless_uniform([b], seed, 0.0, max_sigma)
    t = tf.range(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(t)[None, :] / (2.0 * tf.square(tf.maximum(sigma, 1e-3))[:, None]))
    kernel = tf.transpose(kernel / tf.reduce_sum(kernel, axis=1, keepdims=True))  # (taps, B)
    x = tf.transpose(images, [3, 1, 2, 0])  # (1, H, W, B)
    r = BLUR_RADIUS
    x = tf.pad(x, [[0, 0], [r, r], [r, r], [0, 0]], mode="REFLECT")
    x = tf.nn.depthwise_conv2d(x, tf.reshape(kernel, [2 * r + 1, 1, b, 1]), [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, tf.reshape(kernel, [1, 2 * r + 1, b, 1]), [1, 1, 1, 1], "VALID")
    return tf.transpose(x, [3, 1, 2, 0])


def partial_blackout(images, keep, seed, side=PBR_SIDE):
    """PBR: zero a random square (side drawn from `side` x crop side) except where keep is 1.

    images: (B, S, S, 1) float32 tensor; keep: the dilated cell mask (dilate_masks), as 0/1
    float32 (B, S, S, 1); seed: (2,) int tensor; side: (min, max) fraction of the crop side.
    Returns the (B, S, S, 1) float32 tensor with the square zeroed.
    """
    shape = tf.shape(images)
    b, s = shape[0], shape[1]
    u = tf.random.stateless_uniform([3, b], seed)
    sides = tf.cast(tf.round(tf.cast(s, tf.float32) * (side[0] + (side[1] - side[0]) * u[0])), tf.int32)
    r0 = tf.cast(u[1] * tf.cast(s - sides + 1, tf.float32), tf.int32)
    c0 = tf.cast(u[2] * tf.cast(s - sides + 1, tf.float32), tf.int32)
    idx = tf.range(s)
    in_rows = (idx[None, :] >= r0[:, None]) & (idx[None, :] < (r0 + sides)[:, None])
    in_cols = (idx[None, :] >= c0[:, None]) & (idx[None, :] < (c0 + sides)[:, None])
    square = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]
    return tf.where(square & (keep < 0.5), tf.zeros_like(images), images)


def full_blackout(images, keep):
    """FBR: zero everything outside keep, the dilated mask of the centre cell.

    images and keep are (B, S, S, 1) float32 tensors (keep 0/1); returns images * keep.
    """
    return tf.multiply(images, keep)


def distort(images, keep, seed, segmentation: str = "none"):
    """The distorted view: rotation, flips, mild blur, then PBR/FBR if the variant asks for it.

    Parameters
    ----------
    images : (B, S, S, 1) float32 tensor
        Crops with intensities in [0, 1].
    keep : (B, S, S, 1) float32 tensor or None
        The dilated 0/1 cell masks (dilate_masks), moved with the images; may be None when
        segmentation is "none".
    seed : (2,) int tensor
        Stateless seed, split into one seed per distortion.
    segmentation : {"none", "pbr", "fbr"}
        Blackout after the moves: none, partial (partial_blackout) or full (full_blackout).

    Returns
    -------
    distorted : (B, S, S, 1) float32 tensor

    Raises
    ------
    ValueError
        If segmentation is not one of SEGMENTATIONS.
    """
    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"segmentation must be one of {SEGMENTATIONS}, got {segmentation!r}")
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
    images, keep = random_rot90_and_flips(images, keep if segmentation != "none" else None, seeds[0])
    images = random_blur(images, seeds[1])
    if segmentation == "pbr":
        images = partial_blackout(images, keep, seeds[2])
    elif segmentation == "fbr":
        images = full_blackout(images, keep)
    return images


def make_pair(images, keep, seed, segmentation: str = "none"):
    """A Barlow Twins pair as in the thesis: the original crop and a distorted copy.

    Takes what distort takes; returns (images, distort(images, keep, seed, segmentation)), two
    (B, S, S, 1) float32 tensors.

    Raises
    ------
    ValueError
        If segmentation is not one of SEGMENTATIONS.
    """
    return images, distort(images, keep, seed, segmentation)


def dihedral_views(x):
    """The 8 rotations/reflections of a batch (B, S, S, C), one at a time (bounded memory).

    Yields 8 tensors of x's shape and dtype: the 4 quarter turns of x, then those of x mirrored
    left-right.
    """
    for view in (x, tf.reverse(x, axis=[2])):
        for k in range(4):
            yield tf.image.rot90(view, k)


def dihedral_8(x):
    """The 8 rotations/reflections of a batch (B, S, S, C), stacked to (8, B, S, S, C).

    Averaging an encoder over this group gives an embedding that is exactly invariant to
    90-degree rotations and flips, which the thesis wished it had.
    """
    return tf.stack(list(dihedral_views(x)))
