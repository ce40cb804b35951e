"""Cell-type composition of each culture, its uncertainty, and whether culture and type are related."""

from __future__ import annotations

import math

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
    labels, cultures, n_boot: int = 1000, seed: int = 0, include_noise: bool = False, ci: float = 0.95
) -> pd.DataFrame:
    """Proportion of each cluster per culture with percentile bootstrap confidence intervals.

    Bootstrap: resample a culture's cells with replacement, which for counts is one
    multinomial draw of the culture's size with the observed proportions, so n_boot
    resamples cost one vectorised call per culture. Noise (-1) is left out unless
    include_noise, so proportions are shares of the clustered cells and sum to 1 per culture.

    Parameters
    ----------
    labels : (n,) array_like of int
        Cluster per cell, -1 (NOISE) for unclustered cells.
    cultures : (n,) array_like
        Culture per cell.
    n_boot : int
        Bootstrap resamples per culture.
    ci : float
        Coverage of the interval, in (0, 1).

    Returns
    -------
    DataFrame
        One row per (culture, cluster), every cluster listed for every culture: proportion,
        ci_low, ci_high (float64, 0..1), n_cells (cells of that cluster in the culture) and
        n_culture (the culture's cells counted); empty, with these columns, for no cells.

    Raises
    ------
    ValueError
        If labels and cultures are not 1-D and of the same length.
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
        rows.append(
            pd.DataFrame(
                {
                    "culture": culture,
                    "cluster": counts.columns.to_numpy(),
                    "proportion": p,
                    "ci_low": low,
                    "ci_high": high,
                    "n_cells": c,
                    "n_culture": n,
                }
            )
        )
    columns = ["culture", "cluster", "proportion", "ci_low", "ci_high", "n_cells", "n_culture"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def chi_square_culture_vs_type(labels, cultures) -> dict[str, float]:
    """Chi-square test of independence of culture and cluster, with Cramer's V as effect size.

    Noise cells are dropped first, so the table lists only cultures and clusters that still
    have cells (no empty rows or columns, which would break the expected counts). With fewer
    than two of either there is nothing to test and every value is NaN.

    labels (int, -1 = noise) and cultures are (n,) array_likes, one entry per cell. Returns
    chi2, p_value and cramers_v (floats; V in 0..1), dof and n_cells (ints, n_cells = clustered
    cells tested).

    Raises
    ------
    ValueError
        If labels and cultures are not 1-D and of the same length.
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

    cluster_labels (int, -1 = noise), true_morphotypes and cultures are (n,) array_likes, one
    entry per cell. Returns mae (float, in proportion units 0..1), mapping (cluster -> morphotype)
    and table (culture, morphotype, estimated, true).

    Raises
    ------
    ValueError
        If cluster_labels and cultures are not 1-D and of the same length.
    """
    df = _frame(cluster_labels, cultures)
    df["truth"] = np.asarray(true_morphotypes)
    clustered = df[df["cluster"] != NOISE]
    majority = clustered.groupby("cluster")["truth"].agg(lambda s: s.value_counts().index[0])
    mapping = {int(c): t.item() if hasattr(t, "item") else t for c, t in majority.items()}
    estimated = pd.crosstab(clustered["culture"], clustered["cluster"].map(mapping), normalize="index")
    true = pd.crosstab(df["culture"], df["truth"], normalize="index")
    estimated = estimated.reindex(index=true.index, columns=true.columns, fill_value=0.0)
    table = (
        pd.DataFrame({"estimated": estimated.stack(), "true": true.stack()})
        .rename_axis(["culture", "morphotype"])
        .reset_index()
    )
    mae = float((table["estimated"] - table["true"]).abs().mean())
    return {"mae": mae, "mapping": mapping, "table": table}


# --- replicates, not cells, as the independent units ------------------------------------------
#
# Why not a chi-square over cells: the chi-square test of culture x cell type counts every cell
# as an independent draw. Cells of one well (or plate) are not: they share its seeding density,
# confluence, medium, focus and illumination, so the composition varies from replicate to
# replicate by more than multinomial sampling of cells explains. The chi-square's standard errors
# shrink as 1/sqrt(cells) while the replicate-to-replicate variation does not shrink at all, so
# with thousands of cells any such variation is declared "significant" (pseudoreplication, Lazic
# 2010, BMC Neuroscience 11:5). The tests below take one composition per replicate, so their
# sample size is the number of replicates, and their null distribution comes from exchanging
# culture labels between replicates (a permutation test, valid for any number of replicates).

UNIT_LEVELS = ("replicate", "image")


def experimental_units(rows: pd.DataFrame, level: str = "auto") -> tuple[pd.Series, str]:
    """The independent unit of every cell, and the level used.

    rows: one row per cell with `plate`, `replicate` and (for level "image") `image`.
    level "replicate": plate + replicate (a well or plate of a culture seeded separately);
    "image": plate + replicate + image (imaging fields of one replicate are not independent
    biological replicates, but resampling them is better than resampling cells);
    "auto": "replicate" when some culture has more than one replicate (there are more
    replicate units than cultures), else "image". Returns (unit ids as str, aligned with rows,
    level). Raises ValueError naming the missing columns or an unknown level.
    """
    if level not in (*UNIT_LEVELS, "auto"):
        raise ValueError(f"unit level must be one of {UNIT_LEVELS + ('auto',)}, got {level!r}")
    need = ["plate", "replicate"] + (["image"] if level != "replicate" else [])
    missing = [c for c in need if c not in rows]
    if missing:
        raise ValueError(f"cells lack the provenance columns {missing} that define experimental units")
    replicate = rows["plate"].astype(str) + ":r" + rows["replicate"].astype(str)
    if level == "auto":
        n_cultures = rows["culture"].nunique() if "culture" in rows else 1
        level = "replicate" if replicate.nunique() > n_cultures else "image"
    units = replicate if level == "replicate" else replicate + ":" + rows["image"].astype(str)
    return units, level


def unit_proportions(labels, cultures, units, include_noise: bool = False) -> tuple[pd.DataFrame, pd.Series]:
    """Per-unit counts (units x clusters) and each unit's culture.

    Raises ValueError if a unit holds cells of more than one culture (the unit ids are wrong).
    """
    df = _frame(labels, cultures)
    units = np.asarray(units)
    if units.shape != (len(df),):
        raise ValueError(f"units {units.shape} must have one entry per cell ({len(df)})")
    df["unit"] = units.astype(str)
    if not include_noise:
        df = df[df["cluster"] != NOISE]
    per_unit = df.groupby("unit")["culture"].nunique()
    if (per_unit > 1).any():
        raise ValueError(f"experimental unit {per_unit[per_unit > 1].index[0]!r} holds cells of several cultures")
    counts = pd.crosstab(df["unit"], df["cluster"])
    culture = df.groupby("unit")["culture"].first().reindex(counts.index)
    return counts, culture


def composition_by_units(
    labels, cultures, units, n_boot: int = 1000, seed: int = 0, include_noise: bool = False, ci: float = 0.95
) -> pd.DataFrame:
    """composition()'s table with intervals from a cluster bootstrap over experimental units.

    The point estimate is the pooled share of a culture's clustered cells in each cluster, as in
    composition(); each of n_boot resamples draws the culture's units with replacement (seeded)
    and pools their cells again, so the interval reflects replicate-to-replicate variation, not
    only the number of cells. A culture with one unit gets a zero-width interval (nothing to
    resample): its n_units column says so. Columns: those of composition() plus n_units.

    labels (int, -1 = noise), cultures and units (experimental_units' ids) are (n,) array_likes,
    one entry per cell.

    Raises
    ------
    ValueError
        If labels, cultures and units are not 1-D and of one length, or a unit holds cells of
        more than one culture (see unit_proportions).
    """
    counts, unit_culture = unit_proportions(labels, cultures, units, include_noise)
    rng = np.random.default_rng(seed)
    tail = (1 - ci) / 2 * 100
    rows = []
    for culture in sorted(unit_culture.unique(), key=str):
        c = counts[(unit_culture == culture).to_numpy()].to_numpy(float)
        m = len(c)
        pooled = c.sum(axis=0)
        n = int(pooled.sum())
        weights = rng.multinomial(m, np.full(m, 1 / m), size=n_boot)  # (n_boot, m) unit multiplicities
        boot = weights @ c
        boot = boot / np.maximum(boot.sum(axis=1, keepdims=True), 1)
        low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
        rows.append(
            pd.DataFrame(
                {
                    "culture": culture,
                    "cluster": counts.columns.to_numpy(),
                    "proportion": pooled / max(n, 1),
                    "ci_low": low,
                    "ci_high": high,
                    "n_cells": pooled.astype(int),
                    "n_culture": n,
                    "n_units": m,
                }
            )
        )
    columns = ["culture", "cluster", "proportion", "ci_low", "ci_high", "n_cells", "n_culture", "n_units"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def _between_ss(props: np.ndarray):
    """The permutation statistic over units: the between-culture sum of squares of their compositions.

    props: (n_units, K) float64 per-unit shares. The returned function takes one array of unit
    indices per culture, each (..., n_g) (scipy.stats.permutation_test's vectorized call, which
    relabels units between cultures), and returns (..., K + 1): the sum of squares per cluster,
    then their total.
    """
    grand = props.mean(axis=0)

    def statistic(*samples, axis=-1):
        per_cluster = sum(s.shape[-1] * (props[s.astype(np.int64)].mean(axis=-2) - grand) ** 2 for s in samples)
        return np.concatenate([per_cluster, per_cluster.sum(axis=-1, keepdims=True)], axis=-1)

    return statistic


def culture_difference_test(
    labels, cultures, units, n_perm: int = 9999, seed: int = 0, min_unit_cells: int = 5, alpha: float = 0.05
) -> dict:
    """Does cell-type composition differ between cultures, with replicates as the units?

    Each unit's composition is the vector of its clustered cells' shares per cluster (every unit
    weighs the same, however many cells it has; units with fewer than min_unit_cells clustered
    cells are left out). Statistic: the between-culture sum of squares of these vectors (per
    cluster: a one-way ANOVA numerator; overall: its sum, i.e. PERMANOVA on Euclidean distance),
    which for fixed data is monotone in the F ratio. Its null distribution comes from
    relabelling the units between cultures (scipy.stats.permutation_test, independent samples):
    every relabelling (an exact test) when there are at most n_perm of them, else n_perm seeded
    random ones, p = (1 + #{perm >= observed}) / (1 + n_perm). Per-cluster p-values are adjusted
    for the number of clusters by Benjamini-Hochberg (scipy.stats.false_discovery_control).

    Returns {"p_value", "statistic", "n_units", "n_cultures", "n_perm", "min_p", "reason", "clusters",
    "left_out"}: left_out names the cultures with a single unit, which are left out of the test
    (there is no spread between their replicates to compare with) when others have two or more.
    min_p is the smallest p-value the design allows (1 / number of distinct ways to split the
    units into cultures of these sizes, or 1 / (1 + n_perm)): 3 + 3 replicates cannot give p < 0.1.
    reason is "" when tested, else why not (fewer than 2 cultures, no culture with 2 units);
    clusters is a DataFrame with one row per cluster: cluster, statistic, p_value, p_adjusted,
    differs (p_adjusted < alpha), and the mean unit share per culture ("share:<culture>").

    Raises
    ------
    ValueError
        If labels, cultures and units are not 1-D and of one length, or a unit holds cells of
        more than one culture (see unit_proportions).
    """
    from scipy.stats import false_discovery_control, permutation_test

    counts, unit_culture = unit_proportions(labels, cultures, units)
    keep = (counts.sum(axis=1) >= min_unit_cells).to_numpy()
    counts, unit_culture = counts[keep], unit_culture[keep]
    # a culture of one unit has no spread between its replicates to compare with: left out of the test
    per_culture = unit_culture.value_counts()
    single = sorted(per_culture.index[per_culture < 2], key=str)
    if single and (per_culture >= 2).any():
        keep = (~unit_culture.isin(single)).to_numpy()
        counts, unit_culture = counts[keep], unit_culture[keep]
    props = counts.to_numpy(float) / np.maximum(counts.sum(axis=1).to_numpy(float)[:, None], 1)
    names = sorted(unit_culture.unique(), key=str)
    groups = pd.Categorical(unit_culture, categories=names).codes.astype(np.int64)
    n_units, g = len(groups), len(names)
    result = {
        "p_value": float("nan"),
        "statistic": float("nan"),
        "n_units": n_units,
        "n_cultures": g,
        "n_perm": n_perm,
        "min_p": float("nan"),
        "reason": "",
        "clusters": pd.DataFrame(),
        "left_out": [str(c) for c in single if (per_culture >= 2).any()],
    }
    if g < 2 and result["left_out"]:  # the others were left out for having a single unit, not for few cells
        result["reason"] = (
            f"needs >= 2 cultures with >= 2 units each (found {g}; "
            f"{', '.join(result['left_out'])} has a single unit and is left out)"
        )
    elif g < 2:
        result["reason"] = f"needs >= 2 cultures with >= {min_unit_cells} clustered cells per unit (found {g})"
    elif n_units <= g:
        result["reason"] = f"needs >= 2 units in some culture (found {n_units} units for {g} cultures)"
    if result["reason"] or counts.shape[1] == 0:
        result["reason"] = result["reason"] or "no clustered cells"
        return result
    sizes = np.bincount(groups, minlength=g)
    # log of the distinct splits of the units into cultures of these sizes (equal-size cultures swap)
    log_splits = (
        math.lgamma(n_units + 1)
        - sum(math.lgamma(int(k) + 1) for k in sizes)
        - sum(math.lgamma(int(m) + 1) for m in np.bincount(sizes))
    )
    result["min_p"] = float(max(math.exp(-log_splits), 1 / (1 + n_perm)))
    samples = [np.flatnonzero(groups == k).astype(float) for k in range(g)]
    test = permutation_test(
        samples,
        _between_ss(props),
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_perm,
        alternative="greater",
        batch=500,
        rng=np.random.default_rng(seed),
    )
    observed, p = test.statistic[:-1], np.atleast_1d(test.pvalue)
    shares = pd.DataFrame(props, columns=counts.columns).groupby(np.asarray(names)[groups]).mean()
    clusters = pd.DataFrame(
        {
            "cluster": counts.columns.to_numpy(),
            "statistic": observed,
            "p_value": p[:-1],
            "p_adjusted": false_discovery_control(p[:-1]),
        }
    )
    clusters["differs"] = clusters["p_adjusted"] < alpha
    for name in names:
        clusters[f"share:{name}"] = shares.loc[name].to_numpy()
    result.update(p_value=float(p[-1]), statistic=float(test.statistic[-1]), clusters=clusters)
    return result
