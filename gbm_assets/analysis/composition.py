"""Cell-type composition of each culture, its uncertainty, and whether culture and type are related."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

NOISE = -1


def _frame(labels, cultures) -> pd.DataFrame:
    labels, cultures = np.asarray(labels), np.asarray(cultures)
    if labels.shape != cultures.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and cultures {cultures.shape} must be 1-D, same length")
    return pd.DataFrame({"culture": cultures, "cluster": labels})


def composition(
    labels,
    cultures,
    n_boot: int = 1000,
    seed: int = 0,
    include_noise: bool = False,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Proportion of each cluster per culture with percentile bootstrap confidence intervals.

    Bootstrap: resample a culture's cells with replacement, which for counts is one
    multinomial draw of the culture's size with the observed proportions, so n_boot
    resamples cost one vectorised call per culture. Noise (-1) is left out unless
    include_noise, so proportions are shares of the clustered cells and sum to 1 per culture.
    Returns one row per (culture, cluster), every cluster listed for every culture.
    """
    df = _frame(labels, cultures)
    if not include_noise:
        df = df[df["cluster"] != NOISE]
    counts = pd.crosstab(df["culture"], df["cluster"])
    rng = np.random.default_rng(seed)
    tail = (1 - ci) / 2 * 100
    rows = []
    for culture, row in counts.iterrows():
        c = row.to_numpy()
        n = int(c.sum())
        p = c / n
        boot = rng.multinomial(n, p, size=n_boot) / n
        low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
        rows.append(pd.DataFrame({
            "culture": culture,
            "cluster": counts.columns.to_numpy(),
            "proportion": p,
            "ci_low": low,
            "ci_high": high,
            "n_cells": c,
            "n_culture": n,
        }))
    columns = ["culture", "cluster", "proportion", "ci_low", "ci_high", "n_cells", "n_culture"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def chi_square_culture_vs_type(labels, cultures) -> dict[str, float]:
    """Chi-square test of independence of culture and cluster, with Cramer's V as effect size.

    Noise cells are dropped first, so the table lists only cultures and clusters that still
    have cells (no empty rows or columns, which would break the expected counts). With fewer
    than two of either there is nothing to test and every value is NaN.
    """
    df = _frame(labels, cultures)
    df = df[df["cluster"] != NOISE]
    table = pd.crosstab(df["culture"], df["cluster"])
    n = int(table.to_numpy().sum())
    if min(table.shape) < 2:
        nan = float("nan")
        return {"chi2": nan, "dof": 0, "p_value": nan, "cramers_v": nan, "n_cells": n}
    chi2, p, dof, _ = chi2_contingency(table.to_numpy())
    v = np.sqrt(chi2 / (n * (min(table.shape) - 1)))
    return {"chi2": float(chi2), "dof": int(dof), "p_value": float(p), "cramers_v": float(v), "n_cells": n}


def composition_error(cluster_labels, true_morphotypes, cultures) -> dict:
    """How far the estimated per-culture morphotype proportions are from the truth (synthetic plates).

    Mapping: each cluster is named after the morphotype most of its cells have (many-to-one,
    so a type split into several clusters is not penalised, but two types merged into one
    cluster are). Estimated proportions are over clustered cells (noise left out, as in
    composition); true ones over all cells of the culture. mae is the mean absolute
    difference over every (culture, morphotype) pair.
    """
    df = _frame(cluster_labels, cultures)
    df["truth"] = np.asarray(true_morphotypes)
    clustered = df[df["cluster"] != NOISE]
    majority = clustered.groupby("cluster")["truth"].agg(lambda s: s.value_counts().index[0])
    mapping = {int(c): t.item() if hasattr(t, "item") else t for c, t in majority.items()}
    estimated = pd.crosstab(
        clustered["culture"], clustered["cluster"].map(mapping), normalize="index"
    )
    true = pd.crosstab(df["culture"], df["truth"], normalize="index")
    estimated = estimated.reindex(index=true.index, columns=true.columns, fill_value=0.0)
    table = pd.DataFrame({
        "estimated": estimated.stack(),
        "true": true.stack(),
    }).rename_axis(["culture", "morphotype"]).reset_index()
    mae = float((table["estimated"] - table["true"]).abs().mean())
    return {"mae": mae, "mapping": mapping, "table": table}
