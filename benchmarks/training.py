"""Throughput and memory of encoder training and embedding; prints one JSON object.

    .venv/bin/python benchmarks/training.py [--crops 4000] [--crop-size 128] [--variant siamese_a]

On a generated crops dataset (in a temporary folder) it measures, in one run:
- the asset code path itself: trained_encoders and embeddings materialized with an ephemeral
  Dagster instance (MLflow on SQLite) on --asset-crops generated crops, interleaved round by
  round with the bare model (the same network fitted on in-memory tensors; the same 8 forward
  passes per crop on in-memory tensors that embedding and its rotation/flip-invariant mean
  take). Training rates are epoch rates past the first epoch (tracing), as the asset logs them
  to MLflow; embedding rates count every batch, for both. Goal: asset path >= 0.8x the bare
  model in training and in embedding;
- training pairs/s of a siamese variant fed by the streaming, augmenting tf.data pipeline,
  by pre-made in-memory tensors (the ceiling: no input cost at all), and the thesis' way
  (every pair precomputed into NumPy arrays, then model.fit on the arrays); also a PBR
  variant (mask decoding, dilation, blackout) and the autoencoder, streamed and in memory;
- embedding crops/s of embed_crops (Parquet -> pixels -> encoder) against the bare forward
  pass on in-memory tensors (predict_on_batch, a tf.function, eager encoder(x));
- peak RSS of a fresh process that streams one training pass and embeds every crop, for two
  dataset sizes, to show that memory does not grow with the number of crops.
Rates are medians of per-step (per-batch) rates over interleaved rounds.
Goals: streaming >= 0.9x the ceiling, embed_crops >= 0.8x the bare forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gbm_assets.models.training import limit_cpu_threads  # noqa: E402

limit_cpu_threads(2, 1)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from gbm_assets.imaging.crop_dataset import CropSelection, count_crops, iter_record_batches  # noqa: E402
from gbm_assets.imaging.crops import decode_crops  # noqa: E402
from gbm_assets.imaging.synthetic_crops import write_synthetic_crops as write_crops  # noqa: E402
from gbm_assets.models.augmentation import make_pair  # noqa: E402
from gbm_assets.models.dataset import training_dataset  # noqa: E402
from gbm_assets.models.encoders import build_siamese_encoder  # noqa: E402
from gbm_assets.models.training import EpochLog, TrainConfig, build_trainable, embed_crops, train_encoder  # noqa: E402
from gbm_assets.models.variants import get_variant  # noqa: E402

PLATE_CROPS = 500


def write_synthetic_crops(root: Path, n_crops: int, size: int, seed: int = 0, plate_crops: int = PLATE_CROPS) -> Path:
    """n_crops crops of three shape classes (round, elongated, ring) at random, plate_crops per plate file."""
    counts = [min(plate_crops, n_crops - start) for start in range(0, n_crops, plate_crops)]
    return write_crops(
        root,
        [f"B{p:03d}" for p in range(len(counts))],
        counts,
        size,
        images=10,
        seed=seed,
        mixed=True,
        radius=(0.1, 0.16),
    )


def clock() -> np.ndarray:
    """(wall, CPU) seconds now; CPU time is this process' user + system time, all threads."""
    t = os.times()
    return np.array([time.perf_counter(), t.user + t.system])


def interleaved_median(runs: dict, rounds: int) -> dict:
    """Per named run: median items/s (wall clock) and median CPU milliseconds per item.

    A run returns (items, [wall, cpu] seconds) samples: one per training step or embedded
    batch. Each run is called once untimed first (tracing, warm caches). The cores are shared
    with other jobs, so wall-clock rates carry their load; interleaving exposes every run to
    the same load, and CPU time per item, which another job's load barely changes, gives the
    steadier comparison of input overhead.
    """
    for run in runs.values():
        run()
    samples: dict[str, list] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name] += run()
    return {
        name: {
            "per_s": round(float(np.median([n / spent[0] for n, spent in got])), 1),
            "cpu_ms": round(float(np.median([1000 * spent[1] / n for n, spent in got])), 2),
        }
        for name, got in samples.items()
    }


def ratio(rates: dict, fast: str, slow: str) -> dict:
    """How close `fast` (e.g. streaming) comes to `slow` (e.g. the in-memory ceiling)."""
    return {
        "wall": round(rates[fast]["per_s"] / rates[slow]["per_s"], 3),
        "cpu": round(rates[slow]["cpu_ms"] / rates[fast]["cpu_ms"], 3),
    }


def batch_samples(batches, size_of) -> list:
    """(items, [wall, cpu] seconds) for each batch an iterator yields, since the previous one."""
    samples, last = [], clock()
    for batch in batches:
        now = clock()
        samples.append((size_of(batch), now - last))
        last = now
    return samples


class StepClock(keras.callbacks.Callback):
    """clock() at the end of every training step (after waiting for the step's result)."""

    def on_train_begin(self, logs=None):
        self.times = [clock()]

    def on_train_batch_end(self, batch, logs=None):
        float(next(iter(logs.values())))
        self.times.append(clock())


def all_pairs_in_numpy(crops_dir: Path, size: int, segmentation: str) -> tuple[np.ndarray, np.ndarray]:
    """The thesis' way: every pair computed up front and held in memory as float32 arrays."""
    first, second = [], []
    for step, batch in enumerate(iter_record_batches(CropSelection.of(crops_dir), ["pixels", "mask"], 256)):
        x = tf.cast(decode_crops(batch.column("pixels"), size), tf.float32)[..., None] / 255.0
        m = tf.cast(decode_crops(batch.column("mask"), size), tf.float32)[..., None]
        v1, v2 = make_pair(x, m, tf.constant([0, step], tf.int64), segmentation)
        first.append(v1.numpy())
        second.append(v2.numpy())
    return np.concatenate(first), np.concatenate(second)


def training_rates(crops_dir: Path, variant_name: str, size: int, batch: int, steps: int, rounds: int) -> dict:
    variant = get_variant(variant_name)
    selection = CropSelection.of(crops_dir)
    model, _, _ = build_trainable(variant, size)
    autoencoder, _, _ = build_trainable(get_variant("autoencoder"), size)
    streamed = training_dataset(selection, variant, batch, crop_size=size)
    in_memory = tf.data.Dataset.from_tensors(next(iter(streamed))).repeat()
    pbr_model, _, _ = build_trainable(get_variant("siamese_f"), size)
    pbr_streamed = training_dataset(selection, get_variant("siamese_f"), batch, crop_size=size)
    ae_streamed = training_dataset(selection, get_variant("autoencoder"), batch, crop_size=size)
    ae_in_memory = tf.data.Dataset.from_tensors(next(iter(ae_streamed))).repeat()
    start = time.perf_counter()
    first, second = all_pairs_in_numpy(crops_dir, size, variant.segmentation)
    precompute_s = time.perf_counter() - start

    def fit(trainee, data, **kwargs):
        """Per-step samples of one fit; the first step (iterator start, shuffle fill) is left out."""

        def run() -> list:
            stamps = StepClock()
            trainee.fit(
                data, epochs=1, steps_per_epoch=steps + 1, callbacks=[stamps], verbose=0, shuffle=False, **kwargs
            )
            return [(batch, b - a) for a, b in zip(stamps.times[1:], stamps.times[2:], strict=False)]

        return run

    rates = interleaved_median(
        {
            "streaming": fit(model, streamed),
            "ceiling": fit(model, in_memory),
            "thesis": fit(model, first, y=second, batch_size=batch),
            "pbr_streaming": fit(pbr_model, pbr_streamed),
            "ae_streaming": fit(autoencoder, ae_streamed),
            "ae_ceiling": fit(autoencoder, ae_in_memory),
        },
        rounds,
    )
    return {
        "variant": variant_name,
        "pairs_per_s": {name: r["per_s"] for name, r in rates.items()},
        "cpu_ms_per_pair": {name: r["cpu_ms"] for name, r in rates.items()},
        "streaming_vs_ceiling": ratio(rates, "streaming", "ceiling"),
        "pbr_streaming_vs_ceiling": ratio(rates, "pbr_streaming", "ceiling"),
        "thesis_vs_ceiling": ratio(rates, "thesis", "ceiling"),
        "autoencoder_streaming_vs_ceiling": ratio(rates, "ae_streaming", "ae_ceiling"),
        "thesis_precompute_s": round(precompute_s, 2),
        "thesis_pairs_memory_mb": round((first.nbytes + second.nbytes) / 2**20, 1),
    }


def embedding_rates(crops_dir: Path, n_crops: int, size: int, batch: int, rounds: int) -> dict:
    encoder = build_siamese_encoder(size, 128)
    x = tf.constant(np.random.default_rng(0).random((batch, size, size, 1), dtype=np.float32))
    repeats = max(1, n_crops // batch)
    compiled = tf.function(lambda t: encoder(t, training=False))

    def bare(forward):
        return lambda: batch_samples((forward(x) for _ in range(repeats)), len)

    rates = interleaved_median(
        {
            "embed_crops": lambda: batch_samples(embed_crops(encoder, crops_dir, batch), lambda b: len(b[0])),
            "predict_on_batch": bare(encoder.predict_on_batch),
            "tf_function": bare(lambda t: compiled(t).numpy()),
            "eager_call": bare(lambda t: encoder(t, training=False).numpy()),
        },
        rounds,
    )
    one_plate = embed_crops(encoder, crops_dir, batch, invariant=True, plates=["B000"])  # 8 passes: keep it short
    invariant = batch_samples(one_plate, lambda b: len(b[0]))
    fastest_bare = max(("predict_on_batch", "tf_function", "eager_call"), key=lambda k: rates[k]["per_s"])
    return {
        "crops_per_s": {name: r["per_s"] for name, r in rates.items()},
        "cpu_ms_per_crop": {name: r["cpu_ms"] for name, r in rates.items()},
        "embed_vs_fastest_bare": ratio(rates, "embed_crops", fastest_bare),
        "invariant_embed_crops_per_s": round(sum(n for n, _ in invariant) / sum(t[0] for _, t in invariant), 1),
    }


def asset_path_rates(
    tmp: Path, variant_name: str, n_crops: int, size: int, batch: int, epochs: int, steps: int, rounds: int
) -> dict:
    """The assets trained_encoders + embeddings, materialized, against the bare model, round by round.

    Each round: the bare network (a fresh build_trainable model) fitted on one in-memory batch
    for `epochs` epochs of `steps` steps; the core entry point the asset calls (train_encoder,
    streaming and augmenting, no Dagster or MLflow) with the same budget; then one materialization of both assets (fresh model,
    streaming tf.data pipeline, MLflow logging and registration, embedding every crop through
    write_embeddings, evaluation); then the bare forward passes of embedding (a fresh encoder,
    8 predict_on_batch calls per in-memory batch of 256, as many crops as the dataset). Training:
    epoch rates past epoch 0, the asset's from its MLflow "crops_per_s" history, the bare model's
    from the same EpochLog callback. Embedding: crops over the seconds of the whole pass, for both.
    """
    import dagster as dg
    import mlflow

    from gbm_assets.assets.encoders import embeddings, trained_encoders
    from gbm_assets.assets.mlflow_tracking import MLflowTracking
    from gbm_assets.assets.resources import DataDirs

    data = DataDirs(root=str(tmp / "asset_data"))
    write_synthetic_crops(data.crops, n_crops, size, seed=7, plate_crops=max(1, n_crops // 4))
    tracking = MLflowTracking(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", artifact_root=(tmp / "artifacts").as_uri())
    resources = {"data": data, "mlflow_tracking": tracking}
    instance = dg.DagsterInstance.ephemeral()
    run_config = {
        "ops": {
            "trained_encoders": {"config": {"epochs": epochs, "max_steps_per_epoch": steps, "batch_size": batch}},
            "embeddings": {"config": {"batch_size": 256}},
        }
    }
    variant = get_variant(variant_name)
    in_memory = tf.data.Dataset.from_tensors(
        next(iter(training_dataset(CropSelection.of(data.crops), variant, batch, crop_size=size)))
    ).repeat()
    x = tf.constant(np.random.default_rng(0).random((256, size, size, 1), dtype=np.float32))

    def bare_training() -> list[float]:
        model, _, loss_key = build_trainable(variant, size)
        log = EpochLog(loss_key, steps * batch, None)
        model.fit(in_memory, epochs=epochs, steps_per_epoch=steps, callbacks=[log], verbose=0, shuffle=False)
        return [r["crops_per_s"] for r in log.history[1:]]

    def core_training() -> list[float]:
        """The core entry point the asset calls (train_encoder), without Dagster or MLflow."""
        config = TrainConfig(epochs=epochs, max_steps_per_epoch=steps, batch_size=batch)
        return [r["crops_per_s"] for r in train_encoder(variant, data.crops, config).history[1:]]

    def bare_embedding() -> float:
        encoder = build_siamese_encoder(size, variant.features)
        done, start = 0, time.perf_counter()
        while done < n_crops:
            for _ in range(8):
                encoder.predict_on_batch(x[: n_crops - done])
            done += min(256, n_crops - done)
        return done / (time.perf_counter() - start)

    mlflow.set_tracking_uri(tracking.resolved_uri())
    samples = {
        "bare_training": [],
        "core_training": [],
        "asset_training": [],
        "bare_embedding": [],
        "asset_embedding": [],
        "materialize_s": [],
        "training_s": [],
        "embedding_s": [],
    }
    for _ in range(rounds):
        samples["bare_training"] += bare_training()
        samples["core_training"] += core_training()
        start = time.perf_counter()
        result = dg.materialize(
            [trained_encoders, embeddings],
            partition_key=variant_name,
            instance=instance,
            resources=resources,
            run_config=run_config,
        )
        samples["materialize_s"].append(time.perf_counter() - start)
        assert result.success
        trained = result.asset_materializations_for_node("trained_encoders")[0].metadata
        embedded = result.asset_materializations_for_node("embeddings")[0].metadata
        history = mlflow.MlflowClient().get_metric_history(trained["mlflow_run_id"].value, "crops_per_s")
        samples["asset_training"] += [m.value for m in sorted(history, key=lambda m: m.step)[1:]]
        samples["training_s"].append(trained["seconds"].value)
        samples["asset_embedding"].append(embedded["crops_per_s"].value)
        samples["embedding_s"].append(n_crops / embedded["crops_per_s"].value)
        samples["bare_embedding"].append(bare_embedding())
    med = {name: float(np.median(values)) for name, values in samples.items()}
    return {
        "crops": n_crops,
        "epochs": epochs,
        "steps_per_epoch": steps,
        "rounds": rounds,
        "training_pairs_per_s": {
            "asset": round(med["asset_training"], 1),
            "core_train_encoder": round(med["core_training"], 1),
            "bare_model": round(med["bare_training"], 1),
        },
        "training_asset_vs_bare": round(med["asset_training"] / med["bare_training"], 3),
        "training_core_vs_bare": round(med["core_training"] / med["bare_training"], 3),
        "embedding_crops_per_s": {
            "asset": round(med["asset_embedding"], 1),
            "bare_model": round(med["bare_embedding"], 1),
        },
        "embedding_asset_vs_bare": round(med["asset_embedding"] / med["bare_embedding"], 3),
        "materialize_s": round(med["materialize_s"], 1),
        "outside_training_and_embedding_s": round(med["materialize_s"] - med["training_s"] - med["embedding_s"], 1),
        "samples": {name: [round(v, 1) for v in values] for name, values in samples.items()},
    }


def peak_rss_mb() -> float:
    """This process' peak RSS. VmHWM, not getrusage: ru_maxrss survives exec, so a child started
    by a big parent would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_probe(crops_dir: Path, size: int, batch: int) -> dict:
    """In a fresh process: one full pass of the PBR training stream, then embed every crop.

    The two data sets have 4 plates each, so a flat peak shows that memory depends neither on
    the number of crops nor on the size of a plate file."""
    selection = CropSelection.of(crops_dir)
    stream = training_dataset(selection, get_variant("siamese_f"), batch, crop_size=size)
    for _ in stream.take(count_crops(selection) // batch):
        pass
    encoder = build_siamese_encoder(size, 128)
    n = sum(len(rows) for rows, _ in embed_crops(encoder, crops_dir, 256))
    return {"crops": n, "peak_rss_mb": round(peak_rss_mb(), 1)}


def peak_rss(tmp: Path, sizes: list[int], size: int, batch: int) -> list[dict]:
    out = []
    for n in sizes:
        crops_dir = write_synthetic_crops(tmp / f"rss_{n}.parquet", n, size, seed=n, plate_crops=n // 4)
        probe = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-probe",
                str(crops_dir),
                "--crop-size",
                str(size),
                "--batch-size",
                str(batch),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        out.append(json.loads(probe.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=4000)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--variant", default="siamese_a")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument("--asset-crops", type=int, default=1024, help="crops of the asset-path dataset")
    parser.add_argument(
        "--asset-epochs", type=int, default=3, help="epochs per asset materialization (the first is not timed)"
    )
    parser.add_argument("--asset-steps", type=int, default=8, help="training steps per epoch of the asset path")
    parser.add_argument("--asset-rounds", type=int, default=2, help="interleaved rounds of bare model and assets")
    parser.add_argument("--only-assets", action="store_true", help="measure only the asset path against the bare model")
    parser.add_argument("--rss-probe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe, args.crop_size, args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {
            "crops": args.crops,
            "crop_size": args.crop_size,
            "batch_size": args.batch_size,
            "cpu": f"{platform.machine()}, {os.cpu_count()} cores, TF intra-op 2 / inter-op 1",
            "tensorflow": tf.__version__,
            "asset_path": asset_path_rates(
                tmp,
                args.variant,
                args.asset_crops,
                args.crop_size,
                args.batch_size,
                args.asset_epochs,
                args.asset_steps,
                args.asset_rounds,
            ),
        }
        if not args.only_assets:
            crops_dir = write_synthetic_crops(tmp / "crops.parquet", args.crops, args.crop_size)
            result["training"] = training_rates(
                crops_dir, args.variant, args.crop_size, args.batch_size, args.steps, args.rounds
            )
            result["embedding"] = embedding_rates(crops_dir, args.crops, args.crop_size, 256, args.rounds)
            result["peak_rss"] = peak_rss(tmp, [args.crops // 2, args.crops * 2], args.crop_size, args.batch_size)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
