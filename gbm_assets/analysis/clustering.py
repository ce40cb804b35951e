"""Cell types without labels: UMAP to 2-D, then HDBSCAN, an 11-component GMM and a GMM with
an automatically chosen number of components (thesis, "Clustering").

Fitted models are kept (FittedClustering) so that cells of plates that arrive later are placed
into the same clusters without refitting. They are stored as plain arrays and JSON
(save_clustering / load_clustering, no pickle), so that loading a model file cannot run code.

Small data: every method has a size it needs (UMAP neighbours, HDBSCAN's minimum cluster size
and core-distance neighbours, GMM components), so those are shrunk to what n cells allow
(sized_parameters) down to MIN_CELLS; below it fit_clusters raises TooFewCells.

Speed without other results: importing this module turns on numba's disk cache for umap's jitted
functions (_cache_umap_compilation) and gives umap a compiled all-pairs distance for data below
4,096 cells (_pairwise_distances, in place of sklearn's per-pair Python loop); both produce the
same bytes (test_clustering_speed.py).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numba
import numpy as np
import pandas as pd
from scipy.special import xlogy
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from gbm_assets.errors import InputError
from gbm_assets.schema import NEIGHBOR_DISTANCE_PX, PROVENANCE_COLUMNS


def _import_umap():
    """Import umap without TensorFlow.

    umap/__init__ imports ParametricUMAP, which loads TensorFlow (seconds and gigabytes of
    address space) that clustering never uses. Hiding TensorFlow for that one import makes
    ParametricUMAP a stub in this process; if TensorFlow is already loaded it is left alone.
    """
    if "umap" in sys.modules or "tensorflow" in sys.modules:
        import umap

        return umap
    sys.modules["tensorflow"] = None  # `import tensorflow` now raises ImportError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap
    finally:
        del sys.modules["tensorflow"]
    return umap


# Imported at module load, not lazily: unpickling a FittedClustering imports this module
# before the UMAP object inside it, so the TensorFlow-free import always wins.
umap = _import_umap()
import hdbscan  # noqa: E402

# umap's numba functions that a fit compiles: umap declares them without cache=True, so every
# process (each clusters step) compiled them again: 31 s for import and UMAP fit of 3,498 cells in
# a fresh process with an empty cache, 5 s with it filled (benchmarks/evaluation_speed.py, load 2-7).
_UMAP_JIT_MODULES = ("umap.umap_", "umap.utils", "umap.layouts", "umap.distances")
try:  # numba's internals: should a release move them, umap compiles in memory as before
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher
except ImportError:  # pragma: no cover
    NullCache = Dispatcher = None


def _cache_umap_compilation() -> int:
    """Turn on numba's on-disk cache for umap's jitted functions; returns how many were switched on.

    The same machine code is compiled once and loaded from numba's cache (umap/__pycache__, or
    numba's user-wide cache dir where that is read-only; NUMBA_CACHE_DIR overrides both) by
    later processes, so results are the same bytes. numba keys the cache on the function's
    source file, signature and CPU, so an upgraded umap or another machine compiles afresh.
    """
    switched = 0
    if Dispatcher is None:  # pragma: no cover
        return switched
    for name in _UMAP_JIT_MODULES:
        module = sys.modules.get(name)
        for value in vars(module).values() if module is not None else ():
            if isinstance(value, Dispatcher) and isinstance(getattr(value, "_cache", None), NullCache):
                try:
                    value.enable_caching()
                except (RuntimeError, AttributeError):  # no writable cache folder, or numba changed: in memory
                    return switched
                switched += 1
    return switched


@numba.njit(cache=True)
def _euclidean_matrix(x):
    """All pairwise distances of the rows of x, float32 (n, n), by umap's own euclidean."""
    n = x.shape[0]
    out = np.zeros((n, n), np.float32)
    for i in range(n):
        for j in range(i + 1, n):
            d = umap.distances.euclidean(x[i], x[j])
            out[i, j] = d
            out[j, i] = d
    return out


_sklearn_pairwise_distances = umap.umap_.pairwise_distances


def _pairwise_distances(X, Y=None, metric="euclidean", **kwds):
    """umap's pairwise_distances for a small data set (< 4,096 cells, every distance computed), compiled.

    UMAP hands sklearn.metrics.pairwise_distances its numba euclidean as a callable, which
    sklearn calls from a Python loop once per pair: 6 M calls at 3,498 cells, where the whole UMAP
    fit took 13.0 s with that loop and 4.7 s with this one (benchmarks/evaluation_speed.py). This
    computes the same float32 matrix (umap.distances.euclidean per upper-triangle pair, mirrored,
    zero diagonal; tests check it bit for bit against sklearn's loop) in one compiled loop; any
    other call goes to sklearn unchanged.
    """
    dense = isinstance(X, np.ndarray) and X.ndim == 2 and X.dtype == np.float32
    if Y is None and metric is umap.distances.euclidean and not kwds and dense and np.isfinite(X).all():
        return _euclidean_matrix(np.ascontiguousarray(X))
    return _sklearn_pairwise_distances(X, Y, metric=metric, **kwds)


N_UMAP_FUNCTIONS_CACHED = _cache_umap_compilation()
umap.umap_.pairwise_distances = _pairwise_distances

NOISE = -1
EMBEDDING_COLUMN = "embedding"
LABEL_COLUMNS = ("umap_x", "umap_y", "hdbscan", "hdbscan_noise", "gmm", "gmm_prob", "gmm_probs", "auto")

# The thesis chose min_cluster_size 220 to get 11 clusters on 7,500 cells.
THESIS_MIN_CLUSTER_SIZE = 220
THESIS_N_CELLS = 7_500


# The fewest cells the clusterings can be fitted on. UMAP's spectral initialisation takes
# n_components + 1 = 3 eigenvectors of the neighbour graph, which needs more than 3 cells
# (and so >= 3 neighbours per cell); the automatic k starts at 2 components of >= 2 cells each
# (k <= n // 2); HDBSCAN needs two clusters of at least 2 cells to find any structure, and
# labelling later cells queries 2 * min_samples >= 2 neighbours. All of this holds from 4 cells.
MIN_CELLS = 4


class TooFewCells(ValueError):
    """Fewer cells than the clusterings need (MIN_CELLS); the message says how many and why."""

    def __init__(self, n_cells: int):
        self.n_cells = n_cells
        super().__init__(
            f"{n_cells} cell{'s' if n_cells != 1 else ''} to cluster: clustering needs at least {MIN_CELLS} "
            f"(UMAP needs >= 3 neighbours per cell for its 2-D layout, the Gaussian mixtures and HDBSCAN "
            f"need >= 2 clusters of >= 2 cells)"
        )


def scaled_min_cluster_size(n_cells: int, floor: int = 15) -> int:
    """HDBSCAN min_cluster_size for n_cells, scaled linearly from the thesis' 220 at 7,500.

    A cluster is a fixed share of the cells (220 / 7,500 = 2.9 %), so the same cell types
    stay clusters as the data grows; the floor keeps tiny data sets from splitting into
    dozens of micro-clusters.
    """
    return max(floor, round(THESIS_MIN_CLUSTER_SIZE * n_cells / THESIS_N_CELLS))


PREPROCESSING = ("none", "standardize", "pca_whiten", "spherize")
# CellProfiler's neighbour measurements that neighbor_contact reads (imaging.neighbors, cell_crops).
NEIGHBOR_CLOSEST_COLUMN = f"Neighbors_FirstClosestDistance_{NEIGHBOR_DISTANCE_PX}"
NEIGHBOR_COUNT_COLUMN = f"Neighbors_NumberOfNeighbors_{NEIGHBOR_DISTANCE_PX}"
CONTEXT_COLUMNS = (NEIGHBOR_CLOSEST_COLUMN, NEIGHBOR_COUNT_COLUMN, "cell_diameter_px")


@dataclass(frozen=True)
class FeatureTransform:
    """The affine map the clusterings see the features through: (x - center) @ matrix.

    Fitted on the training cells (fit_feature_transform) and kept with the models, so that cells
    of later plates (assign_new) are mapped exactly as the training cells were.

    center : (d,) float64 ndarray, in the features' units.
    matrix : (d, k) float64 ndarray; k = d for "standardize" (diagonal 1 / sd), k <= d for
        "pca_whiten" (the principal axes divided by the square root of their variance), k =
        min(d, n) for "spherize" (the principal axes divided by sqrt(variance + mean variance)).
    """

    center: np.ndarray
    matrix: np.ndarray

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, d) features -> (n, k) float32."""
        return ((np.asarray(x, np.float64) - self.center) @ self.matrix).astype(np.float32)


def fit_feature_transform(x: np.ndarray, how: str, n_components: int = 8) -> FeatureTransform | None:
    """The preprocessing `how` (one of PREPROCESSING) fitted on the cells x (n, d), any real dtype
    (computed in float64); None for "none".

    "standardize": each feature z-scored over the cells (sklearn StandardScaler; a constant
    feature keeps scale 1), as pycytominer's normalize does. "pca_whiten": the first
    min(n_components, d, n) principal components (sklearn PCA), each scaled to unit variance
    (a component of zero variance is set to 0), so that UMAP's Euclidean distances weigh the
    few directions that carry most of the variance equally, and the many low-variance ones
    not at all. "spherize": every principal component (sklearn PCA, all min(d, n) of them)
    divided by sqrt(lambda_i + epsilon), lambda_i its variance and epsilon the mean of the
    lambda_i (the total variance / number of components). This is pycytominer's "spherize"
    normalisation (PCA whitening with epsilon added to the eigenvalues; Serrano et al. 2023,
    arXiv:2311.13417; on whitening, Kessy, Lewin & Strimmer 2018, Am Stat 72:309) with epsilon
    set by the data instead of pycytominer's 1e-6: components of more than the mean
    variance are brought to nearly equal weight (lambda >> epsilon: unit variance), components of
    less keep their share (lambda << epsilon: their scale divided by one common sqrt(epsilon)),
    so no number of components is chosen and noise directions are not amplified as full
    whitening amplifies them. n_components is not used. Measured (README, Cell types):
    siamese_b_ds2_cell's invariant embedding, 3 training seeds, HDBSCAN ARI 0.29 as it is, 0.60
    spherized, 0.02 with every component whitened.

    Raises ValueError for an unknown `how`.
    """
    if how not in PREPROCESSING:
        raise ValueError(f"preprocess must be one of {PREPROCESSING}, got {how!r}")
    if how == "none":
        return None
    x = np.asarray(x, np.float64)
    if how == "standardize":
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        return FeatureTransform(scaler.mean_, np.diag(1.0 / scaler.scale_))
    from sklearn.decomposition import PCA

    if how == "spherize":
        with np.errstate(invalid="ignore", divide="ignore"):  # constant features: sklearn's variance ratio is 0/0
            pca = PCA(min(x.shape), random_state=0).fit(x)
        variance = pca.explained_variance_
        return FeatureTransform(pca.mean_, pca.components_.T / np.sqrt(variance + max(variance.mean(), 1e-300)))
    pca = PCA(min(n_components, *x.shape), random_state=0).fit(x)
    sd = np.sqrt(pca.explained_variance_)
    scale = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 1e-12 * max(sd.max(), 1e-300))
    return FeatureTransform(pca.mean_, pca.components_.T * scale)


@dataclass(frozen=True)
class ClusteringConfig:
    """Thesis settings by default, except HDBSCAN's cluster selection; the auto_k_* and
    umap_n_epochs fields are our additions.

    hdbscan_min_cluster_size None means scaled_min_cluster_size(number of cells).
    umap_n_epochs None means UMAP's own default (200 above 10,000 cells, else 500).

    hdbscan_selection "eom" (excess of mass, HDBSCAN's own default; Campello et al. 2013), not
    the thesis' "leaf": leaf picks the leaves of the condensed tree, so one cell type whose
    density has two bumps becomes two clusters and its low-density rim noise. Measured
    (benchmarks/cluster_ceiling.py, hard synthetic plates, 1,273 cells, 5 morphotypes): on
    features that are the true type (one-hot plus noise) leaf gave 10 clusters, 28 % noise and
    ARI 0.41, eom 5 clusters, ARI 1.0; standardised hand-crafted features 0.10 -> 0.80 (leaf
    gave 0.10-0.50 as float rounding of the input moved the layout; eom 0.80 both times), raw
    pixels 0.16 -> 0.35. On the thesis' setting (benchmarks/clustering.py's 11 overlapping
    types, min_cluster_size scaled from 220) both give the same labels: ARI 0.75, 10 clusters at
    7,500 cells; 0.875 at 100,000.

    auto_k_criterion "icl": the automatic k minimises the integrated completed likelihood
    (Biernacki, Celeux & Govaert 2000, IEEE TPAMI 22:719), BIC plus twice the entropy of the
    cells' component posteriors, instead of BIC; see choose_k.
    """

    seed: int = 0
    umap_neighbors: int = 15
    umap_min_dist: float = 0.1
    umap_n_epochs: int | None = None
    hdbscan_min_samples: int = 10
    hdbscan_min_cluster_size: int | None = None
    hdbscan_selection: str = "eom"
    gmm_components: int = 11
    auto_k_min: int = 2
    auto_k_max: int = 20
    auto_k_max_cells: int = 10_000  # the k sweep runs on a random subsample this large
    auto_k_bic_tolerance: float = 0.05  # share of the BIC range counted as "flat bottom"
    auto_k_stability_runs: int = 5
    auto_k_subsample: float = 0.8
    auto_k_min_stability: float = 0.8  # mean pairwise ARI a k must reach
    auto_k_max_candidates: int = 5  # stability is measured for at most this many k
    auto_k_criterion: str = "icl"  # "icl" (integrated completed likelihood) or "bic" (as before)
    preprocess: str = "none"  # "none", "standardize", "pca_whiten" or "spherize": what UMAP sees (feature_transform)
    pca_components: int = 8  # components kept by preprocess="pca_whiten"
    # weight of the neighbour contact (neighbor_contact) appended to what UMAP sees; 0: not used
    neighbor_weight: float = 0.0
    n_jobs: int = -1  # HDBSCAN core distances; UMAP is seeded, so 1 thread

    def __post_init__(self):
        """Raises ValueError for a hdbscan_selection, auto_k_criterion or preprocess that is not one of
        the choices, or pca_components < 1."""
        for name, choices in (
            ("hdbscan_selection", ("eom", "leaf")),
            ("auto_k_criterion", ("icl", "bic")),
            ("preprocess", PREPROCESSING),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"ClusteringConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.pca_components < 1:
            raise ValueError(f"ClusteringConfig.pca_components must be >= 1, got {self.pca_components}")
        if not self.neighbor_weight >= 0:
            raise ValueError(f"ClusteringConfig.neighbor_weight must be >= 0, got {self.neighbor_weight}")

    def min_cluster_size(self, n_cells: int) -> int:
        return self.hdbscan_min_cluster_size or scaled_min_cluster_size(n_cells)


def sized_parameters(config: ClusteringConfig, n_cells: int) -> dict[str, int]:
    """The parameters actually used on n_cells: the configured ones, shrunk where n_cells is too few.

    umap_neighbors <= n_cells - 1 (a cell is not its own neighbour); hdbscan_min_cluster_size
    and gmm_components <= n_cells // 2 (at least 2 cells per cluster on average), never below 2
    and 1; hdbscan_min_samples <= n_cells // 2 (labelling a new cell queries 2 * min_samples
    training cells); auto_k_max <= n_cells // 2. On the thesis' 7,500 cells nothing is shrunk.

    Raises
    ------
    TooFewCells
        If n_cells < MIN_CELLS.
    """
    if n_cells < MIN_CELLS:
        raise TooFewCells(n_cells)
    half = n_cells // 2
    return {
        "umap_neighbors": min(config.umap_neighbors, n_cells - 1),
        "hdbscan_min_cluster_size": max(2, min(config.min_cluster_size(n_cells), half)),
        "hdbscan_min_samples": max(1, min(config.hdbscan_min_samples, half)),
        "gmm_components": max(1, min(config.gmm_components, half)),
        "auto_k_max": max(config.auto_k_min, min(config.auto_k_max, half)),
    }


@dataclass
class AutoK:
    """The chosen k and the evidence: per k its BIC and ICL, whether it is a candidate, its stability."""

    k: int
    table: pd.DataFrame  # columns k, bic, icl, candidate, stability (NaN where not measured)
    rule: str


@dataclass
class FittedClustering:
    """Everything fitted on the training cells, kept to label later cells the same way.

    umap is a umap.UMAP whose new cells are placed through exact nearest neighbours
    (ExactNeighbours), hdbscan an hdbscan.HDBSCAN with prediction data; gmm has
    params["gmm_components"] components (config.gmm_components unless the data were too few),
    auto_gmm auto_k.k. params: sized_parameters of the training cells. Store it with
    save_clustering and read it back with load_clustering (arrays and JSON, never a pickle).
    """

    config: ClusteringConfig
    n_features: int
    n_train: int
    min_cluster_size: int
    umap: object
    hdbscan: object
    gmm: GaussianMixture
    auto_gmm: GaussianMixture
    auto_k: AutoK
    timings: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    transform: FeatureTransform | None = None  # config.preprocess fitted on the training cells
    context_transform: FeatureTransform | None = None  # the neighbour context's scaling (config.neighbor_weight > 0)

    def fingerprint(self) -> str:
        """sha256 over every fitted parameter, to prove that assigning new cells changed nothing."""
        h = hashlib.sha256()
        arrays = [
            self.umap.embedding_,
            self.hdbscan.labels_,
            self.hdbscan.probabilities_,
            self.hdbscan.prediction_data_.raw_data,
            self.hdbscan.prediction_data_.core_distances,
        ]
        for gmm in (self.gmm, self.auto_gmm):
            arrays += [gmm.weights_, gmm.means_, gmm.covariances_]
        if self.transform is not None:
            arrays += [self.transform.center, self.transform.matrix]
        if self.context_transform is not None:
            arrays += [self.context_transform.center, self.context_transform.matrix]
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def split_embedding_table(table: pd.DataFrame | np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Provenance columns and float32 features of an embeddings table (or a bare matrix).

    Features are the list-valued column 'embedding' if present, else every column that is not
    provenance. Rows keep their order, so labels line up with provenance by position.

    Parameters
    ----------
    table : DataFrame or (n, d) array_like
        An embeddings table (provenance columns, plus 'embedding' of length-d float arrays or d
        feature columns), or a bare feature matrix.

    Returns
    -------
    provenance : DataFrame
        The provenance columns present (PROVENANCE_COLUMNS), n rows with a fresh RangeIndex
        (no columns for a bare matrix).
    features : (n, d) ndarray of float32
    """
    if not isinstance(table, pd.DataFrame):
        x = np.asarray(table, dtype=np.float32)
        return pd.DataFrame(index=pd.RangeIndex(len(x))), x
    prov = [c for c in PROVENANCE_COLUMNS if c in table.columns]
    if EMBEDDING_COLUMN in table.columns:
        x = np.stack(table[EMBEDDING_COLUMN].to_numpy()).astype(np.float32, copy=False)
    else:
        x = table.drop(columns=prov).to_numpy(dtype=np.float32)
    return table[prov].reset_index(drop=True), x


def _checked(x: np.ndarray, n_features: int | None = None) -> np.ndarray:
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty 2-D matrix, got shape {x.shape}")
    if n_features is not None and x.shape[1] != n_features:
        raise ValueError(f"features have {x.shape[1]} columns, the fitted models {n_features}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return x


def _gmm(k: int, seed: int) -> GaussianMixture:
    return GaussianMixture(n_components=k, random_state=seed)


def _single_threaded():
    """Run 2-D GMM work with one BLAS and one OpenMP thread.

    GMMs on 2-D points make thousands of tiny BLAS calls and short k-means runs; on the
    shared 2-core machine thread pools made the auto-k sweep 15x slower (36 s vs 2.3 s at
    10k cells), the hand-offs costing more than the arithmetic.
    """
    return threadpool_limits(limits=1)


def integrated_completed_likelihood(gmm: GaussianMixture, points: np.ndarray) -> float:
    """ICL of a fitted GMM on points, in BIC's units (lower is better).

    ICL = BIC + 2 * sum over cells and components of -t log t, t the cell's posterior
    (Biernacki, Celeux & Govaert 2000, the "ICL-BIC" approximation): the entropy term charges
    components that share cells, so a non-Gaussian cluster covered by several overlapping
    Gaussians scores worse than one component, while BIC rewards the better density fit.

    Parameters
    ----------
    gmm : GaussianMixture
        Fitted on points (or on points of the same space).
    points : (n, d) ndarray of float
        The cells it is scored on (d = gmm.n_features_in_).

    Returns
    -------
    float
        ICL, a float in BIC's units (n log-likelihood units, lower is better).
    """
    posteriors = gmm.predict_proba(points)
    return float(gmm.bic(points) - 2.0 * xlogy(posteriors, posteriors).sum())


def choose_k(points_2d: np.ndarray, config: ClusteringConfig, k_max: int | None = None) -> AutoK:
    """Pick the number of GMM components on the 2-D UMAP by ICL (or BIC), then by stability.

    Rule: (1) fit a GMM for every k in [auto_k_min, auto_k_max] and compute BIC and ICL
    (integrated_completed_likelihood); the criterion is config.auto_k_criterion. Every k whose
    criterion lies within auto_k_bic_tolerance of the criterion's range above the minimum is a
    candidate. (2) For at most auto_k_max_candidates candidates, in order (ICL: lowest ICL
    first; BIC, as before issue 13: ascending k), fit auto_k_stability_runs GMMs on random
    subsamples (auto_k_subsample of the cells, without replacement, as in consensus
    clustering), label all cells with each, and take the mean pairwise adjusted Rand index;
    stop at the first k reaching auto_k_min_stability. (3) Choose that k, else the most stable
    one measured. So with ICL the k is the criterion's best among the stable ones: stability
    filters, it does not choose. The 0.8 default sits near Hennig's clusterboot rule of thumb
    (0.75) for stable clusters; on overlapping synthetic types the true k scored 0.87, so 0.9
    rejected it. The caps bound the cost (each stability value is several GMM fits); the sweep
    runs on at most auto_k_max_cells cells.

    Why ICL: UMAP output is not a mixture of Gaussians, so BIC keeps falling slowly with k as
    more components fit each cluster's shape, and the BIC candidates were all large k. ICL is
    the criterion for the number of clusters rather than of density components (Biernacki et
    al. 2000; Baudry et al. 2010, J Comput Graph Stat 19:332). Measured (automatic-k GMM's ARI
    against the truth, BIC rule -> ICL rule): on the UMAP of hard synthetic plates
    (benchmarks/cluster_ceiling.py, 1,273 cells of 5 morphotypes) k 5 -> 5 (ARI 1.0 -> 1.0) for
    the true type as features, 19 -> 4 (0.35 -> 0.79) for standardised hand-crafted features
    (on one of their two layouts; on the other, ICL too chose 19),
    16 -> 4 (0.28 -> 0.49) for raw pixels; on the thesis' setting (benchmarks/clustering.py,
    11 overlapping types, 7,500 cells) 11 -> 9 (0.78 -> 0.78; ICL's smallest stable candidate,
    8, would score 0.69, hence the ICL order in (2)); at 100,000 cells both choose 11.

    k_max (default config.auto_k_max) caps the sweep, e.g. at n // 2 for small data.

    Parameters
    ----------
    points_2d : (n, 2) ndarray of float
        The cells' UMAP coordinates.

    Returns
    -------
    AutoK
        k, the table (k int, bic and icl float, candidate bool, stability float64 with NaN where not
        measured) and the rule in words.

    Raises
    ------
    ValueError
        If no k in [auto_k_min, k_max] is below the number of (subsampled) cells.
    """
    rng = np.random.default_rng(config.seed)
    if len(points_2d) > config.auto_k_max_cells:
        points_2d = points_2d[rng.choice(len(points_2d), config.auto_k_max_cells, replace=False)]
    n = len(points_2d)
    k_max = config.auto_k_max if k_max is None else k_max
    ks = [k for k in range(config.auto_k_min, k_max + 1) if k < n]
    if not ks:
        raise ValueError(f"too few cells ({n}) to choose a number of clusters")
    fits = [_gmm(k, config.seed).fit(points_2d) for k in ks]
    bic = np.array([g.bic(points_2d) for g in fits])
    icl = np.array([integrated_completed_likelihood(g, points_2d) for g in fits])
    score = icl if config.auto_k_criterion == "icl" else bic
    span = score.max() - score.min()
    candidate = score - score.min() <= config.auto_k_bic_tolerance * span
    stability = np.full(len(ks), np.nan)
    m = max(2, int(round(config.auto_k_subsample * n)))
    order = np.flatnonzero(candidate)
    if config.auto_k_criterion == "icl":  # best ICL first (stable sort: ties by k); BIC as before, by k
        order = order[np.argsort(score[order], kind="stable")]
        chosen, how = None, "lowest-ICL candidate with stability >= threshold"
    else:
        chosen, how = None, "smallest BIC candidate with stability >= threshold"
    for i in order[: config.auto_k_max_candidates]:
        runs = []
        for r in range(config.auto_k_stability_runs):
            idx = rng.choice(n, m, replace=False)
            runs.append(_gmm(ks[i], config.seed + 1 + r).fit(points_2d[idx]).predict(points_2d))
        stability[i] = np.mean([adjusted_rand_score(a, b) for a, b in itertools.combinations(runs, 2)])
        if stability[i] >= config.auto_k_min_stability:
            chosen = i
            break
    if chosen is None:
        chosen = int(np.nanargmax(stability))
        how = f"most stable {config.auto_k_criterion.upper()} candidate measured (none reached the threshold)"
    table = pd.DataFrame({"k": ks, "bic": bic, "icl": icl, "candidate": candidate, "stability": stability})
    rule = (
        f"{how}; candidates: {config.auto_k_criterion.upper()} within {config.auto_k_bic_tolerance:.0%} of its range above "
        f"its minimum; stability: mean pairwise ARI of {config.auto_k_stability_runs} fits on "
        f"{config.auto_k_subsample:.0%} subsamples, threshold {config.auto_k_min_stability}"
    )
    return AutoK(k=ks[chosen], table=table, rule=rule)


def fit_clusters(
    features: pd.DataFrame | np.ndarray,
    config: ClusteringConfig = ClusteringConfig(),
    context: np.ndarray | None = None,
) -> tuple[FittedClustering, pd.DataFrame]:
    """Fit UMAP, HDBSCAN, the GMM and the auto-k GMM; return them and one label row per cell.

    Parameters are shrunk for small data (sized_parameters, recorded in fitted.params). With
    config.neighbor_weight > 0, UMAP sees the (preprocessed) features with the cells' context
    (neighbor_contact) appended, scaled by fit_context_transform.

    Parameters
    ----------
    features : DataFrame or (n, d) ndarray of float
        An embeddings table or a bare matrix (see split_embedding_table); d features per cell.
    config : ClusteringConfig
        Seeds and parameters.
    context : (n,) or (n, c) ndarray of float, optional
        Per-cell context, in input order (neighbor_contact); required when
        config.neighbor_weight > 0, else not used.

    Returns
    -------
    fitted : FittedClustering
        The fitted UMAP, HDBSCAN, GMM and auto-k GMM, to label later cells (assign_new).
    labels : DataFrame
        One row per cell, in input order: the input's provenance columns, then umap_x, umap_y
        (float32, UMAP units), hdbscan (int32, -1 = noise), hdbscan_noise (bool), gmm (int32),
        gmm_prob (float32, the top posterior), gmm_probs (one float32 array of the posteriors
        per cell) and auto (int32, the auto-k GMM's component).

    Raises
    ------
    TooFewCells
        If there are fewer than MIN_CELLS cells.
    ValueError
        If the features are not a non-empty 2-D matrix or hold NaN or infinite values, or the
        context is missing, of another length or not finite while config.neighbor_weight > 0.
    """
    prov, x = split_embedding_table(features)
    x = _checked(x)
    params = sized_parameters(config, len(x))
    timings: dict[str, float] = {}
    n_features = x.shape[1]
    transform = fit_feature_transform(x, config.preprocess, config.pca_components)
    x = x if transform is None else transform.apply(x)
    context_transform = None
    if config.neighbor_weight > 0:
        context = _checked_context(context, len(x))
        context_transform = fit_context_transform(x, context, config.neighbor_weight)
        x = np.hstack([x, context_transform.apply(context)])
    t = time.perf_counter()
    reducer = _umap(config, params["umap_neighbors"])
    xy = reducer.fit_transform(x).astype(np.float32)
    # New cells find their neighbours exactly (as UMAP itself does below 4,096 cells), the
    # same way in this process and after load_clustering: no NNDescent index to store.
    reducer._knn_search_index, reducer._small_data = ExactNeighbours(reducer._raw_data), False
    timings["umap"] = time.perf_counter() - t

    t = time.perf_counter()
    min_size = params["hdbscan_min_cluster_size"]
    clusterer = _hdbscan(config, params).fit(xy)
    timings["hdbscan"] = time.perf_counter() - t

    with _single_threaded():
        t = time.perf_counter()
        gmm = _gmm(params["gmm_components"], config.seed).fit(xy)
        timings["gmm"] = time.perf_counter() - t

        t = time.perf_counter()
        auto_k = choose_k(xy, config, k_max=params["auto_k_max"])
        auto_gmm = _gmm(auto_k.k, config.seed).fit(xy)
        timings["auto_k"] = time.perf_counter() - t
        labels = _labels(prov, xy, clusterer.labels_, gmm, auto_gmm)

    fitted = FittedClustering(
        config=config,
        n_features=n_features,
        n_train=len(x),
        min_cluster_size=min_size,
        umap=reducer,
        hdbscan=clusterer,
        gmm=gmm,
        auto_gmm=auto_gmm,
        auto_k=auto_k,
        timings=timings,
        params=params,
        transform=transform,
        context_transform=context_transform,
    )
    return fitted, labels


def neighbor_contact(cells: pd.DataFrame) -> np.ndarray:
    """How closely each cell's nearest cell sits, 0 to 1: max(0, 1 - FirstClosestDistance / cell_diameter_px).

    FirstClosestDistance is CellProfiler's centroid-to-centroid distance to the nearest other
    cell of the image (Neighbors_FirstClosestDistance_<distance>, px; imaging.neighbors) and
    cell_diameter_px the plate's typical cell diameter (px) from cell finding: 1 for two centres
    in one place, 0 for a nearest centre one typical cell diameter away or farther (two typical
    round cells then no longer touch), and 0 for a cell alone in its image (NaN distance).

    Parameters
    ----------
    cells : DataFrame
        One row per cell with CONTEXT_COLUMNS (CellProfiler's FirstClosestDistance and
        NumberOfNeighbors at schema.NEIGHBOR_DISTANCE_PX, and cell_diameter_px), as cell_crops
        carries them.

    Returns
    -------
    (n,) ndarray of float64 in [0, 1].

    Raises
    ------
    ValueError
        If a column is missing, or a cell has no diameter or was not measured (crops made
        before neighbour measurements existed: materialize cell_coordinates and cell_crops again).
    """
    missing = [c for c in CONTEXT_COLUMNS if c not in cells]
    if missing:
        raise ValueError(
            f"cells lack {missing}: crops made before neighbour measurements existed; materialize "
            "cell_coordinates and cell_crops again to cluster with neighbor_weight > 0"
        )
    measured = cells[NEIGHBOR_COUNT_COLUMN]
    diameter = cells["cell_diameter_px"].to_numpy(np.float64)
    if measured.isna().any() or not (np.isfinite(diameter) & (diameter > 0)).all():
        raise ValueError(
            f"{int(measured.isna().sum())} cells without neighbour measurements or a cell diameter "
            "(cells that are not qc 'cell', or crops made before they existed): materialize "
            "cell_coordinates and cell_crops again to cluster with neighbor_weight > 0"
        )
    distance = cells[NEIGHBOR_CLOSEST_COLUMN].to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        contact = np.clip(1.0 - distance / diameter, 0.0, 1.0)
    return np.where(np.isnan(distance), 0.0, contact)


def fit_context_transform(x: np.ndarray, context: np.ndarray, weight: float) -> FeatureTransform:
    """The scaling of per-cell context before it is appended to the features UMAP sees.

    Each context column is centred and divided by its standard deviation over the cells (a
    constant column keeps scale 1), then multiplied by weight times the standard deviation of
    x along its first principal component: at weight 1 a context column spreads as widely as
    the features' widest direction (about 1 for spherized features), whatever their units.

    x : (n, k) ndarray of float, the features as UMAP sees them (after
    ClusteringConfig.preprocess); context : (n, c) ndarray of float; weight >= 0. Returns a
    FeatureTransform: center (c,) float64, matrix (c, c) float64 diagonal.
    """
    context = np.asarray(context, np.float64)
    sd = context.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    centred = np.asarray(x, np.float64) - np.asarray(x, np.float64).mean(axis=0)
    top = float(np.linalg.svd(centred, compute_uv=False)[0] / np.sqrt(max(len(x), 1))) if len(x) else 1.0
    return FeatureTransform(context.mean(axis=0), np.diag(weight * top / sd))


def _checked_context(context: np.ndarray | None, n_cells: int) -> np.ndarray:
    """context as (n, c) float64; ValueError when missing, of another length or not finite."""
    if context is None:
        raise ValueError("ClusteringConfig.neighbor_weight > 0 needs each cell's context (neighbor_contact)")
    context = np.asarray(context, np.float64)
    context = context[:, None] if context.ndim == 1 else context
    if context.ndim != 2 or len(context) != n_cells:
        raise ValueError(f"context has shape {context.shape}, expected ({n_cells}, c)")
    if not np.isfinite(context).all():
        raise ValueError("context contains NaN or infinite values")
    return context


def _umap(config: ClusteringConfig, n_neighbors: int):
    return umap.UMAP(
        n_neighbors=n_neighbors,
        min_dist=config.umap_min_dist,
        n_components=2,
        n_epochs=config.umap_n_epochs,
        random_state=config.seed,
        transform_seed=config.seed,
        low_memory=True,
        n_jobs=1,  # a seeded UMAP runs single-threaded anyway; saying so silences its warning
    )


def _hdbscan(config: ClusteringConfig, params: dict):
    return hdbscan.HDBSCAN(
        min_cluster_size=params["hdbscan_min_cluster_size"],
        min_samples=params["hdbscan_min_samples"],
        cluster_selection_method=config.hdbscan_selection,
        prediction_data=True,
        core_dist_n_jobs=config.n_jobs,
    )


class ExactNeighbours:
    """The k nearest training cells of new cells, exact (Euclidean), for UMAP.transform.

    Stands in for UMAP's NNDescent search index (same query(X, k, epsilon) -> (indices int32,
    distances float32) interface). It is rebuilt from the training vectors alone, so a stored
    model needs no index object; exact search costs one distance matrix per batch of new cells.
    Measured on 2 cores, 50,000 training cells x 128 features: transforming 8,192 new cells took
    3.8 s with it, 2.7 s with NNDescent once its search graph existed, whose first query spent
    48 s preparing it (once per process, so once per clusters run).
    """

    _angular_trees = False

    def __init__(self, train: np.ndarray):
        from sklearn.neighbors import NearestNeighbors

        self._index = NearestNeighbors(algorithm="brute", metric="euclidean").fit(np.asarray(train, np.float32))

    def query(self, x, k: int, epsilon: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        distances, indices = self._index.kneighbors(np.asarray(x, np.float32), n_neighbors=k)
        return indices.astype(np.int32), distances.astype(np.float32)


def shrunk_parameters(config: ClusteringConfig, n_cells: int) -> dict[str, dict[str, int]]:
    """{name: {"configured": c, "used": u}} for each parameter sized_parameters lowered for n_cells.

    Raises
    ------
    TooFewCells
        If n_cells < MIN_CELLS.
    """
    used = sized_parameters(config, n_cells)
    configured = {
        "umap_neighbors": config.umap_neighbors,
        "hdbscan_min_cluster_size": config.min_cluster_size(n_cells),
        "hdbscan_min_samples": config.hdbscan_min_samples,
        "gmm_components": config.gmm_components,
        "auto_k_max": config.auto_k_max,
    }
    return {k: {"configured": configured[k], "used": used[k]} for k in used if used[k] != configured[k]}


# --- storing fitted models without pickle ------------------------------------------------------

MODEL_FORMAT = "gbm-assets.clustering/1"
_GMM_ARRAYS = ("weights_", "means_", "covariances_", "precisions_cholesky_", "precisions_")
_AUTO_K_COLUMNS = ("k", "bic", "icl", "candidate", "stability")
# ClusteringConfig fields added after format 1 was first written, with the value older files were fitted with.
_CONFIG_BEFORE = {"auto_k_criterion": "bic", "preprocess": "none", "neighbor_weight": 0.0}
_UMAP_SCALARS = ("_a", "_b", "_n_neighbors", "_disconnection_distance", "_initial_alpha", "_input_hash")


class ModelFileError(InputError):
    """A stored cluster model that is not one save_clustering wrote (foreign, damaged, or of another version)."""


def save_clustering(fitted: FittedClustering, path: str | Path) -> Path:
    """Write the fitted models to one .npz file of plain numeric arrays plus a JSON header.

    Why not pickle/joblib: unpickling runs whatever code the file names, and the data folder
    that holds this file is written by instruments and colleagues; a planted file would run as
    the user. np.load(allow_pickle=False) reads only numbers and strings, so loading
    (load_clustering) cannot execute code. skops does not serialise umap.UMAP, and a digest
    kept beside the file proves nothing (whoever plants the file rewrites the digest).

    What is stored: the fitted preprocessing (FeatureTransform's center and matrix, float64,
    when config.preprocess is not "none") and the context's scaling (likewise, when
    config.neighbor_weight > 0); UMAP's training vectors (n_train, features after the
    preprocessing) float32 and 2-D layout
    (n_train, 2) float32 with its fitted constants; HDBSCAN's training points, condensed tree,
    labels and membership strengths (its prediction data is rebuilt from them); both GMMs'
    weights, means, covariances and precisions; the auto-k table. Returns path.

    Raises
    ------
    TooFewCells
        If fitted.params is empty and fitted.n_train < MIN_CELLS (no model is fitted on so few).
    OSError
        If the file cannot be written.
    """
    path = Path(path)
    reducer, clusterer = fitted.umap, fitted.hdbscan
    header = {
        "format": MODEL_FORMAT,
        "config": asdict(fitted.config),
        "n_features": fitted.n_features,
        "n_train": fitted.n_train,
        "min_cluster_size": fitted.min_cluster_size,
        "params": fitted.params or sized_parameters(fitted.config, fitted.n_train),
        "umap": {k: _plain(getattr(reducer, k)) for k in _UMAP_SCALARS},
        "gmm": _gmm_header(fitted.gmm),
        "auto_gmm": _gmm_header(fitted.auto_gmm),
        "auto_k": {"k": int(fitted.auto_k.k), "rule": fitted.auto_k.rule},
        "timings": fitted.timings,
    }
    arrays = {
        "header": np.array(json.dumps(header)),
        "umap.raw_data": np.asarray(reducer._raw_data, np.float32),
        "umap.embedding": np.asarray(reducer.embedding_, np.float32),
        "hdbscan.raw_data": np.asarray(clusterer._raw_data),
        "hdbscan.condensed_tree": np.asarray(clusterer._condensed_tree),
        "hdbscan.labels": np.asarray(clusterer.labels_),
        "hdbscan.probabilities": np.asarray(clusterer.probabilities_),
        **{f"gmm.{a}": getattr(fitted.gmm, a) for a in _GMM_ARRAYS},
        **{f"auto_gmm.{a}": getattr(fitted.auto_gmm, a) for a in _GMM_ARRAYS},
        **{f"auto_k.{c}": fitted.auto_k.table[c].to_numpy() for c in _AUTO_K_COLUMNS if c in fitted.auto_k.table},
    }
    if fitted.transform is not None:
        arrays.update({"transform.center": fitted.transform.center, "transform.matrix": fitted.transform.matrix})
    if fitted.context_transform is not None:
        arrays.update(
            {"context.center": fitted.context_transform.center, "context.matrix": fitted.context_transform.matrix}
        )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())
    return path


def load_clustering(path: str | Path, expected_fingerprint: str | None = None) -> FittedClustering:
    """Read a model written by save_clustering; no code from the file runs (np.load, allow_pickle=False).

    expected_fingerprint: FittedClustering.fingerprint() recorded when the model was fitted;
    a mismatch means the arrays are not the ones fitted.

    Raises
    ------
    ModelFileError
        Naming the file for a fingerprint mismatch and for anything else that is not a model
        save_clustering wrote: a pickle, object arrays, a missing array, arrays of the wrong
        shape, another format version (the ValueError that says so is chained).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        header = json.loads(str(arrays.pop("header")))
        if header.get("format") != MODEL_FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {MODEL_FORMAT!r}")
        fitted = _restore(header, arrays)
    except ModelFileError:
        raise
    except Exception as exc:  # np.load, zip, JSON, keys, shapes: all mean "not our model file"
        raise ModelFileError(
            path,
            f"not a cluster model written by gbm-assets ({type(exc).__name__}: {exc}); "
            "it was not loaded. Delete it or refit (clusters config refit: true)",
        ) from exc
    if expected_fingerprint is not None and fitted.fingerprint() != expected_fingerprint:
        raise ModelFileError(
            path,
            "its arrays do not match the fingerprint recorded when the model was fitted; "
            "refusing to use it. Delete it or refit (clusters config refit: true)",
        )
    return fitted


def _plain(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _gmm_header(gmm: GaussianMixture) -> dict:
    return {
        "n_components": int(gmm.n_components),
        "covariance_type": gmm.covariance_type,
        "random_state": gmm.random_state,
        "converged_": bool(gmm.converged_),
        "n_iter_": int(gmm.n_iter_),
        "lower_bound_": float(gmm.lower_bound_),
        "n_features_in_": int(gmm.n_features_in_),
    }


def _restore_gmm(head: dict, arrays: dict, prefix: str) -> GaussianMixture:
    gmm = GaussianMixture(
        n_components=head["n_components"], covariance_type=head["covariance_type"], random_state=head["random_state"]
    )
    for name in _GMM_ARRAYS:
        setattr(gmm, name, arrays[f"{prefix}.{name}"])
    for name in ("converged_", "n_iter_", "lower_bound_", "n_features_in_"):
        setattr(gmm, name, head[name])
    if gmm.means_.shape != (gmm.n_components, gmm.n_features_in_):
        raise ValueError(f"{prefix} means have shape {gmm.means_.shape}")
    return gmm


def _restore(header: dict, arrays: dict) -> FittedClustering:
    config = ClusteringConfig(**{**_CONFIG_BEFORE, **header["config"]})
    params = {k: int(v) for k, v in header["params"].items()}
    raw, layout = arrays["umap.raw_data"], arrays["umap.embedding"]
    transform = None
    if config.preprocess != "none":
        transform = FeatureTransform(arrays["transform.center"], arrays["transform.matrix"])
        if transform.center.shape != (header["n_features"],) or transform.matrix.shape[0] != header["n_features"]:
            raise ValueError(f"transform arrays have shapes {transform.center.shape} and {transform.matrix.shape}")
    umap_features = header["n_features"] if transform is None else transform.matrix.shape[1]
    context_transform = None
    if config.neighbor_weight > 0:
        context_transform = FeatureTransform(arrays["context.center"], arrays["context.matrix"])
        c = context_transform.center.shape[0]
        if context_transform.matrix.shape != (c, c):
            raise ValueError(f"context arrays have shapes {(c,)} and {context_transform.matrix.shape}")
        umap_features += c
    if raw.ndim != 2 or layout.shape != (len(raw), 2) or raw.shape[1] != umap_features:
        raise ValueError(f"UMAP arrays have shapes {raw.shape} and {layout.shape}")
    reducer = _umap(config, params["umap_neighbors"])
    reducer._raw_data, reducer.embedding_ = raw, layout
    for name, value in header["umap"].items():
        setattr(reducer, name, value)
    reducer._small_data, reducer._sparse_data, reducer._metric_kwds = False, False, {}
    reducer._knn_search_index = ExactNeighbours(raw)
    reducer.tqdm_kwds = {"desc": "Epochs completed", "disable": True}
    reducer.n_features_in_ = raw.shape[1]

    clusterer = _hdbscan(config, params)
    clusterer._raw_data = arrays["hdbscan.raw_data"]
    clusterer._condensed_tree = arrays["hdbscan.condensed_tree"]
    clusterer.labels_ = arrays["hdbscan.labels"]
    clusterer.probabilities_ = arrays["hdbscan.probabilities"]
    clusterer.generate_prediction_data()

    # Files written before ICL have no auto_k.icl column; their table has none either.
    table = pd.DataFrame({c: arrays[f"auto_k.{c}"] for c in _AUTO_K_COLUMNS if c != "icl" or "auto_k.icl" in arrays})
    return FittedClustering(
        config=config,
        n_features=int(header["n_features"]),
        n_train=int(header["n_train"]),
        min_cluster_size=int(header["min_cluster_size"]),
        umap=reducer,
        hdbscan=clusterer,
        gmm=_restore_gmm(header["gmm"], arrays, "gmm"),
        auto_gmm=_restore_gmm(header["auto_gmm"], arrays, "auto_gmm"),
        auto_k=AutoK(k=int(header["auto_k"]["k"]), table=table, rule=header["auto_k"]["rule"]),
        timings=dict(header.get("timings", {})),
        params=params,
        transform=transform,
        context_transform=context_transform,
    )


def assign_new(
    fitted: FittedClustering, features: pd.DataFrame | np.ndarray, context: np.ndarray | None = None
) -> pd.DataFrame:
    """Label cells of later plates with the fitted models, without refitting any of them.

    Parameters
    ----------
    fitted : FittedClustering
        From fit_clusters or load_clustering.
    features : DataFrame or (n, d) ndarray of float
        An embeddings table or a bare matrix (see split_embedding_table), d = fitted.n_features.
    context : (n,) or (n, c) ndarray of float, optional
        The cells' context as fit_clusters took it; required when the models were fitted with
        config.neighbor_weight > 0.

    Returns
    -------
    labels : DataFrame
        One row per cell, in input order, with the columns of fit_clusters' labels.

    Raises
    ------
    ValueError
        If the features are not a non-empty 2-D matrix of fitted.n_features columns, or hold
        NaN or infinite values, or the context is missing or not as fit_clusters took it.
    """
    prov, x = split_embedding_table(features)
    x = _checked(x, fitted.n_features)
    if fitted.transform is not None:
        x = fitted.transform.apply(x)
    if fitted.context_transform is not None:
        context = _checked_context(context, len(x))
        if context.shape[1] != fitted.context_transform.center.shape[0]:
            raise ValueError(
                f"context has {context.shape[1]} columns, the fitted models {fitted.context_transform.center.shape[0]}"
            )
        x = np.hstack([x, fitted.context_transform.apply(context)])
    xy = fitted.umap.transform(x).astype(np.float32)
    hdb, _strength = hdbscan.approximate_predict(fitted.hdbscan, xy)
    with _single_threaded():
        return _labels(prov, xy, hdb, fitted.gmm, fitted.auto_gmm)


def _labels(prov: pd.DataFrame, xy: np.ndarray, hdb: np.ndarray, gmm, auto_gmm) -> pd.DataFrame:
    probs = gmm.predict_proba(xy).astype(np.float32)
    labels = pd.DataFrame(
        {
            "umap_x": xy[:, 0],
            "umap_y": xy[:, 1],
            "hdbscan": np.asarray(hdb, dtype=np.int32),
            "hdbscan_noise": np.asarray(hdb) == NOISE,
            "gmm": probs.argmax(axis=1).astype(np.int32),
            "gmm_prob": probs.max(axis=1),
            "gmm_probs": list(probs),  # one float32 array per cell: list<float32> in Parquet
            "auto": auto_gmm.predict(xy).astype(np.int32),
        }
    )
    return pd.concat([prov, labels], axis=1)


def cluster_metrics(
    features_2d: np.ndarray,
    labels: np.ndarray,
    truth: np.ndarray | pd.Series | None = None,
    max_silhouette_cells: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """Cluster count, noise share, silhouette on clustered cells and, given truth, ARI and NMI.

    Silhouette is O(n^2), hence the subsample. ARI and NMI are over all cells with noise as
    one more group (so noise costs agreement); ari_clustered leaves noise cells out.

    Parameters
    ----------
    features_2d : (n, d) ndarray of float
        The space the silhouette is measured in (the UMAP layout, d = 2).
    labels : (n,) ndarray of int
        Cluster per cell, NOISE (-1) for unclustered cells.
    truth : (n,) array_like, optional
        The true type per cell (any hashable labels).
    max_silhouette_cells : int
        Silhouette on a seeded random subsample of at most this many clustered cells.

    Returns
    -------
    dict of str to float
        n_clusters (int), noise_fraction (0..1), silhouette (-1..1, NaN when fewer than 2
        clusters or every cell its own cluster) and, with truth, ari, nmi and ari_clustered.
    """
    labels = np.asarray(labels)
    xy = np.asarray(features_2d)
    clustered = labels != NOISE
    out: dict[str, float] = {
        "n_clusters": int(len(np.unique(labels[clustered]))),
        "noise_fraction": float(1 - clustered.mean()),
        "silhouette": float("nan"),
    }
    idx = np.flatnonzero(clustered)
    if len(idx) > max_silhouette_cells:
        idx = np.random.default_rng(seed).choice(idx, max_silhouette_cells, replace=False)
    if 2 <= len(np.unique(labels[idx])) < len(idx):
        out["silhouette"] = float(silhouette_score(xy[idx], labels[idx]))
    if truth is not None:
        truth = np.asarray(truth)
        out["ari"] = float(adjusted_rand_score(truth, labels))
        out["nmi"] = float(normalized_mutual_info_score(truth, labels))
        out["ari_clustered"] = float(adjusted_rand_score(truth[clustered], labels[clustered]))
    return out
