"""Distortions for Barlow Twins pairs, as batched TensorFlow ops with stateless seeds.

Every TF function takes a whole batch (B, S, S, 1) of float32 images in [0, 1] (and, where it
matters, the matching 0/1 masks, moved exactly like the images) and a seed of shape [2].
Batched ops amortise the per-op cost inside tf.data; stateless seeds make a pair depend only
on its seed, so a training run is reproducible and every epoch can still draw fresh
distortions from a fresh seed.

PBR/FBR spare the cell: the stored mask (already only the connected component at the crop
centre) dilated with a 5x5 disc. Dilation commutes with rotations and flips, so it is done once
per crop at decode time, in NumPy (dilate_masks), where it is about 10x cheaper than any TF op.

Beyond the thesis' distortions, opt-in ones (off by default, so the thesis' variants draw exactly
the pairs they drew before): small translations and scale jitter (random_resized_crop),
brightness/contrast/gamma jitter and Gaussian noise (random_photometric), and a blackout that
fills with the crop's mean intensity instead of black (background_fill="mean"). Their seeds
come from a fold of the pair's seed that the thesis' distortions never use.

Two more opt-in pair options (make_pair): input_mask="cell" shows the encoder the cell alone in
BOTH views (mask_input: everything outside the dilated cell mask becomes the level of the
background band around the cell, so neighbours and background cannot dominate; the embedding
must then be taken of masked crops too), and both_views=True distorts the first view as well
(independently, as the Barlow Twins paper does) instead of keeping the original crop.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

MAX_BLUR_SIGMA = 1.5  # "mild": at most a 1.5-pixel Gaussian
BLUR_RADIUS = 3  # kernel half-width, 2 sigma at the strongest blur
PBR_SIDE = (0.25, 0.5)  # side of the PBR square as a fraction of the crop side
SEGMENTATIONS = ("none", "pbr", "fbr")
BACKGROUND_FILLS = ("black", "mean")
INPUT_MASKS = ("none", "cell")
BAND = 2  # width of the background band (the outer pixels of the dilated mask) whose mean fills mask_input
ZOOM = (0.9, 1.15)  # output magnification of random_resized_crop (< 1 zooms out)
MAX_SHIFT = 0.06  # largest translation of random_resized_crop, fraction of the crop side (8 px of 128)
BRIGHTNESS = 0.08  # largest added intensity (images in [0, 1])
CONTRAST = (0.75, 1.33)  # factor on the deviation from the crop's mean, log-uniform
GAMMA = (0.75, 1.33)  # exponent on the intensity, log-uniform
MAX_NOISE = 0.03  # largest standard deviation of the added Gaussian noise
_EXTRA_SEED_FOLD = 1  # stateless_fold_in key of the seeds of the opt-in distortions
_FIRST_VIEW_SEED_FOLD = 2  # stateless_fold_in key of the first view's seed (both_views=True)
_ROTATION_SEED_FOLD = 3  # stateless_fold_in key of the seed of random_rotation

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


def random_rotation(images, masks, seed):
    """Rotate each crop (and its mask alike) about its centre by an angle drawn uniformly in [0, 360).

    Bilinear resampling (tf.raw_ops.ImageProjectiveTransformV3); the corners that come from
    outside the crop get the mean of the crop's outermost pixels (for a mask_input crop, its
    fill), the mask 0; masks are thresholded back to 0/1 at 0.5. The 90-degree rotations and
    flips of the thesis cover 8 orientations; this covers all, for cells that lie at any angle.

    images: (B, S, S, 1) float32 tensor in [0, 1]; masks: the same shape, 0/1, or None; seed:
    (2,) int tensor. Returns the rotated (images, masks) (masks None when None was given).
    """
    shape = tf.shape(images)
    b, s = shape[0], shape[1]
    angle = tf.random.stateless_uniform([b], seed, 0.0, 2.0 * np.pi)
    c = (tf.cast(s, tf.float32) - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    zeros = tf.zeros_like(angle)
    # output (x, y) samples the input at R (x - c, y - c) + c
    transforms = tf.stack([cos, -sin, c - cos * c + sin * c, sin, cos, c - sin * c - cos * c, zeros, zeros], axis=1)
    frame = tf.concat(
        [images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1
    )  # (B, 4 S - 4, 1): the outermost pixels
    fill = tf.reduce_mean(frame, axis=[1, 2])[:, None, None, None]
    both = images - fill if masks is None else tf.concat([images - fill, masks], axis=-1)
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=both,
        transforms=transforms,
        output_shape=tf.stack([s, s]),
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    moved_images = tf.clip_by_value(moved[..., :1] + fill, 0.0, 1.0)
    if masks is None:
        return moved_images, None
    return moved_images, tf.cast(moved[..., 1:] >= 0.5, tf.float32)


def _log_uniform(shape, seed, bounds):
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    return tf.exp(tf.random.stateless_uniform(shape, seed, lo, hi))


def random_resized_crop(images, masks, seed, zoom=ZOOM, max_shift: float = MAX_SHIFT):
    """Small translations and scale jitter: each crop (and its mask alike) resampled from a random box.

    The box is drawn so that the crop's centre lands at most max_shift x S pixels from the
    output centre (in each axis) and appears magnified by a factor drawn log-uniformly from
    zoom. Where the box leaves the crop (zooming out, shifting), the image is filled with its
    own mean intensity (a black border would be a cue no real crop has) and the mask with 0.
    Bilinear resampling (tf.image.crop_and_resize); masks are thresholded back to 0/1 at 0.5.

    Parameters
    ----------
    images : (B, S, S, 1) float32 tensor
        Crops with intensities in [0, 1].
    masks : (B, S, S, 1) float32 tensor or None
        0/1 masks moved exactly like the images; None when there are none.
    seed : (2,) int tensor
        Stateless seed.
    zoom : (min, max) float
        Range of the magnification (1: same scale; 1.15: structures 15 % larger).
    max_shift : float
        Largest translation per axis, as a fraction of the crop side S.

    Returns
    -------
    images, masks : (B, S, S, 1) float32 tensors
        The resampled crops (in [0, 1]) and masks (None when None was given).
    """
    shape = tf.shape(images)
    b, s = shape[0], shape[1]
    scale = _log_uniform([b], seed, zoom)
    shift = tf.random.stateless_uniform(
        [2, b], tf.random.experimental.stateless_fold_in(seed, 1), -max_shift, max_shift
    )
    side = 1.0 / scale  # box side, in units of the crop side
    # an output position u (0..1) samples the input at start + u * side; the crop centre 0.5
    # appears at u = 0.5 + shift, hence:
    y0 = 0.5 - (0.5 + shift[0]) * side
    x0 = 0.5 - (0.5 + shift[1]) * side
    boxes = tf.stack([y0, x0, y0 + side, x0 + side], axis=1)
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    both = images - mean if masks is None else tf.concat([images - mean, masks], axis=-1)
    moved = tf.image.crop_and_resize(both, boxes, tf.range(b), tf.stack([s, s]), extrapolation_value=0.0)
    moved_images = tf.clip_by_value(moved[..., :1] + mean, 0.0, 1.0)
    if masks is None:
        return moved_images, None
    return moved_images, tf.cast(moved[..., 1:] >= 0.5, tf.float32)


def random_photometric(
    images, seed, brightness: float = BRIGHTNESS, contrast=CONTRAST, gamma=GAMMA, max_noise: float = MAX_NOISE
):
    """Brightness, contrast and gamma jitter, then Gaussian noise, each drawn per crop.

    x -> x ** g (gamma, g log-uniform in `gamma`), then m + c (x - m) around the crop's mean m
    (contrast, c log-uniform in `contrast`), then + d (brightness, d uniform in +-brightness),
    then + sigma N(0, 1) per pixel (sigma uniform in [0, max_noise]), clipped to [0, 1]. Without
    noise the map is monotone per crop: pixels keep their order, so a cell keeps its shape.
    Single-channel phase contrast has no colour to jitter: these are the plate-to-plate
    differences of exposure, illumination and camera noise.

    Parameters
    ----------
    images : (B, S, S, 1) float32 tensor
        Crops with intensities in [0, 1].
    seed : (2,) int tensor
        Stateless seed.
    brightness : float
        Largest added intensity.
    contrast, gamma : (min, max) float, both > 0
        Ranges of the contrast factor and the gamma exponent.
    max_noise : float
        Largest standard deviation of the noise (0: no noise).

    Returns
    -------
    images : (B, S, S, 1) float32 tensor in [0, 1]
    """
    b = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    g = _log_uniform([b, 1, 1, 1], seeds[0], gamma)
    c = _log_uniform([b, 1, 1, 1], seeds[1], contrast)
    d = tf.random.stateless_uniform([b, 1, 1, 1], seeds[2], -brightness, brightness)
    x = tf.pow(tf.clip_by_value(images, 0.0, 1.0), g)
    m = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = m + c * (x - m) + d
    if max_noise > 0:
        sigma = tf.random.stateless_uniform([b, 1, 1, 1], seeds[3], 0.0, max_noise)
        x = x + sigma * tf.random.stateless_normal(tf.shape(images), seeds[4])
    return tf.clip_by_value(x, 0.0, 1.0)


def _fill_value(images, fill: str):
    """0 for a black fill; each crop's mean intensity (B, 1, 1, 1) for a mean fill."""
    if fill not in BACKGROUND_FILLS:
        raise ValueError(f"background_fill must be one of {BACKGROUND_FILLS}, got {fill!r}")
    if fill == "black":
        return tf.zeros_like(images)
    return tf.broadcast_to(tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True), tf.shape(images))


def partial_blackout(images, keep, seed, side=PBR_SIDE, fill: str = "black"):
    """PBR: blank a random square (side drawn from `side` x crop side) except where keep is 1.

    images: (B, S, S, 1) float32 tensor; keep: the dilated cell mask (dilate_masks), as 0/1
    float32 (B, S, S, 1); seed: (2,) int tensor; side: (min, max) fraction of the crop side;
    fill: "black" (0, the thesis) or "mean" (each crop's mean intensity).
    Returns the (B, S, S, 1) float32 tensor with the square blanked. Raises ValueError for an
    unknown fill.
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
    return tf.where(square & (keep < 0.5), _fill_value(images, fill), images)


def full_blackout(images, keep, fill: str = "black"):
    """FBR: blank everything outside keep, the dilated mask of the centre cell.

    images and keep are (B, S, S, 1) float32 tensors (keep 0/1); fill "black" returns
    images * keep (the thesis), "mean" puts each crop's mean intensity outside keep instead.
    Raises ValueError for an unknown fill.
    """
    if fill == "black":
        return tf.multiply(images, keep)
    return tf.where(keep < 0.5, _fill_value(images, fill), images)


def distort(
    images,
    keep,
    seed,
    segmentation: str = "none",
    *,
    geometric: bool = False,
    photometric: bool = False,
    background_fill: str = "black",
    rotation: bool = False,
):
    """The distorted view: rotation, flips, [any-angle rotation], [translation and scale], mild blur, [intensity jitter], then PBR/FBR.

    With the defaults this is the thesis' distortion, drawing the same view from the same seed
    as before the opt-in distortions existed.

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
    rotation : bool
        After the rotation and flips, random_rotation (any angle; the mask moves alike).
    geometric : bool
        Then random_resized_crop (the mask moves alike).
    photometric : bool
        After the blur, random_photometric (before the blackout, so the blanked region stays
        exactly as the fill makes it).
    background_fill : {"black", "mean"}
        What PBR/FBR put outside the kept cell.

    Returns
    -------
    distorted : (B, S, S, 1) float32 tensor

    Raises
    ------
    ValueError
        If segmentation is not one of SEGMENTATIONS or background_fill not one of
        BACKGROUND_FILLS.
    """
    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"segmentation must be one of {SEGMENTATIONS}, got {segmentation!r}")
    if background_fill not in BACKGROUND_FILLS:
        raise ValueError(f"background_fill must be one of {BACKGROUND_FILLS}, got {background_fill!r}")
    seed = tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    extra = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, _EXTRA_SEED_FOLD), num=2
    )
    images, keep = random_rot90_and_flips(images, keep if segmentation != "none" else None, seeds[0])
    if rotation:
        images, keep = random_rotation(
            images, keep, tf.random.experimental.stateless_fold_in(seed, _ROTATION_SEED_FOLD)
        )
    if geometric:
        images, keep = random_resized_crop(images, keep, extra[0])
    images = random_blur(images, seeds[1])
    if photometric:
        images = random_photometric(images, extra[1])
    if segmentation == "pbr":
        images = partial_blackout(images, keep, seeds[2], fill=background_fill)
    elif segmentation == "fbr":
        images = full_blackout(images, keep, fill=background_fill)
    return images


def mask_input(images, keep, band: int = BAND):
    """The cell alone: every pixel outside keep set to the mean of the band of keep's outer pixels.

    keep is the dilated cell mask (dilate_masks), so its outer `band` pixels are mostly the
    background right around the cell: their mean is the local background level, and taking it
    from inside keep makes the result depend on the pixels inside keep only (whatever lies
    outside, neighbours included, cannot change it). A crop whose keep has no band (empty, or
    the whole crop) is filled with the mean of its kept pixels, or left as it is.

    Parameters
    ----------
    images : (B, S, S, 1) float32 tensor or array
        Crops with intensities in [0, 1].
    keep : (B, S, S, 1) float32 tensor or array
        0/1 dilated cell masks of the crops.
    band : int
        Width of the band, in pixels (keep minus keep eroded by a (2 band + 1) square).

    Returns
    -------
    masked : (B, S, S, 1) float32 tensor
        images inside keep, the band's mean outside.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    keep = tf.cast(tf.convert_to_tensor(keep) >= 0.5, tf.float32)
    side = 2 * band + 1
    inner = -tf.nn.max_pool2d(-keep, side, 1, "SAME")  # erosion (the crop's edge does not erode)
    ring = keep - inner
    axes = [1, 2, 3]
    n_ring = tf.reduce_sum(ring, axis=axes, keepdims=True)
    n_keep = tf.reduce_sum(keep, axis=axes, keepdims=True)
    ring_mean = tf.reduce_sum(images * ring, axis=axes, keepdims=True) / tf.maximum(n_ring, 1.0)
    keep_mean = tf.reduce_sum(images * keep, axis=axes, keepdims=True) / tf.maximum(n_keep, 1.0)
    fill = tf.where(n_ring > 0, ring_mean, keep_mean)
    return tf.where(keep >= 0.5, images, fill)


def make_pair(
    images, keep, seed, segmentation: str = "none", *, input_mask: str = "none", both_views: bool = False, **distortions
):
    """A Barlow Twins pair: as in the thesis the original crop and a distorted copy.

    Takes what distort takes, its keyword-only distortions passed through (a Variant's row
    gives them: make_pair(x, keep, seed, variant.segmentation, **variant.distortions)), and two
    options of the pair. With their defaults it returns (images, distort(...)), the thesis' pair.

    input_mask : {"none", "cell"}
        "cell": both views are made from mask_input(images, keep) (keep must be given).
    both_views : bool
        True: the first view is distort(...) too, from its own seed (a fold of seed), so the two
        views are independently distorted copies (Zbontar et al. 2021).

    Returns two (B, S, S, 1) float32 tensors.

    Raises
    ------
    ValueError
        If segmentation is not one of SEGMENTATIONS, background_fill not one of
        BACKGROUND_FILLS, input_mask not one of INPUT_MASKS, or input_mask is "cell" without keep.
    """
    if input_mask not in INPUT_MASKS:
        raise ValueError(f"input_mask must be one of {INPUT_MASKS}, got {input_mask!r}")
    if input_mask == "cell":
        if keep is None:
            raise ValueError('input_mask="cell" needs the cell masks (keep)')
        images = mask_input(images, keep)
    second = distort(images, keep, seed, segmentation, **distortions)
    if not both_views:
        return images, second
    first_seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), _FIRST_VIEW_SEED_FOLD)
    return distort(images, keep, first_seed, segmentation, **distortions), second


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
