"""The cell explorer: stratified sampling, a self-contained page, and hover / legend filter in Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from gbm_assets.analysis import explorer
from gbm_assets.analysis.explorer import make_thumbnails, page_template, sample_for_explorer, write_explorer
from gbm_assets_tests.servers import chromium_page

MAX_BYTES_20K = 30_000_000  # the page for 20,000 points must stay under 30 MB
DATA_URI = re.compile(r"data:image/webp;base64,[A-Za-z0-9+/=]+")


def fake_labels(n: int, seed: int = 0) -> pd.DataFrame:
    """A labels frame like clusters.parquet: 3 cultures, HDBSCAN clusters 0..2 plus noise around them."""
    rng = np.random.default_rng(seed)
    hdbscan = rng.choice([-1, 0, 1, 2], size=n, p=[0.3, 0.4, 0.2, 0.1])
    centres = np.array([[0.0, 0.0], [6.0, 1.0], [2.0, 7.0]])
    xy = np.where(
        hdbscan[:, None] >= 0, centres[np.maximum(hdbscan, 0)] + rng.normal(0, 0.9, (n, 2)), rng.uniform(-3, 9, (n, 2))
    )
    gmm = np.where(hdbscan >= 0, hdbscan, rng.integers(0, 3, n))
    plate = rng.choice(["synth-GBM01-c250-r1", "synth-GBM02-c1000-r1", "synth-GBM03-c4000-r1"], size=n)
    image = [f"img_{k:03d}.tif" for k in rng.integers(0, 5, n)]
    return pd.DataFrame(
        {
            "crop_id": [f"{p}:{im}:{i}" for i, (p, im) in enumerate(zip(plate, image, strict=True))],
            "plate": plate,
            "image": image,
            "x": rng.integers(64, 960, n),
            "y": rng.integers(64, 960, n),
            "culture": [p.split("-")[1] for p in plate],
            "concentration": [p.split("-")[2][1:] for p in plate],
            "replicate": 1,
            "timepoint_h": 0.0,
            "well": "B2",
            "position": "1",
            "umap_x": xy[:, 0],
            "umap_y": xy[:, 1],
            "hdbscan": hdbscan,
            "hdbscan_noise": hdbscan == -1,
            "gmm": gmm,
            "gmm_prob": rng.uniform(0.5, 1, n),
            "auto": gmm,
        }
    )


def fake_crops(n: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """Phase-contrast-like crops: a dark cell body of random shape with a bright halo, on noisy grey."""
    rng = np.random.default_rng(seed)
    crops = np.empty((n, size, size), np.uint8)
    for k in range(n):
        img = np.full((size, size), 110, np.uint8)
        axes = (int(rng.integers(8, 30)), int(rng.integers(6, 18)))
        angle, c = float(rng.uniform(0, 180)), size // 2
        cv2.ellipse(img, (c, c), (axes[0] + 4, axes[1] + 4), angle, 0, 360, 200, -1)
        cv2.ellipse(img, (c, c), axes, angle, 0, 360, int(rng.integers(30, 80)), -1)
        noisy = cv2.GaussianBlur(img, (5, 5), 1.5).astype(np.int16) + rng.normal(0, 10, img.shape).astype(np.int16)
        crops[k] = np.clip(noisy, 0, 255).astype(np.uint8)
    return crops


def decode(uri: str) -> np.ndarray:
    raw = base64.b64decode(uri.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)


# --- sampling -------------------------------------------------------------------------------------


def unbalanced_labels() -> pd.DataFrame:
    sizes = {("GBM01", 0): 5000, ("GBM01", 1): 40, ("GBM02", -1): 3000, ("GBM02", 0): 800, ("GBM03", 2): 7}
    rows = [(culture, cluster) for (culture, cluster), size in sizes.items() for _ in range(size)]
    labels = pd.DataFrame(rows, columns=["culture", "hdbscan"])
    labels = labels.sample(frac=1, random_state=0).reset_index(drop=True)  # groups interleaved
    return labels.assign(crop_id=[f"c{i}" for i in range(len(labels))])


def test_sample_shares_points_evenly_across_cultures_and_clusters():
    labels = unbalanced_labels()
    sample = sample_for_explorer(labels, max_points=2000, seed=0)

    assert len(sample) == 2000
    counts = sample.groupby(["culture", "hdbscan"]).size().to_dict()
    # the two small groups are kept whole; the three big ones split the rest equally
    assert counts == {("GBM01", 0): 651, ("GBM01", 1): 40, ("GBM02", -1): 651, ("GBM02", 0): 651, ("GBM03", 2): 7}
    assert sample["crop_id"].is_unique and sample["crop_id"].isin(labels["crop_id"]).all()
    position = labels.reset_index().set_index("crop_id")["index"]
    assert position[sample["crop_id"]].is_monotonic_increasing  # input order kept


def test_sample_is_deterministic_and_keeps_small_inputs_whole():
    labels = unbalanced_labels()
    first = sample_for_explorer(labels, max_points=500, seed=3)
    pd.testing.assert_frame_equal(first, sample_for_explorer(labels, max_points=500, seed=3))
    assert not first["crop_id"].equals(sample_for_explorer(labels, max_points=500, seed=4)["crop_id"])
    assert len(first) == 500 and first.groupby(["culture", "hdbscan"]).ngroups == 5

    small = labels.iloc[:300]
    pd.testing.assert_frame_equal(sample_for_explorer(small, max_points=500), small.reset_index(drop=True))
    with pytest.raises(ValueError):
        sample_for_explorer(labels, max_points=0)


# --- the page file ------------------------------------------------------------------------------


def test_thumbnails_are_area_shrunk_crops_in_32_grey_levels():
    crops = fake_crops(20)
    thumbs = make_thumbnails(crops, size=48, grey_levels=32)
    area = np.stack([cv2.resize(c, (48, 48), interpolation=cv2.INTER_AREA) for c in crops])
    assert thumbs.shape == (20, 48, 48) and thumbs.dtype == np.uint8
    assert np.abs(thumbs.astype(int) - area).max() <= 5  # half a grey step (255 / 31 / 2), rounded up
    assert len(np.unique(thumbs)) <= 32


def test_page_is_one_self_contained_file_with_every_thumbnail(tmp_path):
    points, crops = fake_labels(300), fake_crops(300)
    path = write_explorer(tmp_path / "explorer" / "B.html", "B", points, crops)

    assert path == tmp_path / "explorer" / "B.html" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["B.html"]  # no temporary file left behind
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=", text, re.I)
    assert 'id="map"' in text and 'id="tooltip-img"' in text and 'data-field="crop_id"' in text
    uris = DATA_URI.findall(text)
    assert len(uris) == len(points)
    np.testing.assert_array_equal(np.stack([decode(u) for u in uris]), make_thumbnails(crops))


def test_page_size_stays_within_the_20000_point_budget(tmp_path):
    n = 1000
    path = write_explorer(tmp_path / "explorer.html", "B", fake_labels(n, seed=1), fake_crops(n, seed=1))
    per_point = path.stat().st_size / n
    print(f"explorer page: {per_point:.0f} bytes per point -> {per_point * 20_000 / 1e6:.1f} MB for 20,000")
    assert per_point * 20_000 < MAX_BYTES_20K


def test_write_explorer_rejects_misaligned_input(tmp_path):
    points = fake_labels(10)
    with pytest.raises(ValueError, match="thumbnails"):
        write_explorer(tmp_path / "x.html", "B", points, fake_crops(9))
    with pytest.raises(ValueError, match="umap_x"):
        write_explorer(tmp_path / "x.html", "B", points.drop(columns="umap_x"), fake_crops(10))
    assert not (tmp_path / "x.html").exists()


def test_page_is_the_template_beside_the_module_with_every_slot_filled(tmp_path):
    template = Path(explorer.__file__).with_name("explorer.html")
    assert page_template() == template.read_text(encoding="utf-8")
    slots = set(re.findall(r"__([A-Z]+)__", page_template()))
    assert slots == {"TITLE", "COUNT", "OPTIONS", "FIELDS", "THUMB", "DATA"}
    assert "<script>" in page_template() and "window.explorer" in page_template()

    text = write_explorer(tmp_path / "x.html", "B<&>__DATA__", fake_labels(50), fake_crops(50)).read_text("utf-8")
    assert not re.search(r"__(?:TITLE|COUNT|OPTIONS|FIELDS|THUMB|DATA)__", text.replace("B&lt;&amp;&gt;__DATA__", ""))
    assert text.count("<title>Cell explorer: B&lt;&amp;&gt;__DATA__</title>") == 1  # inserted text is never refilled
    assert '<span id="status">50 cells</span>' in text and "width: 96px; height: 96px" in text
    assert '<option value="hdbscan">hdbscan</option>' in text and '<dd data-field="crop_id"></dd>' in text


def test_a_built_wheel_ships_the_template(tmp_path):
    """A non-editable install has explorer.html as package data, and the explorer renders from it."""
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "gbm_assets", src / "gbm_assets", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    build = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", build, str(dist)], cwd=src, check=True, capture_output=True)
    (wheel,) = dist.glob("gbm_assets-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("gbm_assets/analysis/explorer.html").decode("utf-8") == page_template()
        zf.extractall(tmp_path / "site")

    check = (
        "import sys, gbm_assets.analysis.explorer as e; "
        "assert e.__file__.startswith(sys.argv[1]), e.__file__; "
        "assert '__DATA__' in e.page_template()"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    subprocess.run([sys.executable, "-c", check, str(tmp_path / "site")], env=env, check=True, cwd=tmp_path)


# --- in the browser -----------------------------------------------------------------------------


def screen_positions(page) -> np.ndarray:
    return np.array(
        page.evaluate(
            "Array.from({length: explorer.n}, (_, i) => { const p = explorer.screenPosition(i); return [p.x, p.y]; })"
        )
    )


def isolated_point(positions: np.ndarray, candidates: np.ndarray) -> int:
    """The candidate farthest from every other point on screen, so hovering it cannot pick a neighbour."""
    d = np.linalg.norm(positions[candidates, None, :] - positions[None, :, :], axis=2)
    d[np.arange(len(candidates)), candidates] = np.inf
    best = int(np.argmax(d.min(axis=1)))
    assert d[best].min() > 3, "no isolated point to hover"
    return int(candidates[best])


def visible(page) -> list[int]:
    return sorted(page.evaluate("explorer.visibleIndices()"))


@pytest.mark.browser
def test_hover_shows_the_cells_crop_and_the_legend_filters(tmp_path):
    points, crops = fake_labels(400), fake_crops(400)
    url = write_explorer(tmp_path / "explorer.html", "B", points, crops).as_uri()
    shot = tmp_path / "explorer.png"
    with chromium_page(failure_screenshot=tmp_path / "failure.png") as page:
        page.goto(url)
        page.wait_for_function("window.explorer && window.explorer.ready")
        positions = screen_positions(page)
        cell = isolated_point(positions, np.flatnonzero(points["hdbscan"] == 1))

        page.mouse.move(*positions[cell])
        page.wait_for_selector("#tooltip:not([hidden])")
        assert page.get_attribute("#tooltip", "data-index") == str(cell)
        for field in ("crop_id", "plate", "image", "x", "y", "culture", "concentration", "hdbscan", "gmm"):
            assert page.inner_text(f'#tooltip [data-field="{field}"]') == str(points.at[cell, field]), field
        shown = decode(page.get_attribute("#tooltip-img", "src"))
        np.testing.assert_array_equal(shown, make_thumbnails(crops[cell : cell + 1])[0])
        assert np.abs(shown.astype(int) - cv2.resize(crops[cell], (48, 48), interpolation=cv2.INTER_AREA)).max() <= 5

        page.click('#legend [data-category="1"]')
        cluster = np.flatnonzero(points["hdbscan"] == 1).tolist()
        assert visible(page) == cluster
        assert page.locator("#gallery img").count() == min(40, len(cluster))
        outsider = isolated_point(positions, np.flatnonzero(points["hdbscan"] == 0))
        page.mouse.move(*positions[outsider])
        assert page.is_hidden("#tooltip")  # a filtered-out point cannot be hovered
        page.mouse.move(*positions[cell])
        page.wait_for_selector("#tooltip:not([hidden])")
        page.screenshot(path=str(shot))

        page.click('#legend [data-category="1"]')  # a second click shows all again
        assert len(visible(page)) == len(points)
        page.select_option("#colour-by", "culture")
        assert page.eval_on_selector_all("#legend [data-category]", "els => els.map(e => e.dataset.category)") == [
            "GBM01",
            "GBM02",
            "GBM03",
        ]
        page.click('#legend [data-category="GBM02"]')
        assert visible(page) == np.flatnonzero(points["culture"] == "GBM02").tolist()
        page.click("#show-all")
        assert len(visible(page)) == len(points)
    print(f"explorer screenshot: {shot}")


@pytest.mark.slow
@pytest.mark.browser
def test_20000_point_page_is_small_and_quick(tmp_path):
    n = 20_000
    path = write_explorer(tmp_path / "explorer.html", "B", fake_labels(n, seed=2), fake_crops(n, seed=2))
    size = path.stat().st_size
    with chromium_page() as page:
        start = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_function("window.explorer && window.explorer.ready", timeout=30_000)
        wall = time.perf_counter() - start
        ready_ms = page.evaluate("explorer.readyMs")
    print(
        f"explorer page for {n} points: {size / 1e6:.1f} MB, ready {ready_ms / 1000:.2f} s after navigation "
        f"({wall:.2f} s wall)"
    )
    assert size < MAX_BYTES_20K
    assert ready_ms < 10_000
