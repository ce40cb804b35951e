"""The composition report: one light HTML page a person opens, plus the files behind it.

The page leads with the answer (the best variant, how far above the baselines, which cell types
differ between cultures), then one section per variant. Figures are embedded as small
thumbnails (figures.thumbnail), each linking to its full-size PNG under figures/ beside the
page, so the page stays small however many variants it shows; tables sit in horizontally
scrolling containers, print counts as integers and round scores to 3 decimals.

Inputs are plain data (DataFrames, dicts, PNG paths), so the Dagster layer only gathers them.
Everything is written atomically (temporary file, then os.replace): a reader never sees a
half-written report.
"""

from __future__ import annotations

import base64
import html
import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gbm_assets.analysis.figures import thumbnail
from gbm_assets.analysis.safe_csv import to_csv_safe
from gbm_assets.storage import write_bytes_atomic

BASELINE = "raw pixels"
HANDCRAFTED_BASELINE = "hand-crafted features"  # CellProfiler-style shape, intensity and texture (analysis.handcrafted)
# Rows of the comparison that are baselines, not encoder variants (lower case); a comparison may
# also mark rows with a boolean "baseline" column.
BASELINES = (BASELINE, HANDCRAFTED_BASELINE)
# comparison-table columns "<target>_skipped" say why a target has no scores (report_inputs).
SKIPPED_SUFFIX = "_skipped"
# Thesis Table 3 style: one row per encoder variant plus the raw-pixel baseline.
COMPARISON_COLUMNS = (
    "variant",
    "features",
    "lambda",
    "segmentation",
    "culture_accuracy",
    "concentration_accuracy",
    "culture_kappa",
)


@dataclass
class VariantSection:
    """Everything the report shows for one encoder variant; every field but variant is optional.

    cluster_metrics maps a clustering method (e.g. "hdbscan", "gmm", "auto") to the output of
    clustering.cluster_metrics; composition is composition.composition's (or
    composition_by_units') long table; chi_square is chi_square_culture_vs_type's dict;
    composition_error is composition_error's dict (synthetic plates only). gallery is
    figures.cluster_gallery's PNG; profiles is cell_types.cluster_profiles' table (area in
    area_unit); culture_test is composition.culture_difference_test's dict, its units named by
    unit_level ("replicate" or "image"); cell_table is cell_types.write_cell_table's dict.
    """

    variant: str
    confusion_matrices: Sequence[Path] = ()
    umap_scatters: Sequence[Path] = ()
    composition_bar: Path | None = None
    montage: Path | None = None
    composition: pd.DataFrame | None = None
    chi_square: Mapping[str, float] | None = None
    cluster_metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    auto_k: int | None = None
    composition_error: Mapping | None = None
    notes: str = ""
    explorer: str | None = None  # link (relative to the report) to the variant's cell explorer page
    gallery: Path | None = None
    profiles: pd.DataFrame | None = None
    area_unit: str = "px²"
    culture_test: Mapping | None = None
    unit_level: str = "replicate"
    cell_table: Mapping | None = None


def is_baseline(comparison: pd.DataFrame) -> pd.Series:
    """Boolean mask of the comparison's baseline rows (BASELINES, or a true "baseline" column)."""
    mask = comparison["variant"].astype(str).str.lower().isin(BASELINES)
    if "baseline" in comparison:
        mask |= comparison["baseline"].fillna(False).astype(bool)
    return mask


SPLIT_WORDS = {"culture_plate_kappa": "held out by plate", "culture_kappa": "held out by image"}


def lead_score(comparison: pd.DataFrame) -> str:
    """The score the report ranks variants by: "culture_plate_kappa" (culture kappa held out by plate,
    where a plate's illumination cannot pass for morphology) when a variant has one and so does a
    baseline (or there is no baseline row), else "culture_kappa" (held out by image)."""
    if "culture_plate_kappa" not in comparison:
        return "culture_kappa"
    scored = comparison["culture_plate_kappa"].notna()
    baseline = is_baseline(comparison)
    if scored[~baseline].any() and (scored[baseline].any() or not baseline.any()):
        return "culture_plate_kappa"
    return "culture_kappa"


def best_variant(comparison: pd.DataFrame, score: str = "culture_kappa") -> pd.Series | None:
    """The row with the highest score (default culture kappa held out by image; "culture_plate_kappa":
    held out by plate), the baselines excluded (None if no row has one)."""
    if score not in comparison:
        return None
    rows = comparison[~is_baseline(comparison)]
    rows = rows.dropna(subset=[score])
    return None if rows.empty else rows.loc[rows[score].astype(float).idxmax()]


def _check_comparison(comparison: pd.DataFrame) -> None:
    missing = [c for c in COMPARISON_COLUMNS if c not in comparison.columns]
    if missing:
        raise ValueError(f"comparison table lacks columns {missing}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "variant"


def _fmt(value) -> str:
    """A number for people: NaN "–"; 2 significant digits below 0.01, 3 decimals below 100, fewer above."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10_000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        magnitude = abs(value)
        if 0 < magnitude < 0.01:
            return f"{value:.2g}"
        if magnitude >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if magnitude >= 100 else f"{value:.3f}"
    return str(value)


# Columns that hold counts or sizes: printed as integers even when a missing value made them float.
INTEGER_COLUMNS = (
    "features",
    "cluster",
    "dof",
    "auto_k",
    "n_clusters",
    "n_cells",
    "n_culture",
    "n_units",
    "n_train",
    "n_test",
    "n_perm",
)


def _integer_column(name, values: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(values):
        return False
    if pd.api.types.is_integer_dtype(values):
        return True
    name = str(name)
    if not (name in INTEGER_COLUMNS or name.startswith("n_")) or not pd.api.types.is_numeric_dtype(values):
        return False
    known = values.dropna().to_numpy(float)
    return bool(np.all(np.isfinite(known) & (known == np.round(known))))


def _fmt_cell(name, value) -> str:
    """_fmt, with integral values of count columns (INTEGER_COLUMNS, n_*) as integers."""
    if (
        isinstance(value, (float, np.floating))
        and not math.isnan(value)
        and float(value).is_integer()
        and (str(name) in INTEGER_COLUMNS or str(name).startswith("n_"))
    ):
        return _fmt(int(value))
    return _fmt(value)


def displayed(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of df as text for people: count columns as integers ("64", never "64.000"), scores rounded.

    Integer columns: integer dtypes, and float columns named in INTEGER_COLUMNS or starting with
    "n_" whose values are all whole numbers (a NaN turns an int column float); their NaN is "–".
    Other numbers go through _fmt; text is left as it is.
    """
    out = df.copy().astype(object)
    for k, name in enumerate(df.columns):
        values = df.iloc[:, k]
        if _integer_column(name, values):
            out.isetitem(k, [("–" if pd.isna(v) else _fmt(int(v))) for v in values])
        elif pd.api.types.is_numeric_dtype(values) or values.dtype == object:
            out.isetitem(k, [_fmt(v) if isinstance(v, (int, float, np.number, bool, np.bool_)) else v for v in values])
    return out


SD_SUFFIX = "_sd"  # comparison columns "<score>_sd": the score's standard deviation over group folds


def with_sd(comparison: pd.DataFrame) -> pd.DataFrame:
    """The comparison with each score shown as "mean ± sd" text where a "<score>_sd" column has its
    standard deviation over folds (the _sd columns are left out); a score without one stays a number,
    and a missing score stays missing (NaN), so _scores_or_reasons can still put its reason there."""
    shown = comparison.copy()
    for column in [c for c in comparison.columns if f"{c}{SD_SUFFIX}" in comparison.columns]:
        sd = comparison[f"{column}{SD_SUFFIX}"]
        shown[column] = [
            f"{_fmt(m)} ± {_fmt(d)}" if pd.notna(m) and pd.notna(d) else m
            for m, d in zip(comparison[column], sd, strict=True)
        ]
        shown = shown.drop(columns=f"{column}{SD_SUFFIX}")
    return shown


def _scores_or_reasons(comparison: pd.DataFrame) -> pd.DataFrame:
    """The comparison for people: where a target was not scored, its score cells say why.

    Each "<target>_skipped" column (e.g. "needs >= 2 cultures (found 1)") replaces the missing
    values of that target's score columns ("<target>_accuracy", "<target>_kappa", ...) in its
    row, and is itself left out; numbers are formatted as _fmt does.
    """
    shown = comparison.copy()
    for column in [c for c in comparison.columns if str(c).endswith(SKIPPED_SUFFIX)]:
        target = str(column)[: -len(SKIPPED_SUFFIX)]
        reasons = comparison[column].fillna("").astype(str)
        for score in [c for c in comparison.columns if str(c).startswith(f"{target}_") and c != column]:
            fill = (reasons != "") & comparison[score].isna()
            if fill.any():
                shown[score] = [
                    reason if use else _fmt_cell(score, value)
                    for value, reason, use in zip(comparison[score], reasons, fill, strict=False)
                ]
        shown = shown.drop(columns=column)
    return shown


def _header(name) -> str:
    """Column names for people: underscores become spaces, so long headers wrap."""
    return str(name).replace("_", " ")


def _table(df: pd.DataFrame) -> str:
    """df as an HTML table inside a horizontally scrolling container (never wider than the page)."""
    shown = displayed(df).rename(columns=_header)
    table = shown.to_html(index=False, border=0, classes="data", na_rep="–", escape=True)
    return f'<div class="table-wrap">{table}</div>'


def _href(path: Path, out_dir: Path) -> str:
    """A relative link from the page to path (absolute, or relative to out_dir), URL-quoted and escaped."""
    path = Path(path)
    relative = path.resolve().relative_to(out_dir.resolve()) if path.is_absolute() else path
    return html.escape(urllib.parse.quote(relative.as_posix()))


def _figure(png: Path, caption: str, out_dir: Path) -> str:
    """A thumbnail embedded as base64 PNG, linking to the full-size figure beside the page (png: relative to out_dir)."""
    data = base64.b64encode(thumbnail(out_dir / png)).decode("ascii")
    cap, href = html.escape(caption), _href(png, out_dir)
    return (
        f'<figure><a href="{href}"><img alt="{cap}" src="data:image/png;base64,{data}"></a>'
        f'<figcaption>{cap} (<a href="{href}">full size</a>)</figcaption></figure>'
    )


def _percent(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _composition_wide(comp: pd.DataFrame) -> pd.DataFrame:
    """Culture rows, cluster columns, cells "12.3% [9.1, 15.2]": readable at 10 x 11.

    A culture of a single unit has nothing to resample: its zero-width interval is shown as
    "[no interval: 1 unit]", never as a certainty "[12.3, 12.3]"."""
    units = comp["n_units"] if "n_units" in comp else pd.Series(2, index=comp.index)
    cell = [
        f"{_percent(p)} [no interval: 1 unit]" if n == 1 else f"{_percent(p)} [{100 * lo:.1f}, {100 * hi:.1f}]"
        for p, lo, hi, n in zip(comp["proportion"], comp["ci_low"], comp["ci_high"], units, strict=False)
    ]
    wide = comp.assign(cell=cell).pivot(index="culture", columns="cluster", values="cell")
    return wide.rename(columns=lambda c: f"cluster {c}").rename_axis(columns=None).reset_index()


def _dict_table(d: Mapping) -> str:
    return _table(pd.DataFrame({"measure": [_header(k) for k in d], "value": [_fmt_cell(k, v) for k, v in d.items()]}))


def _measure(value, decimals: int = 2) -> str:
    """A measurement at the precision it deserves: areas >= 100 as integers, >= 10 to 1 decimal."""
    if value is None or pd.isna(value):
        return "–"
    value = float(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.{decimals}f}"


def _profile_table(profiles: pd.DataFrame, area_unit: str) -> pd.DataFrame:
    shown = profiles.rename(columns={"median_area": f"median_area_{area_unit}", "qc_not_cell": "share_qc_not_cell"})
    shown[f"median_area_{area_unit}"] = [_measure(v) for v in profiles["median_area"]]
    for m in ("elongation", "solidity", "form_factor", "eccentricity"):
        if f"median_{m}" in shown:
            shown[f"median_{m}"] = [_measure(v) for v in profiles[f"median_{m}"]]
    shown["share"] = [_percent(v) for v in profiles["share"]]
    shown["share_qc_not_cell"] = [_percent(v) for v in profiles["qc_not_cell"]]
    shown["artefact"] = [
        reason if flag else "" for flag, reason in zip(profiles["artefact"], profiles["artefact_reason"], strict=False)
    ]
    return shown.drop(columns="artefact_reason")


def _culture_test_table(test: Mapping) -> pd.DataFrame:
    clusters = test["clusters"].copy()
    for column in [c for c in clusters.columns if str(c).startswith("share:")]:
        clusters[column] = [_percent(v) for v in clusters[column]]
    clusters["differs"] = ["yes" if d else "" for d in clusters["differs"]]
    return clusters.rename(columns=lambda c: f"share in {c[6:]}" if str(c).startswith("share:") else c)


def _cluster_phrase(row: pd.Series, profiles: pd.DataFrame | None, area_unit: str) -> str:
    """'cluster 3 (median area 812 px², elongation 2.4; from 8.0% of the cells in GBM03 to 35.0% in GBM11)'."""
    shares = {str(c)[6:]: v for c, v in row.items() if str(c).startswith("share:")}
    low, high = min(shares, key=shares.get), max(shares, key=shares.get)
    shape = ""
    if profiles is not None and (profiles["cluster"] == row["cluster"]).any():
        p = profiles[profiles["cluster"] == row["cluster"]].iloc[0]
        shape = (
            f"median area {_measure(p['median_area'])} {area_unit}, elongation {_measure(p['median_elongation'], 1)}"
        )
        if p["artefact"]:
            shape += ", flagged as a possible artefact"
        shape += "; "
    return (
        f"cluster {_fmt_cell('cluster', row['cluster'])} ({shape}from {_percent(shares[low])} of the cells "
        f"in {low} to {_percent(shares[high])} in {high})"
    )


def lead(comparison: pd.DataFrame, variants: Sequence[VariantSection] = ()) -> str:
    """The answer in plain sentences: the best variant, its margin over each baseline, the cell types that differ.

    Variants are ranked by lead_score: culture Cohen's kappa held out by plate where the comparison
    has it (a feature that recognises a plate's illumination scores high by image only), else held
    out by image; the other split's figures follow. Margins are in that kappa (a margin under the
    best variant's fold sd, "<score>_sd", is no clear gain), with the majority-class accuracy where
    the comparison has culture_majority; cell types are those whose per-replicate share differs
    between cultures in the best variant's culture_test (Benjamini-Hochberg adjusted p < 0.05).
    """
    score = lead_score(comparison)
    best = best_variant(comparison, score)
    if best is None:
        return "No variant has a culture kappa yet, so none can be called best."
    name, kappa, split = str(best["variant"]), float(best[score]), SPLIT_WORDS[score]
    accuracy = score.replace("kappa", "accuracy")
    text = [
        f"Best variant: {name} (culture Cohen's kappa {_fmt(kappa)} {split}"
        + (f", culture accuracy {_fmt(best[accuracy])})." if accuracy in best and pd.notna(best[accuracy]) else ").")
    ]
    baselines = comparison[is_baseline(comparison)]
    scored = baselines.dropna(subset=[score])
    margins = []
    for _, base in scored.iterrows():
        diff = kappa - float(base[score])
        where = "above" if diff > 0 else "below" if diff < 0 else "level with"
        margins.append(f"{_fmt(abs(diff)) + ' ' if diff else ''}{where} {base['variant']} (kappa {_fmt(base[score])})")
    if margins:
        beats = bool((kappa > scored[score].astype(float)).all())
        # a margin smaller than the spread of the variant's kappa between folds is no clear gain
        sd = float(best.get(f"{score}{SD_SUFFIX}", float("nan")))
        smallest = kappa - float(scored[score].astype(float).max())
        clear = not (math.isfinite(sd) and smallest <= sd)
        text.append(
            f"That is {'; '.join(margins)}: "
            + (
                "the learned features earn their cost."
                if beats and clear
                else f"above every baseline, but by less than the spread between folds (sd {_fmt(sd)}): "
                "no clear gain yet."
                if beats
                else "the learned features do not beat every baseline yet."
            )
        )
    else:
        text.append("No baseline was scored, so the margin is unknown.")
    if score == "culture_plate_kappa":
        others = "; ".join(
            f"{b['variant']} {_fmt(b['culture_kappa'])}"
            for _, b in baselines.iterrows()
            if pd.notna(b.get("culture_kappa"))
        )
        if pd.notna(best.get("culture_kappa")):
            text.append(
                f"Held out by image, where a plate's illumination can stand in for morphology, {name} scores "
                f"culture kappa {_fmt(best['culture_kappa'])}" + (f" ({others})." if others else ".")
            )
        by_image = best_variant(comparison)
        if by_image is not None and str(by_image["variant"]) != name:
            text.append(
                f"The best variant by image is {by_image['variant']} (culture kappa {_fmt(by_image['culture_kappa'])})."
            )
    chance = baselines["culture_majority"].dropna() if "culture_majority" in baselines else pd.Series([], dtype=float)
    if len(chance):
        text.append(f"Always guessing the most common culture scores an accuracy of {_fmt(float(chance.iloc[0]))}.")
    section = next((v for v in variants if v.variant == name), None)
    test = section.culture_test if section is not None else None
    if test is None:
        text.append(f"Cell types were not compared between cultures for {name}.")
    elif test.get("reason"):
        text.append(f"Cell types of {name} could not be compared between cultures: {test['reason']}.")
    else:
        clusters = test["clusters"]
        differ = clusters[clusters["differs"]].sort_values("p_adjusted")
        units = f"{test['n_units']} {section.unit_level}s as the units, {test['n_perm']} permutations"
        if differ.empty:
            overall = (
                "The composition as a whole differs between cultures"
                if test["p_value"] < 0.05
                else "The composition as a whole shows no evidence of differing between cultures"
            )
            text.append(
                f"{overall} (p = {_fmt(test['p_value'])}; {units}; the smallest p these units allow is "
                f"{_fmt(test.get('min_p', float('nan')))}), but no single cell type of {name} differs in "
                "share at a 5% false discovery rate."
            )
        else:
            phrases = [_cluster_phrase(r, section.profiles, section.area_unit) for _, r in differ.iterrows()]
            text.append(
                f"Cell types of {name} that differ between cultures (5% false discovery rate; {units}; "
                f"overall p = {_fmt(test['p_value'])}): " + "; ".join(phrases) + "."
            )
    return " ".join(text)


def _variant_html(v: VariantSection, out_dir: Path) -> str:
    """One variant's section; also copies its PNGs next to the report and writes its CSVs."""
    slug = _slug(v.variant)
    parts = [f'<section id="variant-{html.escape(slug)}"><h2>Variant {html.escape(v.variant)}</h2>']
    if v.notes:
        parts.append(f"<p>{html.escape(v.notes)}</p>")
    if v.explorer:
        parts.append(
            f'<p><a class="explorer" href="{html.escape(v.explorer)}">Open the cell explorer for '
            f"{html.escape(v.variant)}</a>: hover any point of the map to see its cell.</p>"
        )
    figures = (
        [(p, f"{v.variant}: confusion matrix ({Path(p).stem})") for p in v.confusion_matrices]
        + [(p, f"{v.variant}: UMAP ({Path(p).stem})") for p in v.umap_scatters]
        + [
            (p, f"{v.variant}: {what}")
            for p, what in (
                (v.composition_bar, "cell-type composition per culture"),
                (v.montage, "random crops per cluster"),
                (v.gallery, "cells nearest each cluster's centre and random cells"),
            )
            if p is not None
        ]
    )
    for png, caption in figures:
        # A figure already beside the page (under out_dir) is linked where it is; others are copied.
        target = (
            Path(png)
            if Path(png).resolve().is_relative_to(out_dir.resolve())
            else out_dir / "figures" / f"{slug}_{Path(png).name}"
        )
        if Path(png).resolve() != target.resolve():
            write_bytes_atomic(target, Path(png).read_bytes())
        parts.append(_figure(target.resolve().relative_to(out_dir.resolve()), caption, out_dir))
    if v.profiles is not None and len(v.profiles):
        # The area's unit in its column name (ASCII: median_area_um2 or median_area_px2).
        ascii_unit = v.area_unit.replace("µ", "u").replace("²", "2")
        profiles_csv = v.profiles.rename(columns={"median_area": f"median_area_{ascii_unit}"})
        write_bytes_atomic(out_dir / f"{slug}_cell_types.csv", to_csv_safe(profiles_csv, index=False).encode())
        flagged = int(v.profiles["artefact"].sum())
        parts += [
            "<h3>Cell types</h3>",
            f"<p>Median shape of each cluster's cells (area in {html.escape(v.area_unit)}; elongation = "
            "major / minor axis length; solidity = area / convex hull area; form factor = "
            "4&pi; area / perimeter&sup2;). The artefact column flags clusters that look like debris "
            f"or fragments ({flagged} of {len(v.profiles)}): check them in the gallery.</p>",
            _table(_profile_table(v.profiles, v.area_unit)),
        ]
    if v.cluster_metrics:
        metrics = pd.DataFrame.from_dict(v.cluster_metrics, orient="index").rename_axis("method").reset_index()
        write_bytes_atomic(out_dir / f"{slug}_cluster_metrics.csv", to_csv_safe(metrics, index=False).encode())
        parts += ["<h3>Cluster metrics</h3>", _table(metrics)]
    if v.auto_k is not None:
        parts.append(f"<p>Automatically chosen number of clusters: <strong>{v.auto_k}</strong>.</p>")
    if v.composition is not None:
        write_bytes_atomic(out_dir / f"{slug}_composition.csv", to_csv_safe(v.composition, index=False).encode())
        how = (
            f"a bootstrap over {html.escape(v.unit_level)}s (resampled with replacement within each culture)"
            if "n_units" in v.composition
            else "a bootstrap over cells"
        )
        parts += [
            "<h3>Composition per culture</h3>",
            f"<p>Share of the clustered cells of each culture in each cluster, with its 95% interval from {how}.</p>",
            _table(_composition_wide(v.composition)),
        ]
    if v.culture_test is not None:
        test = v.culture_test
        parts.append(f"<h3>Do cultures differ? ({html.escape(v.unit_level)}s as the units)</h3>")
        if test.get("reason"):
            parts.append(f"<p>Not tested: {html.escape(str(test['reason']))}.</p>")
        else:
            clusters = test["clusters"]
            write_bytes_atomic(out_dir / f"{slug}_culture_test.csv", to_csv_safe(clusters, index=False).encode())
            parts += [
                f"<p>Permutation test on the composition of each {html.escape(v.unit_level)} "
                f"({test['n_units']} units, {test['n_cultures']} cultures, {test['n_perm']} permutations of "
                f"the culture labels among the units): overall p = {_fmt(test['p_value'])}; with these "
                f"units no p below {_fmt(test.get('min_p', float('nan')))} is possible. Per cluster, "
                "p adjusted is Benjamini-Hochberg's; shares are the mean over the culture's units."
                + (
                    f" Left out, with a single {html.escape(v.unit_level)} each: "
                    f"{html.escape(', '.join(test['left_out']))}."
                    if test.get("left_out")
                    else ""
                )
                + "</p>",
                _table(_culture_test_table(test)),
            ]
    if v.chi_square is not None:
        p = v.chi_square.get("p_value", float("nan"))
        if math.isnan(p):
            verdict = "Too few cultures or clusters with cells to test."
        else:
            relation = "depends" if p < 0.05 else "shows no evidence of depending"
            verdict = (
                f"Counting every cell as independent, cell-type composition {relation} on culture "
                f"(p = {_fmt(p)}, Cramér's V = {_fmt(v.chi_square['cramers_v'])})."
            )
        parts += [
            "<h3>Culture vs cell type (chi-square over cells)</h3>",
            f"<p>{verdict} Cells of one "
            "replicate share its seeding, confluence and imaging, so this p-value overstates the "
            "evidence; the replicate-level test above is the one to trust. Cramér's V is the effect "
            "size.</p>",
            _dict_table(v.chi_square),
        ]
    if v.composition_error is not None:
        err = v.composition_error
        parts += [
            "<h3>Composition error against true morphotypes (synthetic)</h3>",
            f"<p>Mean absolute error of per-culture proportions: {_fmt(err['mae'])}.</p>",
        ]
        if isinstance(err.get("table"), pd.DataFrame):
            t = err["table"]
            cell = [f"{e:.3f} / {tr:.3f}" for e, tr in zip(t["estimated"], t["true"], strict=False)]
            wide = t.assign(cell=cell).pivot(index="culture", columns="morphotype", values="cell")
            parts += [
                "<p>Estimated / true proportion per morphotype.</p>",
                _table(wide.rename(columns=str).rename_axis(columns=None).reset_index()),
            ]
    if v.cell_table is not None:
        links = [
            f'<a href="{_href(Path(v.cell_table[k]).resolve(), out_dir)}">{k}</a>'
            for k in ("parquet", "csv")
            if v.cell_table.get(k) and Path(v.cell_table[k]).resolve().is_relative_to(out_dir.resolve())
        ]
        parts.append(
            f"<p>Per-cell table ({_fmt(int(v.cell_table.get('n_cells', 0)))} cells: provenance, shape "
            "measurements, cluster labels, UMAP and embedding coordinates; pycytominer column names): "
            f"{', '.join(links)}. Embedding columns: {html.escape(str(v.cell_table.get('embedding', '')))}.</p>"
        )
    parts.append("</section>")
    return "\n".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
p.lead { font-size: 1.1em; background: #f4f7fb; border-left: 4px solid #4a78b5; padding: 0.6em 1em; }
div.table-wrap { max-width: 100%; overflow-x: auto; margin: 0.5em 0 1.5em; }
table.data { border-collapse: collapse; font-size: 0.9em; }
table.data th { padding: 3px 8px; border-bottom: 2px solid #bbb; text-align: right; vertical-align: bottom;
                white-space: normal; max-width: 9em; }
table.data td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
table.data td:first-child, table.data th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 300px; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
section { border-top: 2px solid #eee; margin-top: 2em; }
"""


MAX_IMAGE_ROWS = 300  # more images than this: the page shows plates, the CSV every image


def _cell_finding_html(quality: pd.DataFrame, out_dir: Path) -> str:
    """The cell-finding section: candidates per qc label and image quality, per plate and per image."""
    write_bytes_atomic(out_dir / "cell_finding.csv", to_csv_safe(quality, index=False).encode())
    labels = [c for c in ("cell", "debris", "fragment", "edge") if c in quality]
    per_plate = (
        quality.groupby("plate", sort=True)
        .agg(
            images=("image", "size"),
            **{label: (label, "sum") for label in labels},
            usable_fraction=("ImageQuality_UsableFraction", "mean"),
            cell_diameter_px=("cell_diameter_px", "first"),
        )
        .reset_index()
    )
    parts = [
        "<h2>Cell finding</h2>",
        "<p>Every candidate cell finding proposed, by quality label: <em>cell</em> (cropped and analysed), "
        "<em>debris</em> (small and alone in the medium, or too faint), <em>fragment</em> (a small piece "
        "next to cells) and <em>edge</em> (outside the culture surface: well edge, wall, glare). Usable "
        "fraction: the share of the field that is culture surface; cell diameter: the plate's, estimated "
        'from its images unless given. Every image: <a href="cell_finding.csv">cell_finding.csv</a>.</p>',
        _table(per_plate),
    ]
    if len(quality) <= MAX_IMAGE_ROWS:
        parts += ["<h3>Per image</h3>", _table(quality.drop(columns=["cell_diameter_px"]))]
    else:
        parts.append(f"<p>{len(quality):,} images: per image in the CSV only.</p>")
    return "\n".join(parts)


def write_report(
    out_dir: str | Path,
    comparison: pd.DataFrame,
    variants: Sequence[VariantSection] = (),
    title: str = "GBM cell morphology: encoder comparison and culture composition",
    cell_finding: pd.DataFrame | None = None,
) -> Path:
    """Write report.html (thumbnails linking to full-size PNGs under figures/) and the CSVs; return the HTML path.

    The page opens with lead(): the best variant (highest culture Cohen's kappa held out by plate
    where scored, else by image; baselines excluded), its margin over the baselines, and the cell types that differ between cultures.
    cell_finding: plate_cells.cell_finding_quality's per-image table, shown (per plate, and per
    image up to MAX_IMAGE_ROWS images) and written to cell_finding.csv.
    Raises ValueError if comparison lacks a COMPARISON_COLUMNS column.
    """
    _check_comparison(comparison)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / "comparison.csv", to_csv_safe(comparison, index=False).encode())
    score = lead_score(comparison)
    best = best_variant(comparison, score)
    best_text = (
        "No variant has a culture kappa yet."
        if best is None
        else f"Best variant by culture Cohen's kappa {SPLIT_WORDS[score]}: "
        f'<strong id="best-variant">{html.escape(str(best["variant"]))}</strong> (kappa {_fmt(best[score])}).'
    )
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="lead" id="lead">{html.escape(lead(comparison, variants))}</p>',
        "<h2>Encoder variants</h2>",
        "<p>Random forest on each embedding predicting culture of origin and plated "
        "concentration (held-out accuracy and Cohen's kappa); raw pixels are the baseline. "
        "Scores are the mean ± standard deviation over 5 group folds (every cell tested once).</p>",
        f"<p>{best_text}</p>",
        _table(_scores_or_reasons(with_sd(comparison))),
    ]
    if cell_finding is not None and len(cell_finding):
        body.append(_cell_finding_html(cell_finding, out_dir))
    body += [_variant_html(v, out_dir) for v in variants]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = out_dir / "report.html"
    write_bytes_atomic(path, page.encode("utf-8"))
    return path


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")


def _md_text(value) -> str:
    """A table cell or name as literal Markdown text: names are data, never markup.

    Numbers are formatted by _fmt; in text, the characters that open Markdown or HTML markup or
    end a table cell are backslash-escaped (CommonMark) and line breaks become spaces.
    """
    text = _fmt(value)
    if not isinstance(value, str):
        return text.replace("|", "\\|")
    return _MD_SPECIAL.sub(r"\\\1", re.sub(r"[\r\n]+", " ", text))


def markdown_summary(comparison: pd.DataFrame, variants: Sequence[VariantSection] = ()) -> str:
    """A Markdown digest for Dagster metadata: the comparison table, the best variant and lead(), clusters.

    Counts print as integers and scores as _fmt rounds them (displayed()); names are escaped.
    Raises ValueError if comparison lacks a COMPARISON_COLUMNS column.
    """
    _check_comparison(comparison)

    def row(cells) -> str:
        return "| " + " | ".join(_md_text(c) for c in cells) + " |"

    cols = list(COMPARISON_COLUMNS)
    lines = [row(cols), row(["---"] * len(cols))]
    shown = displayed(_scores_or_reasons(with_sd(comparison))[cols])
    lines += [row(r) for r in shown.itertuples(index=False)]
    score = lead_score(comparison)
    best = best_variant(comparison, score)
    if best is not None:
        lines += [
            "",
            f"**Best variant by culture kappa {SPLIT_WORDS[score]}: {_md_text(best['variant'])}** "
            f"(kappa {_fmt(best[score])})",
        ]
    lines += ["", _md_text(lead(comparison, variants))]
    if variants:
        lines += [
            "",
            row(
                [
                    "variant",
                    "HDBSCAN clusters",
                    "noise",
                    "auto k",
                    "artefact clusters",
                    "culture test p (replicates)",
                    "chi-square p (cells)",
                    "Cramér's V",
                    "composition MAE",
                ]
            ),
            row(["---"] * 9),
        ]
        for v in variants:
            hdb = v.cluster_metrics.get("hdbscan", {})
            chi = v.chi_square or {}
            err = v.composition_error or {}
            test = v.culture_test or {}
            flagged = "" if v.profiles is None else int(v.profiles["artefact"].sum())
            lines.append(
                row(
                    [
                        v.variant,
                        _fmt_cell("n_clusters", hdb.get("n_clusters", "")),
                        hdb.get("noise_fraction", ""),
                        "" if v.auto_k is None else v.auto_k,
                        flagged,
                        test.get("reason") or test.get("p_value", ""),
                        chi.get("p_value", ""),
                        chi.get("cramers_v", ""),
                        err.get("mae", ""),
                    ]
                )
            )
    return "\n".join(lines)
