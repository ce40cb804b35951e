"""The two encoder architectures of the thesis as Keras 3 functional models.

Both take crops of shape (S, S, 1) with intensities in [0, 1]. Four down-sampling blocks of
16-32-64-128 filters with one 3x3 convolution each keep a forward pass near 60 MMAC per 128x128
crop, so training on a few CPU cores stays feasible; S must be a multiple of 16.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from keras import layers  # noqa: E402

FILTERS = (16, 32, 64, 128)
DROPOUT = 0.1


def _check_crop_size(crop_size: int, downsample: int = 1) -> None:
    step = 2 ** len(FILTERS) * downsample
    if crop_size < step or crop_size % step:
        raise ValueError(f"crop_size must be a positive multiple of {step}, got {crop_size}")


def build_autoencoder(crop_size: int = 128, features: int = 64) -> tuple[keras.Model, keras.Model]:
    """A U-Net without skip connections: (autoencoder, encoder).

    Without skips every bit of the reconstruction has to pass through the `features`-wide
    bottleneck, which is what makes the bottleneck a morphology embedding.

    Parameters
    ----------
    crop_size : int
        Side S of the square crops, in pixels; a positive multiple of 16.
    features : int
        Width of the embedding (the bottleneck).

    Returns
    -------
    autoencoder : keras.Model
        (batch, S, S, 1) float32 crops in [0, 1] -> (batch, S, S, 1) float32 reconstructions in
        [0, 1] (sigmoid).
    encoder : keras.Model
        (batch, S, S, 1) float32 crops -> (batch, features) float32 embeddings; shares its layers
        with the autoencoder.

    Raises
    ------
    ValueError
        If crop_size is not a positive multiple of 16.
    """
    _check_crop_size(crop_size)
    inputs = keras.Input((crop_size, crop_size, 1), name="crop")
    x = inputs
    for filters in FILTERS:
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    bottom = x.shape[1:]
    code = layers.Dense(features, name="embedding")(layers.Flatten()(x))
    encoder = keras.Model(inputs, code, name="ae_encoder")

    y = layers.Dense(bottom[0] * bottom[1] * bottom[2], activation="relu")(code)
    y = layers.Reshape(bottom)(y)
    for filters in reversed(FILTERS):
        y = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", use_bias=False)(y)
        y = layers.BatchNormalization()(y)
        y = layers.ReLU()(y)
    outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="reconstruction")(y)
    autoencoder = keras.Model(inputs, outputs, name="autoencoder")
    return autoencoder, encoder


def build_siamese_encoder(crop_size: int = 128, features: int = 128, downsample: int = 1) -> keras.Model:
    """The shared Barlow Twins branch: conv/max-pool/dropout blocks, GAP, dense, batch norm.

    Global average pooling makes the embedding independent of where in the crop a structure
    lies; the final batch normalisation matches the standardisation inside the loss. Each
    output of the last block (four 3x3 convolutions, each followed by a 2x2 max-pool) sees at
    most a 46-pixel square of its input, less than a large cell; `downsample` > 1 first
    averages downsample x downsample pixel blocks (AveragePooling2D), so that square covers
    46 x downsample crop pixels, the whole cell, at a quarter (downsample 2) of the
    convolutions' cost. downsample 1 adds no layer: the thesis' encoder as it was.

    Parameters
    ----------
    crop_size : int
        Side S of the square crops, in pixels; a positive multiple of 16 x downsample.
    features : int
        Width D of the embedding.
    downsample : int
        Side of the pixel blocks averaged before the first convolution (1: none).

    Returns
    -------
    encoder : keras.Model
        (batch, S, S, 1) float32 crops in [0, 1] -> (batch, D) float32 embeddings.

    Raises
    ------
    ValueError
        If downsample < 1 or crop_size is not a positive multiple of 16 x downsample.
    """
    if downsample < 1:
        raise ValueError(f"downsample must be >= 1, got {downsample}")
    _check_crop_size(crop_size, downsample)
    inputs = keras.Input((crop_size, crop_size, 1), name="crop")
    x = inputs
    if downsample > 1:
        x = layers.AveragePooling2D(downsample, name="downsample")(x)
    for filters in FILTERS:
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(DROPOUT)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(features)(x)
    outputs = layers.BatchNormalization(name="embedding")(x)
    return keras.Model(inputs, outputs, name="siamese_encoder")


def build_projector(features: int = 128, width: int = 512) -> keras.Model:
    """The Barlow Twins projector head: (Linear-BN-ReLU) x 2, then Linear.

    As in Zbontar et al. 2021 ("Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", ICML; facebookresearch/barlowtwins: bias-free linear layers, 8192 units on a
    2048-feature ResNet-50). The loss is taken on its output and the head is dropped after
    training: the embedding is the encoder's output, which the paper found to transfer better
    than the projector's.

    Parameters
    ----------
    features : int
        Width of the encoder's output (the head's input).
    width : int
        Units of each of the three linear layers (the loss' dimension).

    Returns
    -------
    projector : keras.Model
        (batch, features) float32 -> (batch, width) float32.

    Raises
    ------
    ValueError
        If features or width is below 1.
    """
    if features < 1 or width < 1:
        raise ValueError(f"features and width must be >= 1, got {features} and {width}")
    inputs = keras.Input((features,), name="embedding")
    x = inputs
    for _ in range(2):
        x = layers.Dense(width, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    outputs = layers.Dense(width, use_bias=False, name="projection")(x)
    return keras.Model(inputs, outputs, name="projector")
