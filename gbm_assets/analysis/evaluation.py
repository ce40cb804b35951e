"""How much of a cell's origin an embedding predicts: a random forest and a linear probe, held out by group.

There is no ground truth for cell types, so, as in the thesis, an embedding is judged by how
well a default random forest predicts a known label (culture of origin, plated concentration)
from it; a linear probe (standardised logistic regression, the self-supervised literature's
yardstick) is scored beside it. The split keeps all crops of one group on the same side. By
image: neighbouring crops overlap and share an image's illumination, so a random split would
leak and overstate accuracy. By plate: every image of a plate shares its exposure, focus and
illumination, and a plate holds one culture, so a feature that recognises the plate's look
predicts culture on held-out images without any morphology; held-out plates expose it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from gbm_assets.analysis.figures import literal_text
from gbm_assets.imaging.plates import natural_key

CLASSIFIERS = ("random_forest", "linear_probe")
LINEAR_PROBE_MAX_ITER = 300


def make_classifier(name: str, seed: int = 0):
    """A fresh scikit-learn classifier: "random_forest" (defaults, as the thesis) or "linear_probe"
    (StandardScaler then multinomial LogisticRegression, L2, C = 1), seeded with seed.

    Raises
    ------
    ValueError
        If name is not one of CLASSIFIERS.
    """
    if name == "random_forest":
        return RandomForestClassifier(random_state=seed, n_jobs=2)
    if name == "linear_probe":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=LINEAR_PROBE_MAX_ITER, random_state=seed))
    raise ValueError(f"unknown classifier {name!r}; use one of {CLASSIFIERS}")


def min_images(test_size: float = 0.2) -> int:
    """Images (groups) a held-out split needs: one per fold of a k-fold, k = round(1 / test_size) >= 2."""
    return max(2, round(1 / test_size))


def why_not_evaluable(
    labels: pd.Series, groups: pd.Series, target: str, test_size: float = 0.2, unit: str = "image"
) -> str | None:
    """Why labels cannot be scored with a held-out split, e.g. "needs >= 2 cultures (found 1)"; None if they can.

    labels: one known label per crop (no missing values); groups: the crop's group (its image,
    or its plate: unit names it), same length. A classifier needs two classes to tell apart,
    and the split one group per fold (min_images). Held out by plate, at least two classes
    must each span two or more plates, or no held-out plate shows a class seen in training.
    """
    labels, groups = pd.Series(labels).reset_index(drop=True), pd.Series(groups).reset_index(drop=True)
    n_classes = labels.nunique()
    if n_classes < 2:
        return f"needs >= 2 {target}s (found {n_classes})"
    n_groups, need = groups.nunique(), min_images(test_size)
    if n_groups < need:
        return f"needs >= {need} {unit}s (found {n_groups})"
    if unit != "image":
        spanning = int((groups.groupby(labels).nunique() >= 2).sum())
        if spanning < 2:
            return f"needs >= 2 {target}s with >= 2 {unit}s each (found {spanning})"
    return None


def split_by_group(labels: pd.Series, groups: pd.Series, seed: int = 0, test_size: float = 0.2):
    """(train, test) row positions: one fold of a stratified group k-fold, k = round(1 / test_size).

    labels and groups (the crop's image, or its plate) have one entry per crop; the fold is
    seeded (shuffled with random_state=seed) and keeps class shares close to the whole's. Returns two int ndarrays of
    row positions, shape (n_train,) and (n_test,); no group is on both sides.

    Raises
    ------
    ValueError
        If there are fewer groups (images or plates) than folds (min_images(test_size)).
    """
    folds = min_images(test_size)
    n_groups = pd.Series(groups).nunique()
    if n_groups < folds:
        raise ValueError(f"need at least {folds} images (groups) for a {test_size:.0%} test split, got {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    y = np.asarray(pd.Series(labels).astype(str))
    return next(splitter.split(np.zeros(len(y)), y, np.asarray(groups)))


def evaluate_features(
    features: np.ndarray,
    labels: pd.Series,
    groups: pd.Series,
    seed: int = 0,
    test_size: float = 0.2,
    classifier: str = "random_forest",
) -> dict:
    """Accuracy, Cohen's kappa, majority-class baseline and confusion matrix on held-out groups.

    Parameters
    ----------
    features : (n, d) ndarray of float
        One feature vector per crop (an embedding, or raw_pixel_features).
    labels : (n,) Series
        The known label per crop (culture, concentration), no missing values.
    groups : (n,) Series
        The crop's image (or plate): crops of one group stay on one side of the split.
    classifier : {"random_forest", "linear_probe"}
        See make_classifier; both are seeded with seed.

    Returns
    -------
    dict
        accuracy, kappa, majority_baseline (floats, on the test crops); confusion: (c, c) int64
        ndarray of counts, rows true, columns predicted, in the order of classes (c labels in
        natural order); n_train, n_test (ints); classifier (str).

    Raises
    ------
    ValueError
        If there are fewer groups than the split needs (see split_by_group), or classifier is unknown.
    """
    features = np.asarray(features)
    labels = pd.Series(labels).reset_index(drop=True)
    train, test = split_by_group(labels, groups, seed, test_size)
    y_train, y_test = labels.iloc[train].to_numpy(), labels.iloc[test].to_numpy()
    model = make_classifier(classifier, seed)
    # One BLAS thread: the probe's small matrix products run ~40x slower when BLAS threads
    # contend for shared cores (measured: 7 s against 0.16 s on 1,342 x 128 features).
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe stopped at max_iter is still a probe
        model.fit(features[train], y_train)
        predicted = model.predict(features[test])
    majority = pd.Series(y_train).value_counts().idxmax()
    classes = sorted(labels.unique().tolist(), key=lambda v: natural_key(str(v)))
    return {
        "accuracy": float(accuracy_score(y_test, predicted)),
        "kappa": float(cohen_kappa_score(y_test, predicted)),
        "majority_baseline": float(np.mean(y_test == majority)),
        "confusion": confusion_matrix(y_test, predicted, labels=classes),
        "classes": classes,
        "n_train": len(train),
        "n_test": len(test),
        "classifier": classifier,
    }


def raw_pixel_features(pixels: np.ndarray, size: int = 32) -> np.ndarray:
    """The thesis' raw-pixel baseline: crops block-averaged to size x size, flattened (float32).

    Parameters
    ----------
    pixels : (n, S, S) or (n, S, S, 1) ndarray of uint8 or float
        The crops; S must be a multiple of size.
    size : int
        Side of the block-averaged crop, in blocks.

    Returns
    -------
    features : (n, size * size) ndarray of float32
        Mean intensity of each (S / size)-pixel block, in the crops' intensity units, row order.

    Raises
    ------
    ValueError
        If S is not a multiple of size.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 4:
        pixels = pixels[..., 0]
    n, side = pixels.shape[0], pixels.shape[1]
    if side % size:
        raise ValueError(f"crop side {side} is not a multiple of the feature size {size}")
    f = side // size
    blocks = pixels.reshape(n, size, f, size, f).astype(np.float32)
    return blocks.mean(axis=(2, 4)).reshape(n, size * size)


@literal_text  # class names are data: drawn literally, never as $math$
def plot_confusion(result: dict, title: str, path: str | Path) -> Path:
    """Write the confusion matrix as a PNG: colour = share of the true class, text = counts."""
    counts = np.asarray(result["confusion"])
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    classes = [str(c) for c in result["classes"]]
    side = max(4.0, 0.6 * len(classes) + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), count in np.ndenumerate(counts):
        colour = "white" if shares[i, j] > 0.5 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"{title}\naccuracy {result['accuracy']:.3f}, kappa {result['kappa']:.3f}, "
        f"majority {result['majority_baseline']:.3f}"
    )
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
