"""The Barlow Twins loss (Zbontar et al. 2021), as the thesis used it."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from keras import ops  # noqa: E402

_EPS = 1e-6  # keeps a constant feature (std 0) from dividing by zero


def barlow_twins_loss(z1, z2, lambda_: float):
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 for the batch cross-correlation C.

    Each feature is standardised over the batch (population std), so C is the Pearson
    correlation between the features of the two views: the first term makes the views agree,
    the second decorrelates features so that they do not all encode the same thing.

    Parameters
    ----------
    z1, z2 : (B, D) tensors or arrays of float
        Embeddings of the two views of the same B crops (row i of each is crop i), D features.
    lambda_ : float
        Weight of the off-diagonal (redundancy) term.

    Returns
    -------
    loss : scalar float32 tensor
        Between 0 (perfectly agreeing, decorrelated features) and D + lambda_ D (D - 1).
    """
    n = ops.cast(ops.shape(z1)[0], "float32")
    z1 = ops.cast(z1, "float32")
    z2 = ops.cast(z2, "float32")
    z1n = (z1 - ops.mean(z1, axis=0)) / (ops.std(z1, axis=0) + _EPS)
    z2n = (z2 - ops.mean(z2, axis=0)) / (ops.std(z2, axis=0) + _EPS)
    c = ops.matmul(ops.transpose(z1n), z2n) / n
    diag = ops.diagonal(c)
    on_diag = ops.sum(ops.square(1.0 - diag))
    off_diag = ops.sum(ops.square(c)) - ops.sum(ops.square(diag))
    return on_diag + lambda_ * off_diag
