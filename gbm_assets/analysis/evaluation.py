"""How much of a cell's origin an embedding predicts: a random forest and a linear probe, held out by group.

There is no ground truth for cell types, so, as in the thesis, an embedding is judged by how
well a default random forest predicts a known label (culture of origin, plated concentration)
from it; a linear probe (standardised logistic regression, the self-supervised literature's
yardstick) is scored beside it. Every crop is tested once, in a seeded stratified group k-fold
(k = 5): the scores are the folds' mean, with their standard deviation beside them, so that one
lucky or unlucky split of a few plates cannot decide them. Each fold keeps all crops of one group
on the same side. By image: neighbouring crops overlap and share an image's illumination, so a random split would
leak and overstate accuracy. By plate: every image of a plate shares its exposure, focus and
illumination, and a plate holds one culture, so a feature that recognises the plate's look
predicts culture on held-out images without any morphology; held-out plates expose it.
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import ThreadPoolExecutor
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
from gbm_assets.models.device import cpu_cores

CLASSIFIERS = ("random_forest", "linear_probe")
N_FOLDS = 5  # group folds per evaluation: every crop is tested once, scores are the folds' mean
# Training crops per fold, at most (a seeded sample of the fold's training crops): bounds the K fits'
# cost at large samples (10,000 cells: 5 forests on 4,000 against one on 8,000 before folds).
MAX_TRAIN_CELLS = 4000
LINEAR_PROBE_MAX_ITER = 300
# Threads one evaluation uses (at most; fewer on fewer cores): the forest's trees are grown in
# parallel, and the probe's folds are fitted side by side (each with one BLAS thread). Bounded so
# that steps Dagster runs at once, and tests, do not oversubscribe a small machine.
MAX_JOBS = 2


def n_jobs() -> int:
    """Threads for one evaluation: min(MAX_JOBS, the CPU cores this process may use), at least 1."""
    return max(1, min(MAX_JOBS, cpu_cores()))


def make_classifier(name: str, seed: int = 0):
    """A fresh scikit-learn classifier: "random_forest" (defaults, as the thesis) or "linear_probe"
    (StandardScaler then multinomial LogisticRegression, L2, C = 1), seeded with seed.

    Raises
    ------
    ValueError
        If name is not one of CLASSIFIERS.
    """
    if name == "random_forest":
        return RandomForestClassifier(random_state=seed, n_jobs=n_jobs())  # same trees at any n_jobs
    if name == "linear_probe":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=LINEAR_PROBE_MAX_ITER, random_state=seed))
    raise ValueError(f"unknown classifier {name!r}; use one of {CLASSIFIERS}")


def min_images(n_folds: int = N_FOLDS) -> int:
    """Images (groups) a held-out evaluation needs: one per fold of the n_folds group k-fold (>= 2)."""
    return max(2, n_folds)


def why_not_evaluable(
    labels: pd.Series, groups: pd.Series, target: str, n_folds: int = N_FOLDS, unit: str = "image"
) -> str | None:
    """Why labels cannot be scored with held-out groups, e.g. "needs >= 2 cultures (found 1)"; None if they can.

    labels: one known label per crop (no missing values); groups: the crop's group (its image,
    or its plate: unit names it), same length. A classifier needs two classes to tell apart,
    and the k-fold one group per fold (min_images). Held out by plate, at least two classes
    must each span two or more plates, or no held-out plate shows a class seen in training.
    """
    labels, groups = pd.Series(labels).reset_index(drop=True), pd.Series(groups).reset_index(drop=True)
    n_classes = labels.nunique()
    if n_classes < 2:
        return f"needs >= 2 {target}s (found {n_classes})"
    n_groups, need = groups.nunique(), min_images(n_folds)
    if n_groups < need:
        return f"needs >= {need} {unit}s (found {n_groups})"
    if unit != "image":
        spanning = int((groups.groupby(labels).nunique() >= 2).sum())
        if spanning < 2:
            return f"needs >= 2 {target}s with >= 2 {unit}s each (found {spanning})"
    return None


def group_folds(
    labels: pd.Series, groups: pd.Series, seed: int = 0, n_folds: int = N_FOLDS
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) row positions of every fold of a seeded stratified group k-fold.

    labels and groups (the crop's image, or its plate) have one entry per crop. k = min(n_folds,
    number of groups); scikit-learn's StratifiedGroupKFold (shuffled with random_state=seed) keeps
    class shares close to the whole's. Each fold is two int64 ndarrays of row positions, shapes
    (n_train,) and (n_test,): no group is on both sides, and over the folds every crop is in
    exactly one test set. A fold the splitter leaves empty is dropped, so there can be fewer than k.

    Raises
    ------
    ValueError
        If there are fewer than 2 groups, or n_folds < 2.
    """
    n_groups = pd.Series(groups).nunique()
    k = min(n_folds, n_groups)
    if n_folds < 2 or k < 2:
        raise ValueError(
            f"need at least 2 groups (images or plates) and 2 folds, got {n_groups} groups, {n_folds} folds"
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    y = np.asarray(pd.Series(labels).astype(str))
    with warnings.catch_warnings():  # a class with fewer groups than folds cannot be in every fold: fine
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(splitter.split(np.zeros(len(y)), y, np.asarray(groups)))
    # Its greedy stratification can leave a fold with no group at all (4 groups of 2 classes
    # in 4 folds); such a fold tests nothing, so it is dropped rather than scored on 0 crops.
    return [(train, test) for train, test in folds if len(train) and len(test)]


def _fit_predict(classifier: str, seed: int, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray):
    """Fit a fresh classifier and predict x_test; run it inside _fitting() (one BLAS thread, no convergence warning)."""
    if len(np.unique(y_train)) < 2:  # a fold whose training groups hold one class: it is all a model could say
        return np.full(len(x_test), y_train[0], dtype=y_train.dtype)
    model = make_classifier(classifier, seed)
    model.fit(x_train, y_train)
    return model.predict(x_test)


def _fitting():
    """The context every fit runs in, entered once by the thread that starts the fold fits.

    One BLAS thread: the probe's small matrix products run ~40x slower when BLAS threads
    contend for shared cores (measured: 7 s against 0.16 s on 1,342 x 128 features). Both the
    BLAS limit and the warnings filter are process-wide, so they are set around all folds
    rather than per fit: a fit that ended first would otherwise restore them under another
    still running in a parallel thread.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", ConvergenceWarning)  # a probe stopped at max_iter is still a probe
    stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
    return stack


def _fold_predictions(classifier, seed, features, y, folds, trains) -> list[np.ndarray]:
    """The predictions of every fold's test crops, in fold order.

    The forest already grows its trees in n_jobs() threads; the linear probe (one thread each)
    fits up to n_jobs() folds side by side. Each fit depends on its fold alone, so the
    predictions are the same whichever thread makes them.
    """

    def fit(i: int) -> np.ndarray:
        train, test = trains[i], folds[i][1]
        return _fit_predict(classifier, seed, features[train], y[train], features[test])

    workers = 1 if classifier == "random_forest" else min(n_jobs(), len(folds))
    with _fitting():
        if workers < 2:
            return [fit(i) for i in range(len(folds))]
        with ThreadPoolExecutor(workers, thread_name_prefix="probe-fold") as pool:
            return list(pool.map(fit, range(len(folds))))


def _kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Cohen's kappa; NaN where it is undefined (a fold whose truth and predictions are one class)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that kappa is undefined: it is NaN, and left out
        return float(cohen_kappa_score(y_true, y_pred))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1) of the finite values; NaN where too few."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    mean = float(v.mean()) if len(v) else float("nan")
    return mean, float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def evaluate_features(
    features: np.ndarray,
    labels: pd.Series,
    groups: pd.Series,
    seed: int = 0,
    n_folds: int = N_FOLDS,
    classifier: str = "random_forest",
    max_train: int | None = MAX_TRAIN_CELLS,
    folds: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict:
    """Accuracy, Cohen's kappa and majority-class baseline on held-out groups, averaged over group folds.

    A classifier is trained and tested once per fold of group_folds (k = min(n_folds, groups)):
    one unlucky split of few plates no longer decides the score.

    Parameters
    ----------
    features : (n, d) ndarray of float
        One feature vector per crop (an embedding, or raw_pixel_features).
    labels : (n,) Series
        The known label per crop (culture, concentration), no missing values.
    groups : (n,) Series
        The crop's image (or plate): crops of one group stay on one side of every fold.
    classifier : {"random_forest", "linear_probe"}
        See make_classifier; both are seeded with seed, as are the folds.
    max_train : int or None
        A fold with more training crops trains on a seeded random sample of max_train of them
        (None: all); every test crop is still scored.
    folds : list of (train, test) ndarrays, optional
        group_folds(labels, groups, seed, n_folds), when the caller already has them: the folds
        depend only on labels, groups, seed and n_folds, so scoring several feature sets or
        classifiers of the same crops computes them once (score_features). None: computed here.

    Returns
    -------
    dict
        accuracy, kappa, majority_baseline: means over folds (floats; a fold where kappa is
        undefined is left out of its mean); accuracy_sd, kappa_sd, majority_baseline_sd: their
        sample standard deviations over folds (ddof = 1); fold_accuracy, fold_kappa: lists of
        the per-fold values; confusion: (c, c) int64 ndarray of counts summed over folds (every
        crop tested once), rows true, columns predicted, in the order of classes (c labels in
        natural order); n_folds; n_train (mean crops trained on per fold, rounded) and n_test
        (crops tested over all folds: n) (ints); classifier (str).

    Raises
    ------
    ValueError
        If there are fewer than 2 groups (see group_folds), or classifier is unknown.
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {classifier!r}; use one of {CLASSIFIERS}")
    features = np.asarray(features)
    labels = pd.Series(labels).reset_index(drop=True)
    y = labels.to_numpy()
    classes = sorted(labels.unique().tolist(), key=lambda v: natural_key(str(v)))
    if folds is None:
        folds = group_folds(labels, groups, seed, n_folds)
    confusion = np.zeros((len(classes), len(classes)), np.int64)
    accuracy, kappa, majority, n_train = [], [], [], []
    rng = np.random.default_rng(seed)
    trains = []  # each fold's training crops, sampled in fold order from one seeded generator
    for train, _test in folds:
        if max_train is not None and len(train) > max_train:
            train = np.sort(rng.choice(train, max_train, replace=False))
        trains.append(train)
    predictions = _fold_predictions(classifier, seed, features, y, folds, trains)
    for (_train, test), train, predicted in zip(folds, trains, predictions, strict=True):
        y_test = y[test]
        accuracy.append(float(accuracy_score(y_test, predicted)))
        kappa.append(_kappa(y_test, predicted))
        majority.append(float(np.mean(y_test == pd.Series(y[train]).value_counts().idxmax())))
        confusion += confusion_matrix(y_test, predicted, labels=classes)
        n_train.append(len(train))
    out = {}
    for name, values in (("accuracy", accuracy), ("kappa", kappa), ("majority_baseline", majority)):
        out[name], out[f"{name}_sd"] = _mean_sd(values)
    return {
        **out,
        "fold_accuracy": accuracy,
        "fold_kappa": kappa,
        "confusion": confusion,
        "classes": classes,
        "n_folds": len(folds),
        "n_train": int(round(float(np.mean(n_train)))),
        "n_test": int(sum(len(test) for _, test in folds)),
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
    """Write the confusion matrix as a PNG: colour = share of the true class, text = counts.

    result: evaluate_features' dict; its fold means ± standard deviations go in the title.
    """
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
    folds = result.get("n_folds", 1)

    def score(m: str) -> str:
        return f"{result[m]:.3f}" + (f" ± {result[m + '_sd']:.3f}" if folds > 1 else "")

    ax.set_title(
        f"{title}\naccuracy {score('accuracy')}, kappa {score('kappa')}, majority {result['majority_baseline']:.3f}"
        + (f"\n(mean ± sd over {folds} folds; counts summed over folds)" if folds > 1 else "")
    )
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
