"""Figures and the HTML report, from small fake labels (no UMAP fit needed)."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from gbm_assets.analysis.composition import chi_square_culture_vs_type, composition, composition_error
from gbm_assets.analysis.figures import THUMBNAIL_PX, crop_montage, stacked_composition_bar, umap_scatter
from gbm_assets.analysis.report import (
    COMPARISON_COLUMNS,
    VariantSection,
    best_variant,
    displayed,
    lead,
    lead_score,
    markdown_summary,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_labels(n: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cluster = rng.integers(-1, 5, size=n)
    centres = rng.normal(0, 5, size=(6, 2))
    xy = centres[cluster + 1] + rng.normal(0, 0.5, size=(n, 2))
    return pd.DataFrame(
        {
            "umap_x": xy[:, 0],
            "umap_y": xy[:, 1],
            "hdbscan": cluster,
            "gmm": np.where(cluster < 0, 0, cluster),
            "culture": rng.choice(["GBM03", "GBM11", "GBM27"], size=n),
            "concentration": rng.choice(["250", "1000", "4000"], size=n),
            "morphotype": np.where(cluster < 0, 0, cluster),
        }
    )


def comparison_table() -> pd.DataFrame:
    return pd.DataFrame(
        [
            ("raw pixels", 16384, np.nan, "none", 0.276, 0.430, 0.90),  # baseline never wins
            ("autoencoder", 64, np.nan, "none", 0.299, 0.435, 0.083),
            ("A", 128, 0.01, "none", 0.41, 0.47, 0.31),
            ("B", 128, 0.1, "none", 0.463, 0.488, 0.37),
            ("E", 128, 0.1, "PBR", 0.13, 0.43, 0.03),
        ],
        columns=list(COMPARISON_COLUMNS),
    )


def confusion_png(path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.eye(3))
    fig.savefig(path)
    plt.close(fig)
    return path


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.in_best, self.best = [], 0, False, ""
        self.stack, self.cells, self.lead, self.in_lead, self.wrapped_tables = [], [], "", False, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":  # with the link around it, if any
            self.imgs.append(
                {**attrs, "link": next((a.get("href") for t, a in reversed(self.stack) if t == "a"), None)}
            )
        if tag == "table":
            self.tables += 1
            self.wrapped_tables += any(t == "div" and a.get("class") == "table-wrap" for t, a in self.stack)
        if tag in ("td", "th"):
            self.cells.append("")
        self.in_best = self.in_best or attrs.get("id") == "best-variant"
        self.in_lead = self.in_lead or attrs.get("id") == "lead"
        if tag not in ("img", "meta", "br"):
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag == "strong":
            self.in_best = False
        if tag == "p":
            self.in_lead = False
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self.in_best:
            self.best += data
        if self.in_lead:
            self.lead += data
        if self.stack and self.stack[-1][0] in ("td", "th"):
            self.cells[-1] += data


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    d = tmp_path_factory.mktemp("figs")
    out = []
    for variant, seed in (("A", 0), ("B", 1)):
        df = fake_labels(seed=seed)
        comp = composition(df["hdbscan"], df["culture"], n_boot=200)
        crops = np.random.default_rng(seed).integers(0, 256, size=(len(df), 16, 16), dtype=np.uint8)
        out.append(
            VariantSection(
                variant=variant,
                confusion_matrices=[
                    confusion_png(d / f"{variant}_cm_culture.png"),
                    confusion_png(d / f"{variant}_cm_concentration.png"),
                ],
                umap_scatters=[
                    umap_scatter(df, c, d / f"{variant}_umap_{c}.png") for c in ("culture", "hdbscan", "concentration")
                ],
                composition_bar=stacked_composition_bar(comp, d / f"{variant}_composition.png"),
                montage=crop_montage(crops, df["hdbscan"], d / f"{variant}_montage.png"),
                composition=comp,
                chi_square=chi_square_culture_vs_type(df["hdbscan"], df["culture"]),
                cluster_metrics={
                    "hdbscan": {"n_clusters": 5, "noise_fraction": 0.17},
                    "gmm": {"n_clusters": 5, "noise_fraction": 0.0},
                },
                auto_k=5,
                composition_error=composition_error(df["hdbscan"], df["morphotype"], df["culture"]),
            )
        )
    return out


def test_figures_are_pngs(sections):
    for s in sections:
        for png in [*s.confusion_matrices, *s.umap_scatters, s.composition_bar, s.montage]:
            assert png.read_bytes()[:8] == PNG_MAGIC


def test_umap_scatter_downsamples_and_montage_handles_small_clusters(tmp_path):
    df = fake_labels(n=3_000)
    assert umap_scatter(df, "gmm", tmp_path / "u.png", max_points=500).stat().st_size > 0
    crops = np.zeros((3, 8, 8), np.uint8)
    assert crop_montage(crops, [0, 1, 1], tmp_path / "m.png", per_cluster=10).exists()
    with pytest.raises(ValueError):
        crop_montage(crops, [0, 1], tmp_path / "bad.png")


def _thumb_side(data: str) -> int:
    from PIL import Image

    raw = base64.b64decode(data)
    assert raw[:8] == PNG_MAGIC
    with Image.open(io.BytesIO(raw)) as image:
        return max(image.size)


def test_report_embeds_thumbnails_linking_full_size_figures(sections, tmp_path):
    html_path = write_report(tmp_path / "report", comparison_table(), sections)
    page = _Page()
    page.feed(html_path.read_text(encoding="utf-8"))

    expected = sum(len(s.confusion_matrices) + len(s.umap_scatters) + 2 for s in sections)
    assert len(page.imgs) == expected
    out = html_path.parent
    for img in page.imgs:
        prefix, _, data = img["src"].partition(",")
        assert prefix == "data:image/png;base64" and data
        assert _thumb_side(data) <= THUMBNAIL_PX  # a thumbnail, not the figure
        assert img["alt"]
        full = out / img["link"]  # the thumbnail links to the full-size figure beside the page
        assert full.read_bytes()[:8] == PNG_MAGIC and full.stat().st_size > len(base64.b64decode(data))
    # comparison + per variant: cluster metrics, composition, chi-square, composition error
    assert page.tables == 1 + 4 * len(sections)
    assert page.wrapped_tables == page.tables  # each in a horizontally scrolling container
    assert page.best.strip() == "B"

    assert (out / "comparison.csv").exists()
    for s in sections:
        assert (out / f"{s.variant}_composition.csv").exists()
        assert (out / f"{s.variant}_cluster_metrics.csv").exists()
    assert len(list((out / "figures").glob("*.png"))) == expected
    assert not list(out.rglob("*.tmp"))


def test_report_page_stays_small(sections, tmp_path):
    """14 figures: the page holds thumbnails only (with every figure at full size it was ~700 KB)."""
    html_path = write_report(tmp_path / "report", comparison_table(), sections)
    n_figures = sum(len(s.confusion_matrices) + len(s.umap_scatters) + 2 for s in sections)
    assert n_figures == 14
    assert html_path.stat().st_size < 250_000
    full = sum(p.stat().st_size for p in (html_path.parent / "figures").glob("*.png"))
    assert html_path.stat().st_size < full / 2


def test_counts_print_as_integers_and_scores_rounded(sections, tmp_path):
    table = comparison_table()
    table.loc[0, "features"] = np.nan  # raw pixels without a feature count: the column turns float
    section = VariantSection(
        "A",
        cluster_metrics={
            "hdbscan": {"n_clusters": 5.0, "noise_fraction": 0.171234},
            "gmm": {"n_clusters": 11.0, "noise_fraction": 0.0},
        },
        chi_square={"chi2": 1234.5678, "dof": 8.0, "p_value": 0.000123, "cramers_v": 0.2, "n_cells": 20000.0},
    )
    page = _Page()
    page.feed(write_report(tmp_path, table, [section]).read_text(encoding="utf-8"))
    assert not [c for c in page.cells if re.fullmatch(r"[1-9]\d*\.000", c.strip())], "an integer printed as a float"
    assert {"64", "128", "5", "11", "8", "20,000"} <= set(page.cells)
    assert {"0.171", "1,235", "0.00012", "0.463"} <= set(page.cells)
    md = markdown_summary(table, [section])
    assert "| autoencoder | 64 | – | none |" in md and ".000 |" not in md.split("\n\n")[0]
    shown = displayed(pd.DataFrame({"n_cells": [3.0, np.nan], "kappa": [1.0, 0.25], "flag": [True, False]}))
    assert shown.to_dict("list") == {"n_cells": ["3", "–"], "kappa": ["1.000", "0.250"], "flag": ["yes", "no"]}


def test_lead_names_best_variant_and_its_margin_over_the_baselines(sections, tmp_path):
    table = comparison_table()  # raw pixels' kappa 0.90 beats every variant here
    page = _Page()
    page.feed(write_report(tmp_path, table, sections).read_text(encoding="utf-8"))
    assert page.lead.startswith("Best variant: B (culture Cohen's kappa 0.370")
    assert "0.530 below raw pixels (kappa 0.900)" in page.lead and "do not beat every baseline" in page.lead
    table.loc[table["variant"] == "raw pixels", "culture_kappa"] = 0.1
    text = lead(table, sections)
    assert "0.270 above raw pixels (kappa 0.100)" in text and "earn their cost" in text
    # the margin within the fold spread of the variant's kappa (a real 9-image run: 0.043 at sd 0.155)
    noisy = lead(table.assign(culture_kappa_sd=0.3), sections)
    assert "earn their cost" not in noisy and "less than the spread between folds (sd 0.300)" in noisy
    assert "earn their cost" in lead(table.assign(culture_kappa_sd=0.1), sections)
    assert "Cell types were not compared between cultures for B" in text  # these sections have no test
    assert lead(table.assign(culture_kappa=np.nan)).startswith("No variant has a culture kappa")


def test_lead_ranks_variants_held_out_by_plate_where_scored(sections, tmp_path):
    """A variant that wins by image may win on the plate's illumination: where the plate split was
    scored, the lead, the page's best variant and the Markdown summary rank by it, and give the
    image split's figures after."""
    table = comparison_table()
    kappas = {"raw pixels": 0.03, "A": 0.05, "B": 0.02}
    table["culture_plate_kappa"] = table["variant"].map(kappas)
    table["culture_plate_accuracy"] = table["variant"].map({"raw pixels": 0.2, "A": 0.25, "B": 0.21})
    text = lead(table, sections)
    assert lead_score(table) == "culture_plate_kappa"
    assert best_variant(table)["variant"] == "B" and best_variant(table, "culture_plate_kappa")["variant"] == "A"
    assert text.startswith("Best variant: A (culture Cohen's kappa 0.050 held out by plate, culture accuracy 0.250).")
    assert "0.020 above raw pixels (kappa 0.030): the learned features earn their cost." in text
    assert "Held out by image, where a plate's illumination can stand in for morphology, A scores culture kappa" in text
    assert "The best variant by image is B (culture kappa 0.370)." in text
    assert "for A." in text  # the cell types discussed are the leader's
    noisy = lead(table.assign(culture_plate_kappa_sd=0.05), sections)
    assert "less than the spread between folds (sd 0.050)" in noisy
    page = _Page()
    page.feed(write_report(tmp_path, table, sections).read_text(encoding="utf-8"))
    assert page.best == "A"
    assert "**Best variant by culture kappa held out by plate: A** (kappa 0.050)" in markdown_summary(table, sections)
    table["culture_plate_kappa"] = table["variant"].map({"raw pixels": 0.03, "A": 0.01, "B": 0.02})
    both = lead(table, sections)
    assert both.startswith("Best variant: B (culture Cohen's kappa 0.020 held out by plate")
    assert "The best variant by image" not in both  # B leads both ways
    # baselines scored by image alone: their margins are in that kappa, so it ranks
    assert (
        lead_score(
            table.assign(culture_plate_kappa=table["culture_plate_kappa"].where(table["variant"] != "raw pixels"))
        )
        == "culture_kappa"
    )
    # without a plate split (too few plates) the image split ranks, as before
    table["culture_plate_kappa"] = np.nan
    assert lead_score(table) == "culture_kappa"
    assert lead(table, sections).startswith("Best variant: B (culture Cohen's kappa 0.370 held out by image")


def test_report_rewrites_in_place(sections, tmp_path):
    first = write_report(tmp_path, comparison_table(), sections[:1])
    second = write_report(tmp_path, comparison_table(), sections)
    assert first == second and "Variant B" in second.read_text(encoding="utf-8")


def test_best_variant_and_markdown_summary(sections):
    table = comparison_table()
    assert best_variant(table)["variant"] == "B"
    md = markdown_summary(table, sections)
    assert md.splitlines()[0].startswith("| variant | features | lambda")
    assert "| B | 128 | 0.100 | none |" in md
    assert "**Best variant by culture kappa held out by image: B**" in md
    assert md.count("\n| A |") == 2  # comparison row and cluster row


def test_comparison_table_must_have_thesis_columns(tmp_path):
    with pytest.raises(ValueError, match="culture_kappa"):
        write_report(tmp_path, comparison_table().drop(columns=["culture_kappa"]))


def test_lead_says_when_cultures_differ_only_as_a_whole_or_cannot_be_compared():
    clusters = pd.DataFrame(
        {
            "cluster": [0, 1],
            "statistic": [0.1, 0.2],
            "p_value": [0.06, 0.07],
            "p_adjusted": [0.07, 0.07],
            "differs": [False, False],
            "share:GBM03": [0.4, 0.6],
            "share:GBM11": [0.6, 0.4],
        }
    )
    test = {"p_value": 0.049, "n_units": 7, "n_perm": 9999, "min_p": 0.048, "reason": "", "clusters": clusters}
    text = lead(comparison_table(), [VariantSection("B", culture_test=test)])
    assert "The composition as a whole differs between cultures (p = 0.049; 7 replicates as the units" in text
    assert "the smallest p these units allow is 0.048" in text and "no single cell type of B differs" in text
    untestable = {**test, "reason": "needs >= 2 units in some culture (found 2 units for 2 cultures)"}
    text = lead(comparison_table(), [VariantSection("B", culture_test=untestable, unit_level="image")])
    assert "could not be compared between cultures: needs >= 2 units in some culture" in text
