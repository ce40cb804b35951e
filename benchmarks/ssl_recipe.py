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
cell with its neighbours) spherized and scaled by W (keys ending in _context); --save writes the embeddings
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
    from gbm_assets.analysis.clustering import ClusteringConfig, fit_clusters, fit_feature_transform
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

    def scored(features: np.ndarray, clustered: np.ndarray, clustering: ClusteringConfig = clustering) -> dict:
        """Plate-held-out kappas of features; ARI and composition error of the production clustering of clustered."""
        scores = score_features(rows, {"x": features}, seed=0, splits=("plate",))
        line = {
            f"{s.target}_kappa_plate_{s.classifier}": round(float(s.kappa), 3)
            for s in scores.itertuples()
            if s.target in ("culture", "morphotype")
        }
        _, labels = fit_clusters(clustered, clustering)
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
    per_seed: dict = {}
    for seed in args.seeds:
        for name in args.variants:
            started = time.perf_counter()
            variant = parse_variant(name)
            config = TrainConfig(epochs=args.epochs, max_steps_per_epoch=12, seed=seed)
            result = train_encoder(variant, crops, config)
            cell = variant.input_mask == "cell"
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
                invariant = np.concatenate(
                    [
                        embed_batch(result.encoder, pixels[i : i + 256], True, keep[i : i + 256] if cell else None)
                        for i in range(0, len(pixels), 256)
                    ]
                )
                line.update({f"{k}_invariant": v for k, v in scored(invariant, invariant).items()})
                if args.save:
                    np.save(args.save / f"{variant.name}_seed{seed}_invariant.npy", invariant)
            if (variant.cluster_vector, variant.cluster_preprocess) != ("embedding", "none"):
                # the clusters asset's own settings for this row (Variant.cluster_vector / cluster_preprocess)
                own = replace(clustering, preprocess=args.preprocess or variant.cluster_preprocess)
                x = embedding
                if variant.cluster_vector == "embedding_invariant":
                    x = np.concatenate(
                        [
                            embed_batch(result.encoder, pixels[i : i + 256], True, keep[i : i + 256] if cell else None)
                            for i in range(0, len(pixels), 256)
                        ]
                    )
                line.update(
                    {f"{k}_shipped": v for k, v in scored(x, x, own).items() if not k.startswith(("culture", "morph"))}
                )
                if args.context is not None and cell:
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
            line.update(
                loss=round(result.history[-1]["loss"], 2),
                steps=sum(h.get("steps", 0) for h in result.history),
                seconds=round(time.perf_counter() - started, 1),
            )
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
