"""Benchmark: does an SSL recipe row gain over its base row? Fixed step budget, several training seeds.

    nice -n 5 .venv/bin/python benchmarks/features.py --variants siamese_d --keep /tmp/work
    nice -n 5 .venv/bin/python benchmarks/ssl_recipe.py /tmp/work [--epochs 6] [--seeds 0 1]
        [--variants siamese_b siamese_b_projector siamese_b_recipe siamese_h siamese_h_mean]

Reads the crops and ground truth that a kept benchmarks/features.py run left (DIR/data/
cell_crops.parquet, DIR/data/raw), so every row trains on the same cells. For each seed and
variant: models.training.train_encoder at a fixed number of steps (epochs x at most 12 batches of
128, no time limit, so the budget does not depend on the machine's load), the plain embedding of
every crop, analysis.variant_evaluation.score_features held out by plate (culture and true
morphotype kappa, random forest and linear probe, 5 group folds), the production clustering
(analysis.clustering.fit_clusters, shipped ClusteringConfig) scored against the true morphotype
(GMM and HDBSCAN ARI) and the HDBSCAN composition error. Prints one JSON object: per variant and
seed those numbers with the final loss, steps and seconds, and per variant their mean and sd over
the seeds. The features benchmark scores one trained encoder per variant; differences between
rows are of the size of the seed-to-seed spread, which this one measures.
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
        default=["siamese_b", "siamese_b_projector", "siamese_b_recipe", "siamese_h", "siamese_h_mean"],
    )
    args = parser.parse_args()

    import numpy as np
    import pandas as pd

    from gbm_assets.models.training import TrainConfig, embed_batch, limit_cpu_threads, train_encoder

    limit_cpu_threads()
    from gbm_assets.analysis.clustering import ClusteringConfig, fit_clusters
    from gbm_assets.analysis.composition import composition_error
    from gbm_assets.analysis.truth import true_morphotypes
    from gbm_assets.analysis.variant_evaluation import score_features
    from gbm_assets.analysis.variant_report import labeling_metrics
    from gbm_assets.imaging.crop_dataset import iter_crop_batches
    from gbm_assets.models.variants import get_variant
    from gbm_assets.schema import PROVENANCE_COLUMNS

    crops, raw = args.work / "data" / "cell_crops.parquet", args.work / "data" / "raw"
    columns = list(dict.fromkeys([*PROVENANCE_COLUMNS, "culture", "concentration"]))
    batches = list(iter_crop_batches(crops, 512, columns=columns))
    rows = pd.concat([r for r, _ in batches], ignore_index=True)
    pixels = np.concatenate([p for _, p in batches])
    rows["morphotype"] = true_morphotypes(rows, raw)
    known = rows["morphotype"].notna().to_numpy()
    per_seed: dict = {}
    for seed in args.seeds:
        for name in args.variants:
            started = time.perf_counter()
            config = TrainConfig(epochs=args.epochs, max_steps_per_epoch=12, seed=seed)
            result = train_encoder(get_variant(name), crops, config)
            embedding = np.concatenate(
                [embed_batch(result.encoder, pixels[i : i + 256]) for i in range(0, len(pixels), 256)]
            )
            scores = score_features(rows, {"embedding": embedding}, seed=0, splits=("plate",))
            line = {
                f"{s.target}_kappa_plate_{s.classifier}": round(float(s.kappa), 3)
                for s in scores.itertuples()
                if s.target in ("culture", "morphotype")
            }
            _, labels = fit_clusters(embedding, ClusteringConfig(seed=0))
            metrics = labeling_metrics(labels, rows["morphotype"], 0)
            error = composition_error(
                labels["hdbscan"].to_numpy()[known],
                rows["morphotype"][known].astype(str).to_numpy(),
                rows["culture"].astype(str).to_numpy()[known],
            )
            line.update(
                ari_gmm=round(metrics["gmm"]["ari"], 3),
                ari_hdbscan=round(metrics["hdbscan"]["ari"], 3),
                composition_error=round(float(error["mae"]), 4),
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
    report = {"epochs": args.epochs, "max_steps_per_epoch": 12, "seeds": args.seeds, "n_crops": len(rows)}
    print(json.dumps({**report, "n_with_truth": int(known.sum()), "per_seed": per_seed, "mean_sd": summary}, indent=1))


if __name__ == "__main__":
    main()
