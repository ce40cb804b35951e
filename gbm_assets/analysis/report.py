"""The composition report: one self-contained HTML page a person opens, plus the files behind it.

Inputs are plain data (DataFrames, dicts, PNG paths), so the Dagster layer only gathers them.
Everything is written atomically (temporary file, then os.replace): a reader never sees a
half-written report.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from gbm_assets.analysis.safe_csv import to_csv_safe
from gbm_assets.storage import write_bytes_atomic

BASELINE = "raw pixels"
# comparison-table columns "<target>_skipped" say why a target has no scores (report_inputs).
SKIPPED_SUFFIX = "_skipped"
# Thesis Table 3 style: one row per encoder variant plus the raw-pixel baseline.
COMPARISON_COLUMNS = (
    "variant", "features", "lambda", "segmentation",
    "culture_accuracy", "concentration_accuracy", "culture_kappa",
)


@dataclass
class VariantSection:
    """Everything the report shows for one encoder variant; every field but variant is optional.

    cluster_metrics maps a clustering method (e.g. "hdbscan", "gmm", "auto") to the output of
    clustering.cluster_metrics; composition is composition.composition's long table;
    chi_square is chi_square_culture_vs_type's dict; composition_error is
    composition_error's dict (synthetic plates only).
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


def best_variant(comparison: pd.DataFrame) -> pd.Series | None:
    """The row with the highest culture kappa, the baseline excluded (None if no row has one)."""
    rows = comparison[comparison["variant"].astype(str).str.lower() != BASELINE]
    rows = rows.dropna(subset=["culture_kappa"])
    return None if rows.empty else rows.loc[rows["culture_kappa"].idxmax()]


def _check_comparison(comparison: pd.DataFrame) -> None:
    missing = [c for c in COMPARISON_COLUMNS if c not in comparison.columns]
    if missing:
        raise ValueError(f"comparison table lacks columns {missing}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "variant"


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "–"
        return f"{value:.2g}" if 0 < abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


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
                shown[score] = [reason if use else _fmt(value)
                                for value, reason, use in zip(comparison[score], reasons, fill)]
        shown = shown.drop(columns=column)
    return shown


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="data", na_rep="–", float_format=_fmt)


def _figure(png: Path, caption: str) -> str:
    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    cap = html.escape(caption)
    return (f'<figure><img alt="{cap}" src="data:image/png;base64,{data}">'
            f"<figcaption>{cap}</figcaption></figure>")


def _composition_wide(comp: pd.DataFrame) -> pd.DataFrame:
    """Culture rows, cluster columns, cells "proportion [low, high]": readable at 10 x 11."""
    cell = [f"{p:.3f} [{lo:.3f}, {hi:.3f}]"
            for p, lo, hi in zip(comp["proportion"], comp["ci_low"], comp["ci_high"])]
    wide = comp.assign(cell=cell).pivot(index="culture", columns="cluster", values="cell")
    return wide.rename(columns=lambda c: f"cluster {c}").rename_axis(columns=None).reset_index()


def _dict_table(d: Mapping) -> str:
    return _table(pd.DataFrame({"measure": list(d), "value": [_fmt(v) for v in d.values()]}))


def _variant_html(v: VariantSection, out_dir: Path) -> str:
    """One variant's section; also copies its PNGs next to the report and writes its CSVs."""
    slug = _slug(v.variant)
    parts = [f'<section id="variant-{html.escape(slug)}"><h2>Variant {html.escape(v.variant)}</h2>']
    if v.notes:
        parts.append(f"<p>{html.escape(v.notes)}</p>")
    if v.explorer:
        parts.append(f'<p><a class="explorer" href="{html.escape(v.explorer)}">Open the cell explorer for '
                     f"{html.escape(v.variant)}</a>: hover any point of the map to see its cell.</p>")
    figures = (
        [(p, f"{v.variant}: confusion matrix ({Path(p).stem})") for p in v.confusion_matrices]
        + [(p, f"{v.variant}: UMAP ({Path(p).stem})") for p in v.umap_scatters]
        + [(p, f"{v.variant}: {what}") for p, what in
           ((v.composition_bar, "cell-type composition per culture"),
            (v.montage, "random crops per cluster")) if p is not None]
    )
    for png, caption in figures:
        target = out_dir / "figures" / f"{slug}_{Path(png).name}"
        if Path(png).resolve() != target.resolve():
            write_bytes_atomic(target, Path(png).read_bytes())
        parts.append(_figure(target, caption))
    if v.cluster_metrics:
        metrics = (pd.DataFrame.from_dict(v.cluster_metrics, orient="index")
                   .rename_axis("method").reset_index())
        write_bytes_atomic(out_dir / f"{slug}_cluster_metrics.csv", to_csv_safe(metrics, index=False).encode())
        parts += ["<h3>Cluster metrics</h3>", _table(metrics)]
    if v.auto_k is not None:
        parts.append(f"<p>Automatically chosen number of clusters: <strong>{v.auto_k}</strong>.</p>")
    if v.composition is not None:
        write_bytes_atomic(out_dir / f"{slug}_composition.csv", to_csv_safe(v.composition, index=False).encode())
        parts += ["<h3>Composition per culture</h3>",
                  "<p>Share of the clustered cells of each culture in each cluster, with its "
                  "bootstrap confidence interval.</p>", _table(_composition_wide(v.composition))]
    if v.chi_square is not None:
        p = v.chi_square.get("p_value", float("nan"))
        if math.isnan(p):
            verdict = "Too few cultures or clusters with cells to test."
        else:
            relation = "depends" if p < 0.05 else "shows no evidence of depending"
            verdict = (f"Cell-type composition {relation} on culture (p = {_fmt(p)}, "
                       f"Cramér's V = {_fmt(v.chi_square['cramers_v'])}).")
        parts += ["<h3>Culture vs cell type (chi-square)</h3>", f"<p>{verdict}</p>",
                  _dict_table(v.chi_square)]
    if v.composition_error is not None:
        err = v.composition_error
        parts += ["<h3>Composition error against true morphotypes (synthetic)</h3>",
                  f"<p>Mean absolute error of per-culture proportions: {_fmt(err['mae'])}.</p>"]
        if isinstance(err.get("table"), pd.DataFrame):
            t = err["table"]
            cell = [f"{e:.3f} / {tr:.3f}" for e, tr in zip(t["estimated"], t["true"])]
            wide = t.assign(cell=cell).pivot(index="culture", columns="morphotype", values="cell")
            parts += ["<p>Estimated / true proportion per morphotype.</p>",
                      _table(wide.rename(columns=str).rename_axis(columns=None).reset_index())]
    parts.append("</section>")
    return "\n".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table.data { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
table.data th, table.data td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 520px; }
figcaption { font-size: 0.85em; color: #555; }
section { border-top: 2px solid #eee; margin-top: 2em; }
"""


def write_report(
    out_dir: str | Path,
    comparison: pd.DataFrame,
    variants: Sequence[VariantSection] = (),
    title: str = "GBM cell morphology: encoder comparison and culture composition",
) -> Path:
    """Write report.html (figures embedded as base64 PNG), the PNGs and CSVs; return the HTML path.

    The best variant is the one with the highest culture Cohen's kappa (raw pixels excluded).
    """
    _check_comparison(comparison)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out_dir / "comparison.csv", to_csv_safe(comparison, index=False).encode())
    best = best_variant(comparison)
    best_text = ("No variant has a culture kappa yet." if best is None else
                 f'Best variant by culture Cohen\'s kappa: <strong id="best-variant">'
                 f"{html.escape(str(best['variant']))}</strong> (kappa {_fmt(best['culture_kappa'])}, "
                 f"culture accuracy {_fmt(best['culture_accuracy'])}).")
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Encoder variants</h2>",
        "<p>Random forest on each embedding predicting culture of origin and plated "
        "concentration (held-out accuracy and Cohen's kappa); raw pixels are the baseline.</p>",
        f"<p>{best_text}</p>",
        _table(_scores_or_reasons(comparison)),
    ]
    body += [_variant_html(v, out_dir) for v in variants]
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(body) + "\n</body></html>\n"
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


def markdown_summary(
    comparison: pd.DataFrame, variants: Sequence[VariantSection] = ()
) -> str:
    """A Markdown digest for Dagster metadata: the comparison table, the best variant, clusters."""
    _check_comparison(comparison)

    def row(cells) -> str:
        return "| " + " | ".join(_md_text(c) for c in cells) + " |"

    cols = list(COMPARISON_COLUMNS)
    lines = [row(cols), row(["---"] * len(cols))]
    lines += [row(r) for r in _scores_or_reasons(comparison)[cols].itertuples(index=False)]
    best = best_variant(comparison)
    if best is not None:
        lines += ["", f"**Best variant by culture kappa: {_md_text(best['variant'])}** "
                      f"(kappa {_fmt(best['culture_kappa'])})"]
    if variants:
        lines += ["", row(["variant", "HDBSCAN clusters", "noise", "auto k", "chi-square p",
                           "Cramér's V", "composition MAE"]), row(["---"] * 7)]
        for v in variants:
            hdb = v.cluster_metrics.get("hdbscan", {})
            chi = v.chi_square or {}
            err = v.composition_error or {}
            lines.append(row([v.variant, hdb.get("n_clusters", ""), hdb.get("noise_fraction", ""),
                              "" if v.auto_k is None else v.auto_k, chi.get("p_value", ""),
                              chi.get("cramers_v", ""), err.get("mae", "")]))
    return "\n".join(lines)
