"""The `gbm-assets` command: synthesize plates, find cells in any images, run the main job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gbm_assets import paths


def _bar(total: int, desc: str, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=None)


def cmd_synth(args: argparse.Namespace) -> int:
    from gbm_assets.imaging.synthetic import write_plates

    out = Path(args.out or paths.raw_dir())
    total = args.cultures * args.concentrations * args.replicates * args.images_per_plate
    with _bar(total, "synthesizing") as bar:
        plates = write_plates(
            out,
            n_cultures=args.cultures,
            n_concentrations=args.concentrations,
            n_replicates=args.replicates,
            images_per_plate=args.images_per_plate,
            size=args.size,
            seed=args.seed,
            progress=lambda done, tot: bar.update(done - bar.n),
        )
    print(f"wrote {len(plates)} plates under {out}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    import cv2
    import pandas as pd

    from gbm_assets.imaging.plate_cells import decode_labels, default_workers, find_plate_cells
    from gbm_assets.imaging.segmentation import SegmentationParams

    images = [Path(p).resolve() for p in args.images]
    params = SegmentationParams(cell_diameter_px=args.cell_diameter)
    masks_dir = Path(args.masks) if args.masks else None
    if masks_dir:
        masks_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    with _bar(len(images), "finding cells") as bar:
        # find_plate_cells works on names relative to a folder; "/" makes absolute paths work.
        for found in find_plate_cells(
            Path("/"), [str(p) for p in images], params,
            workers=args.workers or default_workers(), progress=lambda d, t: bar.update(d - bar.n),
        ):
            cells = found.cells.copy()
            cells.insert(0, "image", found.image)
            frames.append(cells)
            if masks_dir:
                cv2.imwrite(str(masks_dir / (Path(found.image).stem + "_labels.png")), decode_labels(found.labels_png).astype("uint16"))
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(args.out, index=False)
    print(f"{len(table)} cells in {len(images)} images -> {args.out}")
    return 0


def cmd_add_plate(args: argparse.Namespace) -> int:
    from gbm_assets.imaging.plates import make_plate, validate_plate

    raw = Path(args.raw or paths.raw_dir())
    plate = make_plate(args.source, raw, args.plate_id, args.culture, args.concentration, args.replicate,
                       args.timepoint_pattern, link=not args.copy)
    summary = validate_plate(plate)
    print(f"plate {summary.plate_id}: {summary.n_images} images of {summary.width}x{summary.height}, {summary.bits}-bit -> {plate}")
    return 0


def _dagster_home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(paths.project_root() / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    return home


def cmd_run(args: argparse.Namespace) -> int:
    from gbm_assets.imaging.plates import find_ready_plates
    from gbm_assets.pipeline import run_main_job

    if args.data:
        os.environ["GBM_ASSETS_DATA"] = str(Path(args.data).resolve())
    _dagster_home()
    raw = paths.raw_dir()
    if not args.no_synth and not find_ready_plates(raw):
        print(f"no plates under {raw}: synthesizing the demo data set")
        cmd_synth(build_parser().parse_args(["synth", "--out", str(raw)]))
        real = paths.project_root().parent / "shared" / "data" / "t98g" / "images"
        if real.is_dir():  # the real T98G frames join the demo as one more plate (linked, not copied)
            cmd_add_plate(build_parser().parse_args(
                ["add-plate", str(real), "--plate-id", "t98g", "--culture", "T98G", "--raw", str(raw),
                 "--timepoint-pattern", r"t(\d+)\.tif"]))
    return run_main_job(bar=_bar, refresh=args.refresh)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gbm-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write synthetic phase-contrast plates (the embedded demo data set)")
    s.add_argument("--out", help="folder to write plates into (default: data/raw)")
    s.add_argument("--cultures", type=int, default=10)
    s.add_argument("--concentrations", type=int, default=5)
    s.add_argument("--replicates", type=int, default=1)
    s.add_argument("--images-per-plate", type=int, default=2)
    s.add_argument("--size", type=int, default=1024, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    g = sub.add_parser("segment", help="find cells in images and write their coordinates and measurements")
    g.add_argument("images", nargs="+", help="TIFF or PNG images")
    g.add_argument("--out", required=True, help="CSV to write (one row per cell)")
    g.add_argument("--masks", help="folder for 16-bit label-mask PNGs")
    g.add_argument("--cell-diameter", type=float, default=40.0, help="expected cell diameter in pixels")
    g.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    g.set_defaults(func=cmd_segment)

    a = sub.add_parser("add-plate", help="make a plate from a folder of images (linked, manifest written last)")
    a.add_argument("source", help="folder of TIFF/PNG images")
    a.add_argument("--plate-id", required=True)
    a.add_argument("--culture", required=True)
    a.add_argument("--concentration", default="na")
    a.add_argument("--replicate", type=int, default=1)
    a.add_argument("--timepoint-pattern", help=r"regex whose first group in a file name is the time point, e.g. 't(\d+)'")
    a.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    a.add_argument("--raw", help="raw plates folder (default: data/raw)")
    a.set_defaults(func=cmd_add_plate)

    r = sub.add_parser("run", help="the main job: ingest every plate under data/raw, then every later stage")
    r.add_argument("--data", help="data folder (default: data/ or GBM_ASSETS_DATA)")
    r.add_argument("--no-synth", action="store_true", help="do not synthesize plates when data/raw is empty")
    r.add_argument("--refresh", action="store_true", help="re-materialize plates that are already done")
    r.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
