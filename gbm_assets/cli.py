"""The `gbm-assets` command: synthesize plates, find cells in any images, run the main job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gbm_assets import interrupts, paths


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
            difficulty=args.difficulty,
            progress=lambda done, tot: bar.update(done - bar.n),
        )
    print(f"wrote {len(plates)} plates under {out}")
    return 0


def expand_image_args(args: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns, in the order given; duplicates once.

    Raises ImageReadError naming an argument that matches no image.
    """
    import glob

    from gbm_assets.errors import ImageReadError
    from gbm_assets.imaging.io import IMAGE_SUFFIXES, image_files

    found: dict[Path, None] = {}
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            matches = image_files(path)
        elif path.exists():
            matches = [path]
        else:
            matches = sorted(
                Path(p) for p in glob.glob(arg, recursive=True) if Path(p).suffix.lower() in IMAGE_SUFFIXES
            )
        if not matches and path.is_dir():
            subfolders = any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir())
            raise ImageReadError(
                arg,
                "folder holds no image"
                + (
                    f" (its sub-folders are not searched: give a pattern such as '{path}/**/*.tif')"
                    if subfolders
                    else ""
                ),
            )
        if not matches:
            raise ImageReadError(arg, "no such image, folder or matching pattern")
        found.update(dict.fromkeys(p.absolute() for p in matches))
    return list(found)


def mask_names(images: list[Path]) -> dict[Path, Path]:
    """Label-mask file per image, relative to the masks folder: the image's path below the images'
    common folder, so that x.tif in two folders never share one mask file."""
    common = Path(os.path.commonpath([str(p.parent) for p in images]))
    return {p: p.relative_to(common).with_name(p.stem + "_labels.png") for p in images}


def pixel_size_note(sizes: dict) -> str:
    """One line on the images' recorded pixel sizes ({path: PixelSize or None}) and the area unit."""
    known = {round(s.um, 6): s.source for s in sizes.values() if s is not None}
    missing = sum(s is None for s in sizes.values())
    if not known:
        return "pixel size: not recorded in any image; measurements in pixels (column pixel_size_um NaN)"
    found = ", ".join(f"{um:g} µm ({source})" for um, source in sorted(known.items()))
    return (
        f"pixel size: {found}"
        + (f"; not recorded in {missing} image(s) (NaN)" if missing else "")
        + "; measurements in pixels (area in px²: multiply by pixel_size_um squared for µm²)"
    )


def cmd_segment(args: argparse.Namespace) -> int:
    from gbm_assets.analysis.safe_csv import to_csv_safe
    from gbm_assets.imaging.pixel_size import PIXEL_SIZE_COLUMN, recorded_pixel_size
    from gbm_assets.imaging.plate_cells import decode_labels, default_workers, png_labels
    from gbm_assets.imaging.plate_coordinates import coordinates_summary, plate_coordinates
    from gbm_assets.imaging.segmentation import SegmentationParams
    from gbm_assets.storage import atomic_path, write_bytes_atomic

    images = expand_image_args(args.images)
    masks_dir = Path(args.masks) if args.masks else None
    names = mask_names(images)
    given = (
        SegmentationParams() if args.cell_diameter is None else SegmentationParams(cell_diameter_px=args.cell_diameter)
    )
    with _bar(len(images), "finding cells") as bar:
        # plate_coordinates works on names relative to a folder; "/" makes absolute paths work.
        plate = plate_coordinates(
            "",
            Path("/"),
            [str(p) for p in images],
            given,
            estimate_size=args.cell_diameter is None,
            workers=args.workers or default_workers(),
            progress=lambda d, t: bar.update(d - bar.n),
        )
    if masks_dir:
        for row in plate.masks.select(["image", "height", "width", "labels_zstd"]).to_pylist():
            labels = decode_labels(row["labels_zstd"], (row["height"], row["width"]), row["image"])
            write_bytes_atomic(masks_dir / names[Path(row["image"])], png_labels(labels))  # 16-bit PNG, every candidate
    table = plate.coordinates.drop(columns=["plate"])
    # Each image's recorded pixel size (µm per pixel, NaN when its header records none), so that a
    # reader can convert the pixel measurements; the areas stay in px², as CellProfiler writes them.
    sizes = {p: recorded_pixel_size(p) for p in images}
    table[PIXEL_SIZE_COLUMN] = table["image"].map({str(p): s.um if s else float("nan") for p, s in sizes.items()})
    with atomic_path(args.out) as tmp:
        to_csv_safe(table, tmp, index=False)  # image names are data: never a spreadsheet formula
    if plate.size is not None:
        print(plate.size.note())
    print(pixel_size_note(sizes))
    counts = coordinates_summary(plate)["qc_counts"]
    others = ", ".join(f"{n} {label}" for label, n in counts.items() if label != "cell" and n)
    print(
        f"{counts['cell']} cells in {len(images)} images"
        + (f" (also labelled: {others})" if others else "")
        + f" -> {args.out}"
    )
    return 0


def cmd_add_plate(args: argparse.Namespace) -> int:
    from gbm_assets.imaging.plate_import import make_plate
    from gbm_assets.imaging.plates import validate_plate

    raw = Path(args.raw or paths.raw_dir())
    plate = make_plate(
        args.source,
        raw,
        args.plate_id,
        args.culture,
        args.concentration,
        args.replicate,
        args.timepoint_pattern,
        link=not args.copy,
        plate_map=args.plate_map,
        include=args.include,
        frame_interval_h=args.frame_interval_h,
    )
    summary = validate_plate(plate, check_pixels=False)
    if summary.n_images > 1 and summary.manifest["timepoint_h"].nunique() == 1 and not args.timepoint_pattern:
        print(
            f"note: no time in the file names, so all {summary.n_images} images are at "
            f"{summary.manifest['timepoint_h'].iloc[0]:g} h; if they are a time series, re-add the plate with "
            r"--timepoint-pattern (e.g. 't(\d+)')",
            file=sys.stderr,
        )
    _note_guessed_frame_times(Path(args.source), summary.manifest, args.frame_interval_h)
    if not (Path(args.source) / "manifest.csv").is_file():
        _note_nested_inputs(Path(args.source), args.include, args.plate_map, raw)
    wells = summary.manifest["well"].nunique() if (summary.manifest["well"] != "na").any() else 0
    print(
        f"plate {summary.plate_id}: {summary.n_images} images of {summary.width}x{summary.height}, "
        f"{summary.bits}-bit, {len(summary.cultures)} culture(s)"
        + (f", {wells} wells" if wells else "")
        + f" -> {plate}"
    )
    return 0


def _note_nested_inputs(source: Path, include: str | None, plate_map: str | None, raw: Path) -> None:
    """Say so on stderr, naming them, when sub-folders of the source hold images or tables that are not
    part of the plate (add-plate reads one folder)."""
    from gbm_assets.imaging.plate_import import nested_inputs

    found = nested_inputs(source, include, plate_map, raw)
    if found:
        folders = sorted({str(p.parent.relative_to(source)) for p in found})
        print(
            f"note: {len(found)} image(s) or table(s) in sub-folders of {source} are not part of the plate "
            f"(add-plate reads one folder): {', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''} "
            f"(e.g. {found[0]}); if they belong to it, add each folder as its own plate or move the files up",
            file=sys.stderr,
        )


def _note_guessed_frame_times(source: Path, manifest, interval_h: float | None) -> None:
    """Say so on stderr when a stack's frames were put 1 h apart because the file records no time."""
    from gbm_assets.imaging.io import frame_interval_h, frame_times_h

    if interval_h is not None or "frame" not in manifest or "source" not in manifest:
        return
    untimed = []
    for name in manifest.loc[manifest["frame"].astype(str) != "", "source"].unique():
        path = source if source.is_file() else source / str(name)
        if frame_times_h(path) is None and frame_interval_h(path) is None:
            untimed.append(path)
    if untimed:
        which = (
            f"{untimed[0]} records no time between its frames"
            if len(untimed) == 1
            else f"{len(untimed)} stacks ({untimed[0]}, ...) record no time between their frames"
        )
        print(
            f"note: {which}, so they are 1 h apart; if they are not, re-add the plate with --frame-interval-h",
            file=sys.stderr,
        )


def _dagster_home() -> Path:
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(paths.project_root() / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    return home


def _user_entries(raw: Path) -> list[str]:
    """What a raw folder holds besides hidden files and (half-written) demo plates."""
    from gbm_assets.imaging.synthetic import PARAMS_NAME

    if not raw.is_dir():
        return []
    return sorted(
        p.name
        for p in raw.iterdir()
        if not p.name.startswith(".") and not (p / PARAMS_NAME).is_file() and not (p.is_dir() and not any(p.iterdir()))
    )


def cmd_run(args: argparse.Namespace) -> int:
    from gbm_assets.imaging.plates import find_ready_plates, unusable_plate_folders
    from gbm_assets.pipeline import check_variants, load_run_config, run_main_job

    if args.data:
        os.environ["GBM_ASSETS_DATA"] = str(Path(args.data).resolve())
    # Checked before anything runs: a misspelt variant or config key costs nothing.
    variants = check_variants([v.strip() for v in args.variants.split(",") if v.strip()]) if args.variants else None
    run_config = load_run_config(args.config) if args.config else None
    _dagster_home()
    raw = paths.raw_dir()
    for problem in unusable_plate_folders(raw):
        print(f"skipped: {problem}", file=sys.stderr)
    from gbm_assets.imaging.synthetic import regenerate_plates, stale_plates

    stale = stale_plates(raw)  # demo plates of an older generator: rewritten, then ingested again
    if stale:
        print(f"{len(stale)} synthetic plates were written by an older generator: regenerating them")
        regenerate_plates(stale)
    if args.no_synth and not find_ready_plates(raw):
        print(
            f"no usable plates under {raw} (a plate is a folder with images and manifest.csv, named by a safe id)",
            file=sys.stderr,
        )
        return 1
    if not find_ready_plates(raw):
        held = _user_entries(raw)
        if held:  # never write demo plates among a user's own files
            print(
                f"{raw} holds {len(held)} entries ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) but no "
                "ready plate; not synthesizing demo plates there (use --data with an empty folder for the demo)",
                file=sys.stderr,
            )
            return 1
        print(f"no plates under {raw}: synthesizing the demo data set")
        cmd_synth(build_parser().parse_args(["synth", "--out", str(raw)]))
        real = paths.project_root().parent / "shared" / "data" / "t98g" / "images"
        if real.is_dir():  # the real T98G frames join the demo as one more plate (linked, not copied)
            cmd_add_plate(
                build_parser().parse_args(
                    [
                        "add-plate",
                        str(real),
                        "--plate-id",
                        "t98g",
                        "--culture",
                        "T98G",
                        "--raw",
                        str(raw),
                        "--timepoint-pattern",
                        r"t(\d+)\.tif",
                    ]
                )
            )
    return run_main_job(bar=_bar, refresh=args.refresh or bool(stale), variants=variants, run_config=run_config)


def cmd_remove_plate(args: argparse.Namespace) -> int:
    from gbm_assets.assets.resources import DataDirs
    from gbm_assets.pipeline import remove_plate

    if args.data:
        os.environ["GBM_ASSETS_DATA"] = str(Path(args.data).resolve())
    _dagster_home()
    import dagster as dg

    data = DataDirs()
    removed, known = remove_plate(args.plate_id, dg.DagsterInstance.get(), data, raw=args.delete_raw)
    kept = data.plate_dir(args.plate_id)
    print(
        f"plate {args.plate_id}: removed {len(removed)} output(s)"
        + (" and its Dagster partition" if known else "")
        + (f"; its folder {kept} is kept (delete it too, or pass --delete-raw)" if kept.exists() else "")
        + "; the next `gbm-assets run` rebuilds the variants without it"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gbm-assets", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    # --debug is accepted after the command too; SUPPRESS keeps a subcommand from resetting it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    s = sub.add_parser(
        "synth", parents=[common], help="write synthetic phase-contrast plates (the embedded demo data set)"
    )
    s.add_argument("--out", help="folder to write plates into (default: data/raw)")
    s.add_argument("--cultures", type=int, default=10)
    s.add_argument("--concentrations", type=int, default=5)
    s.add_argument("--replicates", type=int, default=1)
    s.add_argument("--images-per-plate", type=int, default=2)
    s.add_argument("--size", type=int, default=1024, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--difficulty",
        choices=("easy", "hard"),
        default="hard",
        help="hard (default): per-plate exposure, illumination and focus, neighbours, shape-only "
        "morphotypes; easy: generator version 1",
    )
    s.set_defaults(func=cmd_synth)

    g = sub.add_parser(
        "segment", parents=[common], help="find cells in images and write their coordinates and measurements"
    )
    g.add_argument("images", nargs="+", help="images, folders of images or glob patterns ('plates/*/*.tif')")
    g.add_argument("--out", required=True, help="CSV to write (one row per cell)")
    g.add_argument("--masks", help="folder for 16-bit label-mask PNGs")
    g.add_argument(
        "--cell-diameter",
        type=float,
        default=None,
        help="the cells' typical diameter in pixels (default: estimated from the images)",
    )
    g.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    g.set_defaults(func=cmd_segment)

    a = sub.add_parser(
        "add-plate",
        parents=[common],
        help="make a plate from a folder of images, an instrument export or a stack (checked first, "
        "then put in place in one step)",
    )
    a.add_argument(
        "source", help="folder of images (TIFF, PNG, JPEG, BMP; ND2/CZI/LIF with the formats extra), or one stack"
    )
    a.add_argument("--plate-id", help="plate id (default: derived from the folder name)")
    a.add_argument("--culture", help="culture of every image (or a culture column in --plate-map)")
    a.add_argument("--concentration", default="na")
    a.add_argument("--replicate", type=int, default=1)
    a.add_argument("--plate-map", help="CSV with a well column and any of culture, concentration, replicate")
    a.add_argument(
        "--timepoint-pattern",
        help=r"regex with one group, the time point in hours in each file name, e.g. 't(\d+)' "
        "(instrument stamps like 02d04h30m are read without one)",
    )
    a.add_argument("--include", help="only files matching this glob, e.g. 'GBM03_Phase_*'")
    a.add_argument(
        "--frame-interval-h",
        type=float,
        help="hours between the frames of a stack (default: what the file records, else 1)",
    )
    a.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    a.add_argument("--raw", help="raw plates folder (default: data/raw)")
    a.set_defaults(func=cmd_add_plate)

    r = sub.add_parser(
        "run", parents=[common], help="the main job: ingest every plate under data/raw, then every later stage"
    )
    r.add_argument("--data", help="data folder (default: data/ or GBM_ASSETS_DATA)")
    r.add_argument("--no-synth", action="store_true", help="do not synthesize plates when data/raw is empty")
    r.add_argument("--refresh", action="store_true", help="re-materialize plates that are already done")
    r.add_argument(
        "--variants",
        help="comma-separated model variants to train and cluster, e.g. autoencoder,siamese_b (default: all)",
    )
    r.add_argument(
        "--config",
        help="run config file (YAML or JSON) in Dagster's shape, as in the launchpad: "
        "ops: {trained_encoders: {config: {epochs: 1}}}; each stage's run takes its assets' part",
    )
    r.set_defaults(func=cmd_run)

    d = sub.add_parser(
        "remove-plate",
        parents=[common],
        help="take a plate out of the analysis: its outputs and Dagster partition (its raw folder only with "
        "--delete-raw); the next run rebuilds the variants without it",
    )
    d.add_argument("plate_id", help="the plate id (its folder name under data/raw)")
    d.add_argument("--data", help="data folder (default: data/ or GBM_ASSETS_DATA)")
    d.add_argument(
        "--delete-raw", action="store_true", help="also delete the plate's folder under raw/ (the images or links)"
    )
    d.set_defaults(func=cmd_remove_plate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error is one line on stderr and exit status 1 (--debug: traceback)."""
    args = build_parser().parse_args(argv)
    interrupts.install()  # SIGTERM (timeout, docker stop, a scheduler) stops like Ctrl-C
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("gbm-assets: interrupted; what finished is kept, the rest is left as it was", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # InputError is a ValueError: bad input, missing file, refused format
        if args.debug:
            raise
        print(f"gbm-assets: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
