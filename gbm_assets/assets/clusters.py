"""clusters (per variant) and composition_report: cell types and the composition of each culture."""

import json
import os

import dagster as dg
import pandas as pd

from gbm_assets.assets.encoders import embeddings
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import variants
from gbm_assets.assets.resources import DataDirs
from gbm_assets.models.variants import get_variant, variant_names
from gbm_assets.storage import AtomicParquetWriter, atomic_path, write_bytes_atomic


class ClusterConfig(dg.Config):
    """Clustering settings; thesis values by default. refit=True refits instead of labelling new cells."""

    refit: bool = False
    fit_max_cells: int = 50_000  # cells the models are fitted on (seeded sample); the rest are predicted
    vector: str = "embedding"  # or "embedding_invariant" (rotation/flip-invariant)
    seed: int = 0
    gmm_components: int = 11
    hdbscan_min_samples: int = 10
    hdbscan_min_cluster_size: int | None = None  # None: 220 scaled by cells / 7,500
    explorer_max_points: int = 20_000  # cells shown in the explorer page (sampled across cultures and clusters)


def _model_dir(data: DataDirs, variant: str):
    return data.base / "cluster_models" / variant


def explorer_file(data: DataDirs, variant: str):
    return data.reports / "explorer" / f"{variant}.html"


@dg.asset(
    partitions_def=variants,
    deps=[embeddings],
    group_name="analysis",
    kinds={"umap", "parquet", "mlflow"},
    description="UMAP + HDBSCAN + Gaussian mixture (+ automatic k) cell types for every cell, with provenance.",
)
def clusters(
    context: dg.AssetExecutionContext, config: ClusterConfig, data: DataDirs, mlflow_tracking: MLflowTracking
) -> dg.MaterializeResult:
    import joblib
    import mlflow

    from gbm_assets.analysis.cell_labels import fit_on_sample, label_cells, labels_schema, labels_table
    from gbm_assets.analysis.clustering import ClusteringConfig
    from gbm_assets.analysis.truth import has_truth, true_morphotypes
    from gbm_assets.analysis.explorer import sample_for_explorer, write_explorer
    from gbm_assets.analysis.variant_report import labeling_metrics, sample_labels
    from gbm_assets.imaging.crop_lookup import read_crops

    variant = get_variant(context.partition_key)
    emb_path = data.embeddings_file(variant.name)
    encoder_run = json.loads(data.encoder_record(variant.name).read_text())["run_id"]
    model_dir = _model_dir(data, variant.name)
    meta_path, model_path, out = model_dir / "model.json", model_dir / "model.joblib", data.labels_file(variant.name)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    reuse = (not config.refit and model_path.is_file() and out.is_file()
             and meta.get("encoder_run_id") == encoder_run and meta.get("vector") == config.vector)

    if reuse:
        fitted = joblib.load(model_path)
        known = pd.read_parquet(out).set_index("crop_id")
        mode = "assign new cells (no refit)"
    else:
        cfg = ClusteringConfig(seed=config.seed, gmm_components=config.gmm_components,
                               hdbscan_min_samples=config.hdbscan_min_samples,
                               hdbscan_min_cluster_size=config.hdbscan_min_cluster_size)
        context.log.info(f"{variant.name}: fitting UMAP, HDBSCAN and GMMs on up to {config.fit_max_cells} cells")
        fitted, known = fit_on_sample(emb_path, cfg, config.fit_max_cells, config.vector)
        known = known.set_index("crop_id")
        model_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(model_path) as tmp:
            joblib.dump(fitted, tmp)
        meta = {"encoder_run_id": encoder_run, "vector": config.vector, "n_train": fitted.n_train,
                "auto_k": int(fitted.auto_k.k), "auto_k_rule": fitted.auto_k.rule, "min_cluster_size": fitted.min_cluster_size,
                "fingerprint": fitted.fingerprint(), "timings_s": fitted.timings}
        write_bytes_atomic(meta_path, json.dumps(meta, indent=2).encode())
        mode = "fit"

    n_total = n_new = 0
    schema = labels_schema(fitted.gmm.n_components)
    with AtomicParquetWriter(out, schema) as writer:
        for labels, new in label_cells(emb_path, fitted, known, config.vector):
            writer.write(labels_table(labels, schema))
            n_total, n_new = n_total + len(labels), n_new + new
    context.log.info(f"{variant.name}: {mode}; {n_total} cells labelled, {n_new} by prediction")

    sample = sample_labels(out, 20_000, seed=config.seed)
    truth = true_morphotypes(sample, data.raw)
    scored = labeling_metrics(sample, truth if has_truth(truth) else None, seed=config.seed)
    points = sample_for_explorer(sample_labels(out, 5 * config.explorer_max_points, seed=config.seed),
                                 config.explorer_max_points, seed=config.seed)
    explorer = write_explorer(explorer_file(data, variant.name), variant.name, points, read_crops(data.crops, points["crop_id"]))
    context.log.info(f"{variant.name}: cell explorer with {len(points)} cells at {explorer}")
    with mlflow_tracking.start_run(context, run_name=f"cluster-{variant.name}") as run:
        mlflow.set_tags({"gbm.encoder_run_id": encoder_run, "gbm.variant": variant.name, "gbm.mode": mode})
        mlflow.log_params({"variant": variant.name, "vector": config.vector, "fit_max_cells": config.fit_max_cells,
                           "gmm_components": config.gmm_components, "min_cluster_size": meta["min_cluster_size"],
                           "hdbscan_min_samples": config.hdbscan_min_samples, "seed": config.seed, "n_train": meta["n_train"]})
        mlflow.log_metrics({"auto_k": meta["auto_k"], "n_cells": n_total, "n_predicted": n_new,
                            **{f"{c}.{k}": float(v) for c, m in scored.items() for k, v in m.items()}})
        mlflow.log_artifact(str(explorer), "explorer")
        url = mlflow_tracking.run_url(run)
    hdb = scored["hdbscan"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "explorer": dg.MetadataValue.path(str(explorer)),
            "explorer_points": len(points),
            "mode": mode,
            "n_cells": n_total,
            "n_predicted_without_refit": n_new,
            "hdbscan_clusters": int(hdb["n_clusters"]),
            "noise_fraction": float(hdb["noise_fraction"]),
            "auto_k": meta["auto_k"],
            "gmm_components": config.gmm_components,
            **({"ari_hdbscan": float(hdb["ari"]), "nmi_hdbscan": float(hdb["nmi"])} if "ari" in hdb else {}),
            "mlflow_run": dg.MetadataValue.url(url),
        }
    )


@dg.asset(
    deps=[dg.AssetDep(clusters, partition_mapping=dg.AllPartitionMapping())],
    group_name="analysis",
    kinds={"html", "mlflow"},
    description="The variant comparison (thesis Table 3) and each culture's cell-type composition, as one HTML report.",
)
def composition_report(
    context: dg.AssetExecutionContext, data: DataDirs, mlflow_tracking: MLflowTracking
) -> dg.MaterializeResult:
    import mlflow

    from gbm_assets.analysis.report import markdown_summary, write_report
    from gbm_assets.analysis.report_inputs import comparison_table
    from gbm_assets.analysis.truth import true_morphotypes
    from gbm_assets.analysis.variant_report import build_section, sample_labels

    out_dir = data.reports / "composition"
    done = [v for v in variant_names() if data.labels_file(v).is_file()]
    if not done:
        raise FileNotFoundError(f"no cluster labels under {data.clusters}: materialize clusters first")
    sections = []
    for name in done:
        context.log.info(f"report: {name}")
        labels = sample_labels(data.labels_file(name), 20_000)
        labels["morphotype"] = true_morphotypes(labels, data.raw)
        meta = json.loads((_model_dir(data, name) / "model.json").read_text())
        confusion = sorted((data.evaluation / name).glob("confusion_embedding_*.png"))
        section = build_section(name, labels, data.crops, out_dir / name, confusion, auto_k=meta["auto_k"])
        if explorer_file(data, name).is_file():
            section.explorer = os.path.relpath(explorer_file(data, name), out_dir)
        sections.append(section)
    comparison = comparison_table(data.evaluation, done)
    path = write_report(out_dir, comparison, sections)
    summary = markdown_summary(comparison, sections)
    with mlflow_tracking.start_run(context, run_name="composition-report") as run:
        mlflow.log_artifacts(str(out_dir), "report")
        url = mlflow_tracking.run_url(run)
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(str(path)),
            "summary": dg.MetadataValue.md(summary),
            "variants": ", ".join(done),
            "mlflow_run": dg.MetadataValue.url(url),
        }
    )
