"""The model variants (thesis Table 1) as one table: adding a variant is adding one row.

Rows A-H and the autoencoder are the thesis' Table 1. Rows after them add what the Barlow Twins
paper and the thesis' own discussion suggest, each as fields whose defaults keep the thesis'
rows as they were: the paper's projector head (Zbontar J, Jing L, Misra I, LeCun Y, Deny S.
"Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021,
arXiv:2103.03230), small translations and scale jitter, brightness/contrast/gamma jitter and
noise, filling the blacked-out background with the crop's mean instead of black, showing
the encoder the cell alone (input_mask), and letting its field of view span the whole cell
(downsample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Variant:
    """One encoder to train: its kind, embedding width, Barlow Twins lambda, blackout mode and recipe.

    The fields after learning_rate apply to siamese variants only; their defaults are the
    thesis' recipe, so rows that leave them out train exactly as before.

    projector : bool
        Train through the Barlow Twins paper's projector (models.encoders.build_projector:
        Linear-BN-ReLU twice, then Linear, `projector_width` units each) and take the loss on
        its output; the head is dropped after training and embeddings come from the encoder.
    geometric : bool
        Add small translations and scale jitter to the distorted view
        (models.augmentation.random_resized_crop).
    photometric : bool
        Add brightness, contrast and gamma jitter and Gaussian noise to the distorted view
        (models.augmentation.random_photometric).
    background_fill : {"black", "mean"}
        What PBR/FBR put outside the kept cell: black (the thesis) or the crop's mean intensity.
    rotation : bool
        Rotate the distorted view by any angle (models.augmentation.random_rotation), beyond
        the thesis' 90-degree turns and flips.
    input_mask : {"none", "cell"}
        "cell": the encoder sees the cell alone, in both training views and when embedding
        (models.augmentation.mask_input: outside the dilated cell mask, the level of the
        background around the cell), so neighbours and background cannot dominate. Applies to
        the autoencoder too.
    both_views : bool
        Distort both views independently (the Barlow Twins paper) instead of pairing the
        original crop with one distorted copy (the thesis).
    downsample : int
        The encoder averages downsample x downsample pixel blocks before its first convolution
        (models.encoders.build_siamese_encoder), so that its last block sees the whole cell
        rather than a 46-pixel part of it; 1: the thesis' encoder.
    cluster_vector : {"embedding", "embedding_invariant"}
        The vector the clusters asset clusters by default (its run config's `vector` overrides
        it): the plain embedding (the thesis) or its rotation/flip-invariant mean.
    cluster_preprocess : str
        The map the clusters asset puts before UMAP by default (analysis.clustering
        ClusteringConfig.preprocess; its run config's `preprocess` overrides it); "none": the
        thesis' UMAP of the embedding as it is.
    cluster_neighbor_weight : float
        The weight of the cells' neighbour contact beside the vector by default (analysis.
        clustering ClusteringConfig.neighbor_weight; the run config's `neighbor_weight`
        overrides it); 0: not used (the thesis).
    """

    name: str
    kind: Literal["autoencoder", "siamese"]
    features: int
    lambda_: float | None  # Barlow Twins off-diagonal weight; None for the autoencoder
    segmentation: Literal["none", "pbr", "fbr"]  # blackout of the distorted view
    learning_rate: float
    projector: bool = False
    projector_width: int = 512  # units of each projector layer (the paper: 8192 on 2048 features)
    geometric: bool = False
    photometric: bool = False
    background_fill: Literal["black", "mean"] = "black"
    input_mask: Literal["none", "cell"] = "none"
    both_views: bool = False
    rotation: bool = False
    downsample: int = 1
    cluster_vector: Literal["embedding", "embedding_invariant"] = "embedding"
    cluster_preprocess: str = "none"
    cluster_neighbor_weight: float = 0.0

    @property
    def distortions(self) -> dict:
        """Keyword arguments of models.augmentation.make_pair beyond the segmentation (also MLflow params)."""
        return {
            "geometric": self.geometric,
            "photometric": self.photometric,
            "background_fill": self.background_fill,
            "input_mask": self.input_mask,
            "both_views": self.both_views,
            "rotation": self.rotation,
        }


_TABLE = (
    #       name           kind           features lambda_ segmentation lr
    Variant("autoencoder", "autoencoder", 64, None, "none", 0.01),
    Variant("siamese_a", "siamese", 128, 0.01, "none", 0.001),
    Variant("siamese_b", "siamese", 128, 0.1, "none", 0.001),
    Variant("siamese_c", "siamese", 128, 0.005, "none", 0.001),
    Variant("siamese_d", "siamese", 32, 0.01, "none", 0.001),
    Variant("siamese_e", "siamese", 128, 0.1, "pbr", 0.001),
    Variant("siamese_f", "siamese", 128, 0.01, "pbr", 0.001),
    Variant("siamese_g", "siamese", 128, 0.005, "pbr", 0.001),
    Variant("siamese_h", "siamese", 128, 0.01, "fbr", 0.001),
    # beyond the thesis, each kept for a gain measured over its base row (README, "SSL recipe
    # rows"); geometric or photometric jitter alone, both_views and rotation gained nothing and
    # have no row.
    # The projector's 512-wide loss has 16x the off-diagonal terms of B's 128: lambda / 4 keeps
    # the balance of the loss' two terms where B has it.
    Variant("siamese_b_projector", "siamese", 128, 0.025, "none", 0.001, projector=True),
    Variant("siamese_b_recipe", "siamese", 128, 0.025, "none", 0.001, projector=True, geometric=True, photometric=True),
    Variant("siamese_h_mean", "siamese", 128, 0.01, "fbr", 0.001, background_fill="mean"),
    # B with the cell alone in both views and when embedding. Far ahead of B and of
    # siamese_b_projector in ARI and every kappa, but not in composition error at the shipped
    # budget, so it did not replace that row.
    Variant("siamese_b_cell", "siamese", 128, 0.1, "none", 0.001, input_mask="cell"),
    # siamese_b_cell at half resolution: the encoder's last block sees 92 crop pixels, the whole
    # cell, instead of 46, and its convolutions cost a quarter. Ahead of siamese_b_cell in every
    # kappa and ARI in two seeds at the shipped budget (README, "SSL recipe rows"). Clustered by
    # its invariant embedding, spherized: its first principal component (the cell's area, ~90 %
    # of the variance) otherwise decides UMAP's neighbours and merges stars with large flat cells
    # of the same area (README, Cell types).
    Variant(
        "siamese_b_ds2_cell",
        "siamese",
        128,
        0.1,
        "none",
        0.001,
        input_mask="cell",
        downsample=2,
        cluster_vector="embedding_invariant",
        cluster_preprocess="spherize",
        # its cell-alone crop hides the neighbours that make a cell a clump member; the neighbour
        # contact beside it splits clumps from small round cells (README, Cell types)
        cluster_neighbor_weight=2.0,
    ),
)

VARIANTS: dict[str, Variant] = {v.name: v for v in _TABLE}


def variant_names() -> list[str]:
    """Variant names in table order (the static partition keys of the variant assets)."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    """The variant of that name (a row of the thesis' Table 1).

    Raises
    ------
    KeyError
        If no variant has that name; the message lists the known ones.
    """
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown model variant {name!r}; known variants: {', '.join(VARIANTS)}") from None
