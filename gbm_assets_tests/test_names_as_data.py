"""Names are data (issue 14, items 9 and 10): culture, plate, image and variant names are shown
literally in figures, HTML, the explorer's embedded JSON and Markdown, and never run as formulas
in a CSV a person opens in a spreadsheet."""

from __future__ import annotations

import csv
import html
import io
import json
import re
from html.parser import HTMLParser

import cv2
import matplotlib.figure
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from gbm_assets.analysis.composition import composition, composition_error
from gbm_assets.analysis.evaluation import plot_confusion
from gbm_assets.analysis.explorer import script_json, write_explorer
from gbm_assets.analysis.figures import crop_montage, stacked_composition_bar, umap_scatter
from gbm_assets.analysis.report import COMPARISON_COLUMNS, VariantSection, markdown_summary, write_report
from gbm_assets.analysis.safe_csv import neutralise_formulas, to_csv_safe
from gbm_assets.cli import main
from gbm_assets_tests.servers import chromium_page
from gbm_assets_tests.test_explorer import fake_crops
from gbm_assets_tests.test_explorer import fake_labels as explorer_labels

HOSTILE = r'$\alpha$ <!--<script>alert(1)</script> & "x"|y'
NAMES = [
    HOSTILE,
    r"GBM $x^$",  # not valid mathtext: matplotlib raised ValueError on every figure
    "50$ and 60$",  # valid mathtext: drawn as " and 60" in italics
    "_control",  # a legend label starting with "_" is hidden by matplotlib
]
FORMULAS = ['=HYPERLINK("http://x","y")', "+1", "@SUM(A1)", "-cmd", "\tTAB", "\rCR"]


def labelled_cells(cultures: list[str], n: int = 240, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cluster = rng.integers(-1, 3, size=n)
    return pd.DataFrame(
        {
            "umap_x": rng.normal(size=n),
            "umap_y": rng.normal(size=n),
            "hdbscan": cluster,
            "morphotype": np.maximum(cluster, 0),
            "culture": np.resize(np.array(cultures, dtype=object), n),
        }
    )


@pytest.fixture
def drawn_figures(monkeypatch):
    """Every Figure saved while the test runs, kept open after savefig for inspection."""
    figures = []
    save = matplotlib.figure.Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        result = save(self, *args, **kwargs)
        figures.append(self)
        return result

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    return figures


def texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_text()]


def assert_literal(fig, names) -> None:
    drawn = texts(fig)
    shown = {t.get_text() for t in drawn}
    for name in names:
        assert name in shown, f"{name!r} not drawn; texts: {sorted(shown)}"
    for t in drawn:
        assert not t.get_usetex() and not t.get_parse_math(), t.get_text()


# --- item 9: figures ------------------------------------------------------------------------------


def test_figures_draw_every_name_literally(tmp_path, drawn_figures):
    cells = labelled_cells(NAMES)
    comp = composition(cells["hdbscan"], cells["culture"], n_boot=50)
    crops = np.zeros((len(cells), 8, 8), np.uint8)
    pngs = [
        umap_scatter(cells, "culture", tmp_path / "umap.png"),
        stacked_composition_bar(comp, tmp_path / "bar.png"),
        crop_montage(crops, cells["hdbscan"], tmp_path / "montage.png"),
        plot_confusion(
            {
                "confusion": np.eye(len(NAMES), dtype=int),
                "classes": NAMES,
                "accuracy": 1.0,
                "kappa": 1.0,
                "majority_baseline": 0.25,
            },
            "$x^$ variant",
            tmp_path / "confusion.png",
        ),
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    umap, bar, montage, confusion = drawn_figures
    assert_literal(umap, NAMES)  # legend entries
    assert_literal(bar, NAMES)  # x tick labels
    assert_literal(montage, [])
    assert_literal(confusion, NAMES)  # both axes' tick labels
    assert any(t.get_text().startswith("$x^$ variant") for t in texts(confusion))


# --- item 9: the report's HTML and Markdown -------------------------------------------------------


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.cells, self.attrs = [], [], []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [v for _, v in attrs if v]
        self._in_cell = tag in ("td", "th", "figcaption", "strong", "h2")
        if self._in_cell:
            self.cells.append("")

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data

    def handle_comment(self, data):
        self.tags.append("<!--")


def comparison(variants: list[str]) -> pd.DataFrame:
    rows = [(v, 128, -0.5, "none", 0.4 + k / 100, 0.45, 0.3 + k / 100) for k, v in enumerate(variants)]
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def report_section(tmp_path, variant: str, cultures: list[str]) -> VariantSection:
    cells = labelled_cells(cultures)
    comp = composition(cells["hdbscan"], cells["culture"], n_boot=50)
    return VariantSection(
        variant=variant,
        umap_scatters=[umap_scatter(cells, "culture", tmp_path / "umap_culture.png")],
        composition_bar=stacked_composition_bar(comp, tmp_path / "bar.png"),
        composition=comp,
        cluster_metrics={
            "hdbscan": {"n_clusters": 3, "silhouette": -0.25},
            "gmm": {"n_clusters": 3, "silhouette": 0.125},
        },
        composition_error=composition_error(cells["hdbscan"], cells["morphotype"], cells["culture"]),
        notes=f"plate {HOSTILE}",
    )


def test_report_html_shows_hostile_names_as_text(tmp_path):
    section = report_section(tmp_path, HOSTILE, NAMES)
    path = write_report(tmp_path / "report", comparison(["B", HOSTILE]), [section])
    text = path.read_text(encoding="utf-8")

    assert "<script" not in text and "<!--" not in text
    page = _Page()
    page.feed(text)
    assert "script" not in page.tags and "<!--" not in page.tags
    for name in NAMES:  # culture column of the composition tables
        assert name in page.cells, name
    assert HOSTILE in page.cells  # comparison table and best variant
    assert f"Variant {HOSTILE}" in page.cells
    assert f"{HOSTILE}: UMAP (umap_culture)" in page.attrs  # figure alt text
    assert html.escape(HOSTILE) in text


def test_markdown_summary_escapes_names():
    md = markdown_summary(comparison(["B", HOSTILE]), [VariantSection(variant=HOSTILE)])
    assert not re.search(r"[<>&]", re.sub(r"\\.", "", md))  # no unescaped HTML: "<script", "<!--"
    pipe = re.compile(r"(?<!\\)\|")
    unescape = lambda text: re.sub(r"\\(.)", r"\1", text)  # noqa: E731
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("|")]
    assert len(tables) == 2
    for lines in tables:
        hostile = [line for line in lines if "alpha" in line]
        assert len(hostile) == 1
        # the name's "|" is escaped: the row keeps the header's columns and its first cell is the name
        assert len(pipe.findall(hostile[0])) == len(pipe.findall(lines[0]))
        assert unescape(pipe.split(hostile[0])[1].strip()) == HOSTILE
    best = re.search(r"\*\*Best variant by culture kappa held out by \w+: (.*)\*\* \(", md).group(1)
    assert unescape(best) == HOSTILE


# --- item 9: the explorer page ---------------------------------------------------------------------


def hostile_points(n: int) -> pd.DataFrame:
    points = explorer_labels(n)
    k = np.arange(n) % len(NAMES)
    names = np.array(NAMES, dtype=object)
    return points.assign(
        culture=names[k],
        plate=names[::-1][k],
        image=[f"{HOSTILE}_{i}.tif" for i in range(n)],
        concentration=names[(k + 1) % len(NAMES)],
        crop_id=[f"{HOSTILE}:{i}" for i in range(n)],
    )


DATA_ELEMENT = re.compile(r'<script type="application/json" id="explorer-data">(.*?)</script>', re.S)


def test_explorer_json_round_trips_names_and_cannot_close_its_script(tmp_path):
    points = hostile_points(60)
    path = write_explorer(tmp_path / "explorer.html", HOSTILE, points, fake_crops(60, size=48))
    text = path.read_text(encoding="utf-8")

    assert text.count("<script") == 2 and text.count("</script>") == 2  # only the page's own
    assert "<!--" not in text
    (payload,) = DATA_ELEMENT.findall(text)
    assert not re.search(r"[<>&\u2028\u2029]", payload)
    data = json.loads(payload)
    for field in ("culture", "plate", "image", "concentration", "crop_id"):
        column = data["columns"][field]
        assert [column["cats"][c] for c in column["codes"]] == points[field].tolist(), field
    assert f"<title>{html.escape('Cell explorer: ' + HOSTILE)}</title>" in text


def test_script_json_escapes_everything_that_can_end_a_script():
    value = {"s": "</script><!--<script>&amp;\u2028\u2029>", "n": [-0.5, 1]}
    text = script_json(value)
    assert not re.search(r"[<>&\u2028\u2029]", text)
    assert json.loads(text) == value


@pytest.mark.browser
def test_explorer_page_works_with_hostile_names(tmp_path):
    n = 200
    points = hostile_points(n)
    url = write_explorer(tmp_path / "explorer.html", HOSTILE, points, fake_crops(n, size=48)).as_uri()
    with chromium_page(failure_screenshot=tmp_path / "failure.png") as page:
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (errors.append(f"dialog {d.message}"), d.dismiss()))
        page.goto(url)
        page.wait_for_function("window.explorer && window.explorer.ready", timeout=10_000)
        assert page.title() == f"Cell explorer: {HOSTILE}"
        assert len(page.evaluate("explorer.visibleIndices()")) == n
        drawn = page.evaluate("""() => {
            const c = document.getElementById("map"), d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let k = 0; for (let i = 3; i < d.length; i += 4) k += d[i] > 0; return k; }""")
        assert drawn > n  # the points are on the canvas

        page.select_option("#colour-by", "culture")
        legend = page.eval_on_selector_all("#legend [data-category]", "els => els.map(e => e.dataset.category)")
        assert sorted(legend) == sorted(NAMES)
        page.click(f"#legend [data-category={json.dumps(HOSTILE)}]")
        assert (
            sorted(page.evaluate("explorer.visibleIndices()")) == np.flatnonzero(points["culture"] == HOSTILE).tolist()
        )
        i = int(page.evaluate("explorer.visibleIndices()")[0])
        page.mouse.move(**page.evaluate(f"explorer.screenPosition({i})"))
        page.wait_for_selector("#tooltip:not([hidden])")
        shown = int(page.get_attribute("#tooltip", "data-index"))
        for field in ("culture", "plate", "crop_id", "image"):
            assert page.inner_text(f'#tooltip [data-field="{field}"]') == points.at[shown, field], field
        assert page.locator("script").count() == 2
        assert errors == []


# --- item 10: CSV formula injection ----------------------------------------------------------------


def test_to_csv_safe_prefixes_formula_text_and_keeps_numbers(tmp_path):
    table = pd.DataFrame(
        {
            "name": FORMULAS + ["-0.5", "plain", None],
            "number": [-0.5, 1.0, -2.0, 3.5, -1e-5, 0.0, -7.25, 2.0, np.nan],
            "count": np.arange(-4, 5),
            "flag": [True, False] * 4 + [True],
            "kind": pd.Categorical(["=A1", "ok", "@x"] * 3),
            "text": pd.array(["-x", "x", "+y"] * 3, dtype="string"),
        }
    )
    safe = neutralise_formulas(table)
    assert safe["name"].tolist()[:6] == ["'" + f for f in FORMULAS]
    assert safe["name"].tolist()[6:8] == ["-0.5", "plain"] and safe["name"].isna().iloc[8]
    assert list(safe["kind"].cat.categories) == sorted(["'=A1", "ok", "'@x"])
    assert safe["text"].tolist()[:3] == ["'-x", "x", "'+y"]
    pd.testing.assert_frame_equal(safe[["number", "count", "flag"]], table[["number", "count", "flag"]])
    assert table["name"].iloc[0] == FORMULAS[0]  # the input is not changed

    to_csv_safe(table, tmp_path / "t.csv", index=False)
    back = pd.read_csv(tmp_path / "t.csv", keep_default_na=False, na_values=[""])
    assert back["name"].tolist()[:6] == ["'" + f for f in FORMULAS]
    np.testing.assert_array_equal(back["number"].to_numpy(), table["number"].to_numpy())
    np.testing.assert_array_equal(back["count"].to_numpy(), table["count"].to_numpy())
    assert to_csv_safe(pd.DataFrame({"=h": ["a"]}), index=False).splitlines()[0] == "'=h"
    # a carriage return inside a name stays inside its (quoted) cell: no new row starting "=cmd"
    rows = list(
        csv.reader(io.StringIO(to_csv_safe(pd.DataFrame({"a": ["x\r=cmd"], "b": [1]}), index=False), newline=""))
    )
    assert rows == [["a", "b"], ["x\r=cmd", "1"]]


def test_report_csvs_neutralise_formula_names_and_keep_numbers(tmp_path):
    cultures = FORMULAS[:4] + ["-0.5", "GBM01"]
    section = report_section(tmp_path, "B", cultures)
    table = comparison(["-cmd", "B"])
    out = write_report(tmp_path / "report", table, [section]).parent

    comp = pd.read_csv(out / "B_composition.csv", keep_default_na=False)
    expected = section.composition.assign(
        culture=["'" + c if c in FORMULAS else c for c in section.composition["culture"]]
    )
    pd.testing.assert_frame_equal(comp, expected.reset_index(drop=True), check_dtype=False)
    assert {"'" + f for f in FORMULAS[:4]} <= set(comp["culture"]) and "-0.5" in set(comp["culture"])

    back = pd.read_csv(out / "comparison.csv")
    assert back["variant"].tolist() == ["'-cmd", "B"]
    pd.testing.assert_frame_equal(back.drop(columns="variant"), table.drop(columns="variant"), check_dtype=False)
    assert (back["lambda"] == -0.5).all()

    metrics = pd.read_csv(out / "B_cluster_metrics.csv")
    assert metrics.set_index("method")["silhouette"].to_dict() == {"hdbscan": -0.25, "gmm": 0.125}
    for written in out.glob("*.csv"):
        for line in written.read_text().splitlines():
            for cell in line.split(","):
                assert not cell.startswith(("=", "+", "@", '"=', '"+', '"@', '"-', "\t", '"\t')), (written.name, line)


def write_cells_image(path) -> None:
    from gbm_assets.imaging.synthetic import culture_mixture, synthesize_image

    field = synthesize_image(np.random.default_rng(0), culture_mixture("GBM01"), 12, size=256)
    image = field.image
    if image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    assert cv2.imwrite(str(path), image)


def test_segment_csv_keeps_a_formula_like_file_name_as_text(tmp_path):
    """A real run: the image column holds the absolute path, so the file name `=...` stays as is."""
    image = tmp_path / "images" / "=HYPERLINK(1)-@SUM(A1).png"
    image.parent.mkdir()
    write_cells_image(image)
    out = tmp_path / "cells.csv"
    assert main(["segment", str(image), "--out", str(out), "--workers", "1"]) == 0
    cells = pd.read_csv(out)
    assert len(cells) and set(cells["image"]) == {str(image)}
    assert not any(v.startswith(("=", "+", "-", "@")) for v in cells["image"])


def test_segment_csv_neutralises_image_names_the_segmenter_reports(tmp_path, monkeypatch):
    """Whatever image name the cell finder reports (relative names, another OS), the CSV is safe."""
    import gbm_assets.imaging.plate_cells as plate_cells
    import gbm_assets.imaging.plate_coordinates as plate_coordinates

    image = tmp_path / "img.png"
    cv2.imwrite(str(image), np.zeros((8, 8), np.uint8))
    found = plate_cells.ImageCells(
        image='=HYPERLINK("http://x","y").tif',
        cells=pd.DataFrame({"cell_id": [1, 2], "x": [3, -1], "y": [-0.5, 2.0], "area": 10.0, "qc": "cell"}),
        labels=b"",
        height=8,
        width=8,
        measures={},
    )
    monkeypatch.setattr(plate_coordinates, "find_plate_cells", lambda *a, **k: iter([found]))
    out = tmp_path / "cells.csv"
    assert main(["segment", str(image), "--out", str(out), "--workers", "1", "--cell-diameter", "40"]) == 0
    cells = pd.read_csv(out)
    assert cells["image"].tolist() == ["'" + found.image] * 2
    pd.testing.assert_frame_equal(cells[["x", "y"]], found.cells[["x", "y"]])
