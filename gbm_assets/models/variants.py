"""The model variants (thesis Table 1) as one table: adding a variant is adding one row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Variant:
    """One encoder to train: its kind, embedding width, Barlow Twins lambda and blackout mode."""

    name: str
    kind: Literal["autoencoder", "siamese"]
    features: int
    lambda_: float | None  # Barlow Twins off-diagonal weight; None for the autoencoder
    segmentation: Literal["none", "pbr", "fbr"]  # blackout of the distorted view
    learning_rate: float


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
