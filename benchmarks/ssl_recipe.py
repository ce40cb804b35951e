"""Benchmark: does an SSL recipe row gain over its base row? Fixed step budget, several training seeds.

    nice -n 5 .venv/bin/python benchmarks/features.py --variants siamese_d --keep /tmp/work
    nice -n 5 .venv/bin/python benchmarks/ssl_recipe.py /tmp/work [--epochs 6] [--seeds 0 1]
        [--variants siamese_b siamese_b_projector siamese_b_recipe siamese_h siamese_h_mean siamese_b_cell]
        [--variants siamese_b 'siamese_b:input_mask=cell,both_views=true'] [--baselines]

Reads the crops and ground truth that a kept benchmarks/features.py run left (DIR/data/
cell_crops.parquet, DIR/data/raw), so every row trains on the same cells. For each seed and
variant: models.training.train_encoder at a fixed number of steps (epochs x at most 12 batches of
128, no time limit, so the budget does not depend on the machine's load), the plain embedding of
every crop (the cell alone for input_mask="cell", as the embeddings asset does),
analysis.variant_evaluation.score_features held out by plate (culture and true
morphotype kappa, random forest and linear probe, 5 group folds), the production clustering
(analysis.clustering.fit_clusters, shipped ClusteringConfig, or its preprocessing as --preprocess
and --pca-components set it) scored against the true morphotype
(GMM and HDBSCAN ARI) and the HDBSCAN composition error. Prints one JSON object: per variant and
seed those numbers with the final loss, steps and seconds, and per variant their mean and sd over
the seeds. A variant is a row of models.variants or a row with fields changed, NAME:FIELD=VALUE,...
(a trial recipe that has no row yet). --baselines scores raw pixels and hand-crafted features
(analysis.variant_evaluation.baseline_features_for; hand-crafted features, of mixed units,
clustered z-scored, raw pixels as they are) the same way, once; --invariant scores the
rotation/flip-invariant embedding too (keys ending in _invariant); a row whose clusters asset
clusters another vector or preprocessing (Variant.cluster_vector, cluster_preprocess) is scored
that way too (keys ending in _shipped: ARI of GMM, HDBSCAN and automatic-k GMM, HDBSCAN and GMM
composition error); --context W scores, for such a row that sees the cell alone, its shipped vector
spherized and concatenated with the same encoder's invariant embedding of the whole crop (the
cell with its neighbours) spherized and scaled by W (keys ending in _context); --neighbors W [W ...]
scores such a row's shipped clustering with the cells' neighbour contact appended at each weight
(ClusteringConfig.neighbor_weight; keys ending in _neighbors<W>; the crops must carry CellProfiler's
neighbour measurements, or --coordinates names a data folder whose cell_coordinates and cell_masks
they are measured from); --embeddings DIR clusters embeddings saved by --save there instead of
training (seed s of the variant: <variant>_seed<s>[_invariant].npy); --save writes the embeddings
(.npy) for offline clustering. The features benchmark scores one trained encoder per variant;
differences between rows are of the size of the seed-to-seed spread, which this one measures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="a folder kept by benchmarks/features.py --keep")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of at most 12 steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[
            "siamese_b",
            "siamese_b_projector",
            "siamese_b_recipe",
            "siamese_h",
            "siamese_h_mean",
            "siamese_b_cell",
        ],
    )
    parser.add_argument("--baselines", action="store_true", help="score raw pixels and hand-crafted features too")
    parser.add_argument("--invariant", action="store_true", help="score the rotation/flip-invariant embedding too")
    parser.add_argument(
        "--save", type=Path, help="save each embedding here as <variant>_seed<seed>.npy (and _invariant.npy)"
    )
    parser.add_argument(
        "--preprocess",
        choices=("none", "standardize", "pca_whiten"),
        help="ClusteringConfig.preprocess (default: the shipped ClusteringConfig's)",
    )
    parser.add_argument("--pca-components", type=int, help="ClusteringConfig.pca_components (default: shipped)")
    parser.add_argument(
        "--context",
        type=float,
        metavar="W",
        help="also score a cell-alone row's shipped vector with its whole-crop embedding at weight W beside it",
    )
    parser.add_argument(
        "--neighbors",
        type=float,
        nargs="+",
        metavar="W",
        help="also score a row's shipped clustering with the neighbour contact appended at weight W",
    )
    parser.add_argument(
        "--coordinates",
        type=Path,
        help="data folder with cell_coordinates.parquet and cell_masks to measure neighbours from "
        "(for crops made before they were carried)",
    )
    parser.add_argument("--embeddings", type=Path, help="cluster the embeddings --save wrote here; no training")
    args = parser.parse_args()

    from dataclasses import replace

    import numpy as np
    import pandas as pd

    from gbm_assets.models.training import (
        TrainConfig,
        embed_batch,
        iter_encoder_inputs,
        limit_cpu_threads,
        train_encoder,
    )

    limit_cpu_threads()
    from gbm_assets.analysis.clustering import (
        CONTEXT_COLUMNS,
        ClusteringConfig,
        fit_clusters,
        fit_feature_transform,
        neighbor_contact,
    )
    from gbm_assets.analysis.composition import composition_error
    from gbm_assets.analysis.truth import true_morphotypes
    from gbm_assets.analysis.variant_evaluation import baseline_features_for, score_features
    from gbm_assets.analysis.variant_report import labeling_metrics
    from gbm_assets.schema import PROVENANCE_COLUMNS

    overrides = {"preprocess": args.preprocess, "pca_components": args.pca_components}
    clustering = ClusteringConfig(seed=0, **{k: v for k, v in overrides.items() if v is not None})
    crops, raw = args.work / "data" / "cell_crops.parquet", args.work / "data" / "raw"
    columns = list(dict.fromkeys([*PROVENANCE_COLUMNS, "culture", "concentration"]))
    batches = list(iter_encoder_inputs(crops, 512, "cell", columns=columns))
    rows = pd.concat([r for r, _, _ in batches], ignore_index=True)
    pixels = np.concatenate([p for _, p, _ in batches])
    keep = np.concatenate([k for _, _, k in batches])  # dilated cell masks, as training dilates them
    del batches
    rows["morphotype"] = true_morphotypes(rows, raw)
    known = rows["morphotype"].notna().to_numpy()

    contact = None
    if args.neighbors:
        rows = rows.drop(columns=[c for c in CONTEXT_COLUMNS if c in rows])
        if args.coordinates:
            measured = measured_neighbors(args.coordinates, rows)
            rows = rows.merge(measured, on="crop_id", how="left", validate="one_to_one")
            contact = neighbor_contact(rows)
        else:  # what the clusters asset reads
            from gbm_assets.analysis.cell_labels import crop_contact

            contact = crop_contact(crops).reindex(rows["crop_id"]).to_numpy()
            if np.isnan(contact).any():
                raise SystemExit(f"{int(np.isnan(contact).sum())} embedded crops have no neighbour contact in {crops}")
        by_type = rows.assign(contact=contact).groupby("morphotype")["contact"]
        print(
            "neighbour contact > 0 by type:",
            by_type.apply(lambda c: round(float((c > 0).mean()), 3)).to_dict(),
            file=sys.stderr,
        )

    def scored(
        features: np.ndarray, clustered: np.ndarray, clustering: ClusteringConfig = clustering, kappas: bool = True
    ) -> dict:
        """Plate-held-out kappas of features; ARI and composition error of the production clustering of clustered."""
        line = {}
        if kappas:
            scores = score_features(rows, {"x": features}, seed=0, splits=("plate",))
            line = {
                f"{s.target}_kappa_plate_{s.classifier}": round(float(s.kappa), 3)
                for s in scores.itertuples()
                if s.target in ("culture", "morphotype")
            }
        _, labels = fit_clusters(clustered, clustering, context=contact if clustering.neighbor_weight > 0 else None)
        metrics = labeling_metrics(labels, rows["morphotype"], 0)
        error = {
            method: composition_error(
                labels[method].to_numpy()[known],
                rows["morphotype"][known].astype(str).to_numpy(),
                rows["culture"].astype(str).to_numpy()[known],
            )["mae"]
            for method in ("hdbscan", "gmm", "auto")
        }
        return {
            **line,
            "n_hdbscan": int(labels["hdbscan"].max() + 1),
            "ari_gmm": round(metrics["gmm"]["ari"], 3),
            "ari_hdbscan": round(metrics["hdbscan"]["ari"], 3),
            "ari_auto": round(metrics["auto"]["ari"], 3),
            "composition_error": round(float(error["hdbscan"]), 4),
            "composition_error_gmm": round(float(error["gmm"]), 4),
            "composition_error_auto": round(float(error["auto"]), 4),
        }

    baselines = {}
    if args.baselines:
        for name, x in baseline_features_for(crops, rows["crop_id"]).items():
            if name == "handcrafted":  # mixed units (pixels, pixel areas, ratios): z-scored, as pycytominer does
                clustered = fit_feature_transform(x, "standardize").apply(x)
            else:  # raw pixels share one unit, as an embedding's features do: clustered as they are
                clustered = x
            baselines[name] = scored(x, clustered)
            print(name, json.dumps(baselines[name]), file=sys.stderr, flush=True)

    def invariant_of(result, name: str, seed: int, cell: bool) -> np.ndarray:
        """The rotation/flip-invariant embedding of the cells (the saved one with --embeddings)."""
        if result is None:
            return np.load(args.embeddings / f"{name}_seed{seed}_invariant.npy")
        return np.concatenate(
            [
                embed_batch(result.encoder, pixels[i : i + 256], True, keep[i : i + 256] if cell else None)
                for i in range(0, len(pixels), 256)
            ]
        )

    per_seed: dict = {}
    for seed in args.seeds:
        for name in args.variants:
            started = time.perf_counter()
            variant = parse_variant(name)
            cell = variant.input_mask == "cell"
            if args.embeddings:  # saved by an earlier --save: no training
                result = None
                saved = args.embeddings / f"{variant.name}_seed{seed}"
                embedding = np.load(f"{saved}.npy")
                if len(embedding) != len(rows):
                    sys.exit(f"{saved}.npy: {len(embedding)} rows, the crops {len(rows)}: saved from other crops")
            else:
                config = TrainConfig(epochs=args.epochs, max_steps_per_epoch=12, seed=seed)
                result = train_encoder(variant, crops, config)
                embedding = np.concatenate(
                    [
                        embed_batch(result.encoder, pixels[i : i + 256], keep=keep[i : i + 256] if cell else None)
                        for i in range(0, len(pixels), 256)
                    ]
                )
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                np.save(args.save / f"{variant.name}_seed{seed}.npy", embedding)

            line = scored(embedding, embedding)
            if args.invariant:  # the clusters asset's vector="embedding_invariant"
                invariant = invariant_of(result, variant.name, seed, cell)
                line.update({f"{k}_invariant": v for k, v in scored(invariant, invariant).items()})
                if args.save:
                    np.save(args.save / f"{variant.name}_seed{seed}_invariant.npy", invariant)
            if (variant.cluster_vector, variant.cluster_preprocess) != ("embedding", "none"):
                # the clusters asset's own settings for this row (Variant.cluster_vector / cluster_preprocess)
                own = replace(clustering, preprocess=args.preprocess or variant.cluster_preprocess)
                x = embedding
                if variant.cluster_vector == "embedding_invariant":
                    x = invariant_of(result, variant.name, seed, cell)
                    if args.save:
                        np.save(args.save / f"{variant.name}_seed{seed}_invariant.npy", x)
                line.update({f"{k}_shipped": v for k, v in scored(x, x, own, kappas=False).items()})
                for weight in args.neighbors or []:  # the cells' neighbour contact appended (neighbor_weight)
                    with_neighbors = replace(own, neighbor_weight=weight)
                    line.update(
                        {f"{k}_neighbors{weight:g}": v for k, v in scored(x, x, with_neighbors, kappas=False).items()}
                    )
                if args.context is not None and cell and result is not None:
                    # the same encoder on the whole crop (neighbours in view), invariant, beside the shipped vector
                    context = np.concatenate(
                        [embed_batch(result.encoder, pixels[i : i + 256], True) for i in range(0, len(pixels), 256)]
                    )
                    if args.save:
                        np.save(args.save / f"{variant.name}_seed{seed}_context.npy", context)
                    shipped = fit_feature_transform(x, own.preprocess)
                    joint = np.hstack(
                        [
                            x if shipped is None else shipped.apply(x),
                            args.context * fit_feature_transform(context, "spherize").apply(context),
                        ]
                    )
                    line.update(
                        {f"{k}_context": v for k, v in scored(joint, joint, replace(own, preprocess="none")).items()}
                    )
            if result is not None:
                line.update(
                    loss=round(result.history[-1]["loss"], 2), steps=sum(h.get("steps", 0) for h in result.history)
                )
            line.update(seconds=round(time.perf_counter() - started, 1))
            per_seed.setdefault(name, {})[seed] = line
            print(name, seed, json.dumps(line), file=sys.stderr, flush=True)
    summary = {
        name: {
            key: [
                round(float(np.mean([v[key] for v in lines.values()])), 3),
                round(float(np.std([v[key] for v in lines.values()])), 3),
            ]
            for key in next(iter(lines.values()))
        }
        for name, lines in per_seed.items()
    }
    report = {
        "epochs": args.epochs,
        "max_steps_per_epoch": 12,
        "seeds": args.seeds,
        "n_crops": len(rows),
        "clustering": {"preprocess": clustering.preprocess, "pca_components": clustering.pca_components},
    }
    out = {**report, "n_with_truth": int(known.sum()), "baselines": baselines, "per_seed": per_seed, "mean_sd": summary}
    print(json.dumps(out, indent=1))


def measured_neighbors(data: Path, rows):
    """CONTEXT_COLUMNS per crop_id of rows, measured (imaging.neighbors, as cell_coordinates does)
    from DATA/cell_coordinates.parquet and DATA/cell_masks, for crops made before they were carried."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from gbm_assets.imaging.neighbors import with_neighbors
    from gbm_assets.imaging.plate_cells import decode_labels
    from gbm_assets.schema import NEIGHBOR_COLUMNS, make_crop_id

    frames = []
    for plate in sorted(rows["plate"].unique()):
        coords = pd.read_parquet(data / "cell_coordinates.parquet" / f"plate={plate}" / "part-0.parquet")
        masks = pq.read_table(data / "cell_masks" / f"plate={plate}" / "part-0.parquet").to_pandas()
        for m in masks.itertuples():
            cells = coords[coords["image"] == m.image].drop(columns=list(NEIGHBOR_COLUMNS), errors="ignore")
            labels = decode_labels(m.labels_zstd, (m.height, m.width), m.image)
            frames.append(with_neighbors(cells, labels).assign(plate=plate))
    table = pd.concat(frames, ignore_index=True)
    table["crop_id"] = [
        make_crop_id(p, i, c) for p, i, c in zip(table["plate"], table["image"], table["cell_id"], strict=True)
    ]
    return table[["crop_id", *NEIGHBOR_COLUMNS, "cell_diameter_px"]].astype({"cell_diameter_px": np.float64})


def parse_variant(spec: str):
    """A variant of the table, or one with fields changed: "siamese_b:input_mask=cell,both_views=true".

    Values are read as JSON where they parse (numbers, true/false), else as strings. Raises
    KeyError for an unknown row, TypeError for an unknown field.
    """
    from dataclasses import replace

    from gbm_assets.models.variants import get_variant

    name, _, changes = spec.partition(":")
    fields = {}
    for item in filter(None, changes.split(",")):
        key, _, value = item.partition("=")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return replace(get_variant(name), name=spec.replace(":", "_").replace(",", "_").replace("=", "_"), **fields)


if __name__ == "__main__":
    main()
