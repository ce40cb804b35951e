"""clusters (per variant) and composition_report: cell types and the composition of each culture."""

import json
import os
from pathlib import Path

import dagster as dg
import pandas as pd

from gbm_assets.assets.encoders import embeddings
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import variants
from gbm_assets.assets.resources import DataDirs
from gbm_assets.models.variants import get_variant, variant_names
from gbm_assets.staging import Staging
from gbm_assets.storage import AtomicParquetWriter


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


def skipped_file(data: DataDirs, variant: str):
    """Why the variant has no clusters (too few cells); present only then."""
    return _model_dir(data, variant) / "skipped.json"


def _model_file(model_dir, fingerprint: str):
    # One file name per fitted model: model.json switches from one to the next in one rename.
    return model_dir / f"model-{fingerprint[:16]}.npz"


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
    """Fit (or reuse) the cluster models, label every cell, write the explorer page; log, then swap.

    Outputs: cluster_models/<variant>/model.json (the record: encoder run, fingerprint, model
    file) and model-<fingerprint>.npz (the fitted models, arrays only: clustering.save_clustering;
    never a pickle, so a file planted in the data folder cannot run code), the labels Parquet
    and the explorer page. All are staged beside their final paths, logged to MLflow, and only
    then swapped in: model file, model.json, labels, explorer. model.json is the switch to a new
    model (its model file is new, not overwritten); the labels file records the fingerprint of
    the models that labelled it, so after a crash between two renames the next run sees new
    model and old labels disagree and refits instead of mixing them. On any failure before the
    swap (MLflow locked or unreachable, an error) every previous output stays as it was.

    Fewer cells than clustering.MIN_CELLS: no models or labels; skipped.json and the Dagster
    metadata say why, and the composition report shows it in the variant's section.
    """
    import mlflow

    from gbm_assets.analysis.cell_labels import (
        count_cells, fit_on_sample, label_cells, labels_model_fingerprint, labels_schema, labels_table,
    )
    from gbm_assets.analysis.clustering import (
        MIN_CELLS, ClusteringConfig, TooFewCells, load_clustering, save_clustering, shrunk_parameters,
    )
    from gbm_assets.analysis.explorer import sample_for_explorer, write_explorer
    from gbm_assets.analysis.truth import has_truth, true_morphotypes
    from gbm_assets.analysis.variant_report import labeling_metrics, sample_labels
    from gbm_assets.imaging.crop_lookup import read_crops

    variant = get_variant(context.partition_key)
    emb_path = data.embeddings_file(variant.name)
    encoder_run = json.loads(data.encoder_record(variant.name).read_text())["run_id"]
    model_dir = _model_dir(data, variant.name)
    meta_path, out, explorer = model_dir / "model.json", data.labels_file(variant.name), explorer_file(data, variant.name)
    skipped = skipped_file(data, variant.name)
    legacy = model_dir / "model.joblib"  # pickles of earlier versions: never loaded, removed by the next run
    retry = mlflow_tracking.retrying
    n_cells = count_cells(emb_path)

    with Staging() as stage:
        if n_cells < MIN_CELLS:
            reason = str(TooFewCells(n_cells))
            context.log.warning(f"{variant.name}: not clustered: {reason}")
            stage.path(skipped).write_text(json.dumps({"reason": reason, "n_cells": n_cells, "min_cells": MIN_CELLS,
                                                       "encoder_run_id": encoder_run}, indent=2))
            with mlflow_tracking.start_run(context, run_name=f"cluster-{variant.name}") as run:
                retry(mlflow.set_tags, {"gbm.encoder_run_id": encoder_run, "gbm.variant": variant.name,
                                        "gbm.mode": "skipped", "gbm.skipped": reason})
                retry(mlflow.log_metrics, {"n_cells": n_cells})
                url = mlflow_tracking.run_url(run)
            # Labels of more cells from an earlier run would now be reported as current: remove them.
            for stale in (out, explorer, meta_path, legacy, *model_dir.glob("model-*.npz")):
                stage.remove_on_commit(stale)
            stage.commit()
            return dg.MaterializeResult(metadata={
                "skipped": reason, "n_cells": n_cells, "min_cells": MIN_CELLS, "mlflow_run": dg.MetadataValue.url(url)})

        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        model_path = model_dir / Path(str(meta.get("model_file", "-"))).name  # never outside model_dir
        reuse = (not config.refit and model_path.is_file() and out.is_file()
                 and meta.get("encoder_run_id") == encoder_run and meta.get("vector") == config.vector
                 and labels_model_fingerprint(out) == meta.get("fingerprint"))
        if legacy.is_file():
            context.log.warning(f"{legacy}: a pickled model of an earlier version; it is never loaded (unpickling "
                                "runs code) and is removed when this step's outputs are swapped in")
            stage.remove_on_commit(legacy)

        if reuse:
            fitted = load_clustering(model_path, expected_fingerprint=meta["fingerprint"])  # arrays only, verified
            known = pd.read_parquet(out).set_index("crop_id")
            mode = "assign new cells (no refit)"
        else:
            cfg = ClusteringConfig(seed=config.seed, gmm_components=config.gmm_components,
                                   hdbscan_min_samples=config.hdbscan_min_samples,
                                   hdbscan_min_cluster_size=config.hdbscan_min_cluster_size)
            context.log.info(f"{variant.name}: fitting UMAP, HDBSCAN and GMMs on up to {config.fit_max_cells} cells")
            fitted, known = fit_on_sample(emb_path, cfg, max(config.fit_max_cells, MIN_CELLS), config.vector)
            known = known.set_index("crop_id")
            fingerprint = fitted.fingerprint()
            model_path = _model_file(model_dir, fingerprint)
            save_clustering(fitted, stage.path(model_path))
            meta = {"encoder_run_id": encoder_run, "vector": config.vector, "n_train": fitted.n_train,
                    "model_file": model_path.name, "format": "npz arrays (clustering.save_clustering)",
                    "auto_k": int(fitted.auto_k.k), "auto_k_rule": fitted.auto_k.rule, "min_cluster_size": fitted.min_cluster_size,
                    "params": fitted.params, "fingerprint": fingerprint, "timings_s": fitted.timings}
            stage.path(meta_path).write_text(json.dumps(meta, indent=2))
            for old in model_dir.glob("model-*.npz"):
                if old != model_path:
                    stage.remove_on_commit(old)
            mode = "fit"
        shrunk = shrunk_parameters(fitted.config, fitted.n_train)
        if shrunk:
            context.log.warning(f"{variant.name}: {fitted.n_train} cells; parameters shrunk to fit them: {shrunk}")

        staged_labels = stage.path(out)
        n_total = n_new = 0
        schema = labels_schema(fitted.gmm.n_components, meta["fingerprint"])
        with AtomicParquetWriter(staged_labels, schema) as writer:
            for labels, new in label_cells(emb_path, fitted, known, config.vector):
                writer.write(labels_table(labels, schema))
                n_total, n_new = n_total + len(labels), n_new + new
        context.log.info(f"{variant.name}: {mode}; {n_total} cells labelled, {n_new} by prediction")

        sample = sample_labels(staged_labels, 20_000, seed=config.seed)
        truth = true_morphotypes(sample, data.raw)
        scored = labeling_metrics(sample, truth if has_truth(truth) else None, seed=config.seed)
        points = sample_for_explorer(sample_labels(staged_labels, 5 * config.explorer_max_points, seed=config.seed),
                                     config.explorer_max_points, seed=config.seed)
        staged_explorer = write_explorer(stage.path(explorer), variant.name, points, read_crops(data.crops, points["crop_id"]))
        stage.remove_on_commit(skipped)  # an earlier "too few cells" note no longer holds

        with mlflow_tracking.start_run(context, run_name=f"cluster-{variant.name}") as run:
            retry(mlflow.set_tags, {"gbm.encoder_run_id": encoder_run, "gbm.variant": variant.name, "gbm.mode": mode,
                                    "gbm.model_fingerprint": meta["fingerprint"]})
            retry(mlflow.log_params, {"variant": variant.name, "vector": config.vector, "fit_max_cells": config.fit_max_cells,
                                      "gmm_components": fitted.gmm.n_components, "min_cluster_size": meta["min_cluster_size"],
                                      "hdbscan_min_samples": fitted.params.get("hdbscan_min_samples", config.hdbscan_min_samples),
                                      "umap_neighbors": fitted.params.get("umap_neighbors", ""),
                                      "seed": config.seed, "n_train": meta["n_train"]})
            retry(mlflow.log_metrics, {"auto_k": meta["auto_k"], "n_cells": n_total, "n_predicted": n_new,
                                       **{f"{c}.{k}": float(v) for c, m in scored.items() for k, v in m.items()}})
            retry(mlflow.log_artifact, str(staged_explorer), "explorer")
            url = mlflow_tracking.run_url(run)
        # Logged: now swap in, the model's record before the labels it made, the page last.
        order = ([model_path, meta_path] if mode == "fit" else []) + [out, explorer]
        stage.commit(order)

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
            "gmm_components": int(fitted.gmm.n_components),
            **({"parameters_shrunk_for_small_data": json.dumps(shrunk)} if shrunk else {}),
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

    from gbm_assets.analysis.report import VariantSection, markdown_summary, write_report
    from gbm_assets.analysis.report_inputs import comparison_table
    from gbm_assets.analysis.truth import true_morphotypes
    from gbm_assets.analysis.variant_report import build_section, sample_labels

    out_dir = data.reports / "composition"
    done = [v for v in variant_names() if data.labels_file(v).is_file() or skipped_file(data, v).is_file()]
    if not done:
        raise FileNotFoundError(f"no cluster labels under {data.clusters}: materialize clusters first")
    clustered = [v for v in done if data.labels_file(v).is_file()]
    with Staging() as stage:
        staged_dir = stage.directory(out_dir, last=["report.html"])
        sections = []
        for name in done:
            if not data.labels_file(name).is_file():
                reason = json.loads(skipped_file(data, name).read_text())["reason"]
                sections.append(VariantSection(name, notes=f"Not clustered: {reason}."))
                continue
            context.log.info(f"report: {name}")
            labels = sample_labels(data.labels_file(name), 20_000)
            labels["morphotype"] = true_morphotypes(labels, data.raw)
            meta = json.loads((_model_dir(data, name) / "model.json").read_text())
            confusion = sorted((data.evaluation / name).glob("confusion_embedding_*.png"))
            section = build_section(name, labels, data.crops, staged_dir / name, confusion, auto_k=meta["auto_k"])
            if explorer_file(data, name).is_file():
                section.explorer = os.path.relpath(explorer_file(data, name), out_dir)
            sections.append(section)
        comparison = comparison_table(data.evaluation, done)
        write_report(staged_dir, comparison, sections)
        summary = markdown_summary(comparison, sections)
        with mlflow_tracking.start_run(context, run_name="composition-report") as run:
            mlflow_tracking.retrying(mlflow.log_artifacts, str(staged_dir), "report")
            url = mlflow_tracking.run_url(run)
        # Logged: the files move in, report.html last; files of an earlier report that this one
        # no longer has (a variant's figures) are removed.
        stage.commit([out_dir])
    path = out_dir / "report.html"
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(str(path)),
            "summary": dg.MetadataValue.md(summary),
            "variants": ", ".join(done),
            **({"not_clustered": ", ".join(sorted(set(done) - set(clustered)))} if set(done) - set(clustered) else {}),
            "mlflow_run": dg.MetadataValue.url(url),
        }
    )
