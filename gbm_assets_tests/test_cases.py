"""The real-world input cases of ../shared/cases, each asserting what its README says a user expects.

The CellProfiler cases (11, 13) are in test_cellprofiler.py; the image formats in detail in
test_image_formats.py. The cases are read from the shared folder, never copied into the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gbm_assets.assets.cells import cell_coordinates, cell_crops
from gbm_assets.assets.partitions import plates
from gbm_assets.assets.raw_plates import raw_plates
from gbm_assets.assets.resources import DataDirs
from gbm_assets.cli import main
from gbm_assets.errors import ImageReadError
from gbm_assets.imaging.plate_import import make_plate
from gbm_assets.imaging.plates import find_ready_plates, read_manifest, unusable_plate_folders, validate_plate
from gbm_assets.paths import plate_file

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
T07_CELLS = (12, 26)  # "about 18 cells in this 384x384 field"


def case(name: str) -> Path:
    path = CASES / name
    if not path.is_dir():
        pytest.skip(f"case {name} not found under {CASES}")
    return path


def _segment(tmp_path, *images) -> pd.DataFrame:
    out = tmp_path / "cells.csv"
    assert main(["segment", *map(str, images), "--out", str(out), "--workers", "1"]) == 0
    return pd.read_csv(out)


def _ingest(data_root: Path, plate_id: str, crop_size: int = 64):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(plates.name, [plate_id])
    config = {
        "ops": {
            "cell_crops": {"config": {"crop_size": crop_size, "workers": 1}},
            "cell_coordinates": {"config": {"workers": 1}},
        }
    }
    result = dg.materialize(
        [raw_plates, cell_coordinates, cell_crops],
        partition_key=plate_id,
        instance=instance,
        resources={"data": DataDirs(root=str(data_root))},
        run_config=config,
    )
    assert result.success
    data = DataDirs(root=str(data_root))
    return pd.read_parquet(plate_file(data.coordinates, plate_id)), pq.read_table(plate_file(data.crops, plate_id))


def test_01_lzw_and_jpeg_tiff_in_segment_add_plate_and_ingestion(tmp_path):
    root = case("01-lzw-tiff")
    lzw, jpeg = root / "raw" / "t98g-lzw" / "t07_lzw.tif", root / "t07_8bit_jpeg_in_tiff.tif"
    cells = _segment(tmp_path, lzw, jpeg)
    per_image = cells.groupby("image").size()
    n_lzw, n_jpeg = per_image[str(lzw)], per_image[str(jpeg)]
    assert T07_CELLS[0] <= n_lzw <= T07_CELLS[1] and T07_CELLS[0] <= n_jpeg <= T07_CELLS[1]
    assert abs(n_lzw - n_jpeg) <= 0.2 * n_lzw
    # add-plate from a folder holding the JPEG-in-TIFF, and ingestion of the LZW plate as given.
    src = tmp_path / "jpeg-src"
    src.mkdir()
    (src / jpeg.name).symlink_to(jpeg)
    summary = validate_plate(make_plate(src, tmp_path / "data" / "raw", "t98g-jpeg", culture="T98G"))
    assert (summary.width, summary.height, summary.bits) == (384, 384, 8)
    shutil.copytree(root / "raw" / "t98g-lzw", tmp_path / "data" / "raw" / "t98g-lzw")
    coords, crops = _ingest(tmp_path / "data", "t98g-lzw")
    assert len(coords) == n_lzw and crops.num_rows > 0
    assert set(crops.column("image").to_pylist()) == {"t07_lzw.tif"}


def test_03_multipage_stack_is_never_blended(tmp_path):
    plate = case("03-multipage-timelapse") / "raw" / "t98g-stack"
    # As given (one manifest row for a 3-frame file): a clear error naming the file and the count.
    with pytest.raises(ImageReadError, match=r"xy01_t07-t19\.tif.*3 frames"):
        validate_plate(plate)
    # Through add-plate: one image per frame, the frame index kept, 6 h apart as ImageJ recorded.
    made = make_plate(plate / "xy01_t07-t19.tif", tmp_path / "raw", "t98g-stack", culture="T98G")
    m = read_manifest(made)
    assert m["image"].tolist() == [f"xy01_t07-t19_frame{k:03d}.tif" for k in range(3)]
    assert m["frame"].tolist() == ["0", "1", "2"]
    assert m["timepoint_h"].tolist() == [0.0, 6.0, 12.0]  # finterval=21600 s in the ImageJ header
    cells = _segment(tmp_path, *(made / name for name in m["image"]))
    counts = cells.groupby("image").size()
    assert len(counts) == 3 and counts.min() >= T07_CELLS[0]


def test_07_instrument_jpeg_export(tmp_path):
    export = case("07-incucyte-jpeg-export") / "export"
    m = read_manifest(make_plate(export, tmp_path / "raw", culture="GBM03"))
    assert m["timepoint_h"].tolist() == [6.0, 12.0]
    assert m["well"].tolist() == ["B2", "B2"] and m["position"].tolist() == ["1", "1"]
    cells = _segment(tmp_path, export)
    assert cells.groupby("image").size().min() >= T07_CELLS[0]


def test_08_elapsed_time_from_names(tmp_path):
    export = case("08-incucyte-timestamps") / "export"
    assert main(["add-plate", str(export), "--culture", "GBM03", "--plate-id", "gbm03-b2", "--raw", str(tmp_path)]) == 0
    m = read_manifest(tmp_path / "gbm03-b2")
    assert m["timepoint_h"].tolist() == [4.0, 28.0, 52.5]
    assert set(m["well"]) == {"B2"}


def test_09_spreadsheet_manifest_bom_crlf_non_ascii_empty_rows():
    plate = case("09-excel-manifest-bom-crlf") / "raw" / "gbm-zh-01"
    summary = validate_plate(plate)
    m = summary.manifest
    assert m["image"].tolist() == ["GBM Zürich 01 t07.tif", "GBM Zürich 01 t13.tif"]
    assert summary.cultures == ["GBM-Zürich-01 (Primärkultur)"]
    assert m["timepoint_h"].tolist() == [7.0, 13.0] and m["concentration"].tolist() == ["1000", "1000"]


def test_10_semicolon_manifest_with_decimal_comma():
    m = validate_plate(case("10-excel-manifest-semicolon") / "raw" / "gbm-de-01").manifest
    assert m["timepoint_h"].tolist() == [0.5]
    assert (m["culture"].iloc[0], m["concentration"].iloc[0], m["replicate"].iloc[0]) == ("GBM03", "1000", 1)


def test_15_plate_folder_with_space_is_named_and_no_demo_data_is_written(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(case("15-plate-id-with-space") / "raw", data / "raw")
    before = sorted(p.name for p in (data / "raw").iterdir())
    (problem,) = unusable_plate_folders(data / "raw")
    assert "GBM03 plate 1" in problem and "safe plate id" in problem and "GBM03-plate-1" in problem
    for args in (["--no-synth"], []):
        assert main(["run", "--data", str(data), *args]) == 1
        err = capsys.readouterr().err
        assert "'GBM03 plate 1' is not a safe plate id" in err
        assert sorted(p.name for p in (data / "raw").iterdir()) == before  # no demo plates among the user's
    # add-plate derives a safe id from the folder name.
    assert (
        main(["add-plate", str(data / "raw" / "GBM03 plate 1"), "--culture", "GBM03", "--raw", str(tmp_path / "raw")])
        == 0
    )
    assert find_ready_plates(tmp_path / "raw") == ["GBM03-plate-1"]


def test_add_plate_says_when_every_image_gets_one_time_point(tmp_path, capsys):
    src = case("01-lzw-tiff") / "raw" / "t98g-lzw" / "t07_lzw.tif"
    (tmp_path / "src").mkdir()
    for name in ("t07.tif", "t13.tif"):
        (tmp_path / "src" / name).symlink_to(src)
    assert main(["add-plate", str(tmp_path / "src"), "--culture", "A", "--raw", str(tmp_path / "raw")]) == 0
    assert "all 2 images are at 0 h" in capsys.readouterr().err
    assert (
        main(
            [
                "add-plate",
                str(tmp_path / "src"),
                "--culture",
                "A",
                "--raw",
                str(tmp_path / "raw"),
                "--plate-id",
                "timed",
                "--timepoint-pattern",
                r"t(\d+)",
            ]
        )
        == 0
    )
    assert "images are at" not in capsys.readouterr().err


def test_cli_user_errors_are_one_line_and_exit_1(tmp_path):
    secret = tmp_path / "notes.txt"
    secret.write_text("password=hunter2\n")
    (tmp_path / "img.tif").symlink_to(secret)
    env = {**os.environ, "GBM_ASSETS_DATA": str(tmp_path / "data")}
    for args, says in [
        (["segment", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o.csv")], "missing.tif"),
        (["segment", str(tmp_path / "img.tif"), "--out", str(tmp_path / "o.csv")], "img.tif"),
        (["add-plate", str(tmp_path / "nowhere"), "--culture", "A"], "nowhere"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "gbm_assets.cli", *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 1, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
        assert len(lines) == 1 and lines[0].startswith("gbm-assets: error:") and says in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr and "hunter2" not in proc.stderr
    debug = subprocess.run(
        [
            sys.executable,
            "-m",
            "gbm_assets.cli",
            "segment",
            str(tmp_path / "missing.tif"),
            "--out",
            str(tmp_path / "o.csv"),
            "--debug",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_segment_accepts_folders_and_globs_and_keeps_masks_apart(tmp_path):
    src = case("01-lzw-tiff") / "raw" / "t98g-lzw" / "t07_lzw.tif"
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        shutil.copy(src, tmp_path / "in" / folder / "t07.tif")
    out, masks = tmp_path / "cells.csv", tmp_path / "masks"
    assert (
        main(
            [
                "segment",
                str(tmp_path / "in" / "a"),
                str(tmp_path / "in" / "*" / "t07.tif"),
                "--out",
                str(out),
                "--masks",
                str(masks),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    table = pd.read_csv(out)
    assert sorted(table["image"].unique()) == [str(tmp_path / "in" / f / "t07.tif") for f in ("a", "b")]
    assert sorted(str(p.relative_to(masks)) for p in masks.rglob("*.png")) == ["a/t07_labels.png", "b/t07_labels.png"]


def test_run_stops_promptly_on_sigterm_and_keeps_finished_plates(tmp_path):
    """`timeout` and `docker stop` send SIGTERM: the command stops (non-zero), it does not go on to
    the next plate or stage, and every plate it wrote is whole."""
    import signal
    import threading
    import time

    from gbm_assets.imaging.synthetic import write_plates

    data = tmp_path / "data"
    write_plates(data / "raw", n_cultures=4, n_concentrations=5, images_per_plate=3, size=768, seed=3)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "TQDM_MININTERVAL": "0"}
    (tmp_path / "dagster_home").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gbm_assets.cli", "run", "--no-synth", "--data", str(data)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    seen: list[str] = []
    threading.Thread(target=lambda: seen.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    crops = data / "cell_crops.parquet"
    deadline = time.monotonic() + 240
    while not list(crops.glob("plate=*/part-0.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first plate is done: ingestion is under way
    assert proc.poll() is None, "".join(seen[-20:])
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("still running 60 s after SIGTERM:\n" + "".join(seen[-20:])) from None
    assert time.monotonic() - sent < 30, "".join(seen[-20:])
    assert rc != 0 and "interrupted" in "".join(seen), "".join(seen[-20:])
    assert not any("training encoders" in line for line in seen)  # it did not go on to the next stage
    written = sorted((data / "cell_crops.parquet").glob("plate=*/part-0.parquet"))
    assert len(written) < 20  # stopped part-way
    for path in written:
        assert pq.read_table(path).num_rows >= 0  # whole files only
    assert not list(data.rglob("*.tmp"))


_SIGNAL_BETWEEN_STEPS = """
import logging, os, signal
import dagster as dg
from gbm_assets import interrupts, pipeline

interrupts.install()


class SigtermAfterSteps(logging.Handler):
    def emit(self, record):
        if "Finished steps in process" in record.getMessage():
            print("SIGTERM sent after the steps", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # the steps are done; Dagster is writing the run's end


@dg.logger
def sigterm_after_steps(_):
    log = logging.getLogger("sigterm_after_steps")
    log.setLevel(logging.DEBUG)
    log.addHandler(SigtermAfterSteps())
    return log


@dg.op
def step():
    return 1


@dg.job(logger_defs={"sigterm_after_steps": sigterm_after_steps})
def one_step():
    step()


result = one_step.execute_in_process(
    run_config={"loggers": {"sigterm_after_steps": {}}}, instance=dg.DagsterInstance.ephemeral(), raise_on_error=False
)
print("run success:", result.success)
try:
    pipeline.stop_if_interrupted(result)
    print("went on")
except KeyboardInterrupt as exc:
    print("stopped:", exc)
"""


def test_sigterm_between_steps_stops_the_command_though_dagster_forgets_it(tmp_path):
    """A SIGTERM that lands after a run's last step, while Dagster writes the run's end, is dropped
    by Dagster (the run succeeds); the command still stops instead of going on to the next plate."""
    script = tmp_path / "signal_between_steps.py"
    script.write_text(_SIGNAL_BETWEEN_STEPS)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIGTERM sent after the steps" in done.stdout, done.stdout
    assert "run success: True" in done.stdout  # what Dagster itself reports
    assert "stopped: SIGTERM received" in done.stdout, done.stdout


def test_livecell_style_8bit_lzw_tiles_ingest_with_plausible_counts(tmp_path):
    """704x520 8-bit LZW-compressed tiled TIFFs (LIVECell / Incucyte exports) ingest end to end,
    the count close to the cells drawn, and crops carry the well and position of the instrument names."""
    import numpy as np
    import tifffile

    from gbm_assets.imaging.synthetic import CULTURE_MIXTURES, synthesize_image

    rng = np.random.default_rng(11)
    export, truth = tmp_path / "export", {}
    export.mkdir()
    for k, well in enumerate(["B2", "B3"]):
        field = synthesize_image(rng, next(iter(CULTURE_MIXTURES.values())), 40, size=768)
        image = field.image[:520, :704]
        lo, hi = np.percentile(image, [0.1, 99.9])
        grey = np.clip((image - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
        name = f"LC_Phase_{well}_1_00d0{k}h00m.tif"
        tifffile.imwrite(export / name, grey, compression="lzw", tile=(256, 256))
        inside = field.cells[(field.cells["x"] < 704) & (field.cells["y"] < 520)]
        truth[name] = len(inside)
    (tmp_path / "map.csv").write_text("well,culture,replicate\nB2,GBM01,1\nB3,GBM01,2\n")
    make_plate(export, tmp_path / "data" / "raw", "livecell", plate_map=tmp_path / "map.csv")
    coords, crops = _ingest(tmp_path / "data", "livecell")
    found = coords.groupby("image").size()
    for name, n in truth.items():
        assert abs(found[name] - n) <= max(4, 0.25 * n), (name, found[name], n)
    table = crops.to_pandas()
    by_well = table.groupby("well")[["position", "replicate"]].agg(lambda v: sorted(set(v)))
    assert by_well.to_dict("index") == {
        "B2": {"position": ["1"], "replicate": [1]},
        "B3": {"position": ["1"], "replicate": [2]},
    }


def test_segment_writes_each_images_recorded_pixel_size(tmp_path, capsys):
    """An OME-TIFF with PhysicalSizeX gives its cells pixel_size_um (in µm whatever the unit), an
    image that records none NaN, and the command says areas are in px² (they were unitless)."""
    import tifffile

    src = case("01-lzw-tiff") / "raw" / "t98g-lzw" / "t07_lzw.tif"
    pixels = tifffile.imread(src)
    ome = tmp_path / "t07.ome.tif"
    tifffile.imwrite(
        ome,
        pixels,
        ome=True,
        metadata={
            "axes": "YX",
            "PhysicalSizeX": 871.0,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 871.0,
            "PhysicalSizeYUnit": "nm",
        },
    )
    plain = tmp_path / "t07.tif"
    tifffile.imwrite(plain, pixels)
    cells = _segment(tmp_path, ome, plain)
    sizes = cells.groupby("image")["pixel_size_um"].agg(lambda s: s.iloc[0])
    assert sizes[str(ome)] == pytest.approx(0.871)
    assert pd.isna(sizes[str(plain)])
    out = capsys.readouterr().out
    assert "0.871 µm (OME PhysicalSizeX)" in out and "not recorded in 1 image(s)" in out and "px²" in out


def test_segment_on_a_folder_of_sub_folders_says_they_are_not_searched(tmp_path, capsys):
    (tmp_path / "plates" / "a").mkdir(parents=True)
    (tmp_path / "plates" / "a" / "t07.tif").write_bytes(b"")
    assert main(["segment", str(tmp_path / "plates"), "--out", str(tmp_path / "o.csv")]) == 1
    err = capsys.readouterr().err
    assert "folder holds no image" in err and "sub-folders are not searched" in err and "**/*.tif" in err
    assert "no such image" not in err
