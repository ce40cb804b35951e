"""clusters (per variant) and composition_report: cell types and the composition of each culture."""

import json
import os

import dagster as dg

from gbm_assets.assets.encoders import embeddings
from gbm_assets.assets.mlflow_tracking import MLflowTracking
from gbm_assets.assets.partitions import variants
from gbm_assets.assets.resources import DataDirs, core_params
from gbm_assets.models.variants import get_variant, variant_names
from gbm_assets.staging import Staging


class ClusterConfig(dg.Config):
    """Clustering settings; thesis values by default. refit=True refits instead of labelling new cells.

    params(variant) gives the core's analysis.clustering.ClusteringConfig (fields of the same
    name). vector, preprocess and neighbor_weight left empty (None) take the variant's own
    (Variant.cluster_vector, cluster_preprocess, cluster_neighbor_weight: the plain embedding as
    it is, without neighbours, for the thesis' rows).
    """

    refit: bool = False
    fit_max_cells: int = 50_000  # cells the models are fitted on (seeded sample); the rest are predicted
    vector: str | None = None  # "embedding" or "embedding_invariant" (rotation/flip-invariant); None: the variant's
    seed: int = 0
    gmm_components: int = 11
    hdbscan_min_samples: int = 10
    hdbscan_min_cluster_size: int | None = None  # None: 220 scaled by cells / 7,500
    # what UMAP sees: "none", "standardize", "pca_whiten" or "spherize" (README, Cell types); None: the variant's
    preprocess: str | None = None
    pca_components: int = 8  # components kept by "pca_whiten"
    # weight of the neighbour contact (CellProfiler's neighbour measurements the crops carry) beside
    # the vector; 0: not used; None: the variant's (README, Cell types)
    neighbor_weight: float | None = None
    explorer_max_points: int = 20_000  # cells shown in the explorer page (sampled across cultures and clusters)

    def params(self, variant=None):
        """ClusteringConfig of these settings; an empty preprocess or neighbor_weight is the variant's
        (Variant.cluster_preprocess, cluster_neighbor_weight; "none" and 0 without one)."""
        from gbm_assets.analysis.clustering import ClusteringConfig

        preprocess = self.preprocess or (variant.cluster_preprocess if variant is not None else "none")
        weight = self.neighbor_weight
        if weight is None:
            weight = variant.cluster_neighbor_weight if variant is not None else 0.0
        return core_params(
            self.model_copy(update={"preprocess": preprocess, "neighbor_weight": weight}), ClusteringConfig
        )

    def vector_for(self, variant) -> str:
        """The embedding column to cluster: the configured one, else variant.cluster_vector."""
        return self.vector or variant.cluster_vector


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
    model and old labels disagree and refits instead of mixing them (cell_labels.load_or_fit).
    On any failure before the swap (MLflow locked or unreachable, an error) every previous
    output stays as it was.

    Fewer cells than clustering.MIN_CELLS: no models or labels; skipped.json and the Dagster
    metadata say why, and the composition report shows it in the variant's section.
    """
    from gbm_assets.analysis.cell_labels import (
        count_cells,
        crop_contact,
        load_or_fit,
        stage_not_clustered,
        write_labels,
    )
    from gbm_assets.analysis.clustering import MIN_CELLS

    row = get_variant(context.partition_key)
    variant, vector = row.name, config.vector_for(row)
    emb_path, out, explorer = data.embeddings_file(variant), data.labels_file(variant), data.explorer_file(variant)
    encoder_run = json.loads(data.encoder_record(variant).read_text())["run_id"]
    files, n_cells = data.cluster_models(variant), count_cells(emb_path)
    with Staging() as stage:
        if n_cells < MIN_CELLS:
            reason = stage_not_clustered(files, n_cells, encoder_run, stage, stale_outputs=(out, explorer))
            context.log.warning(f"{variant}: not clustered: {reason}")
            url = _log_cluster_run(
                context,
                mlflow_tracking,
                variant,
                {"gbm.encoder_run_id": encoder_run, "gbm.mode": "skipped", "gbm.skipped": reason},
                {},
                {"n_cells": n_cells},
            )
            stage.commit()
            return dg.MaterializeResult(
                metadata={
                    "skipped": reason,
                    "n_cells": n_cells,
                    "min_cells": MIN_CELLS,
                    "mlflow_run": dg.MetadataValue.url(url),
                }
            )
        params = config.params(row)
        contact = crop_contact(data.crops) if params.neighbor_weight > 0 else None
        models = load_or_fit(
            emb_path,
            files,
            out,
            encoder_run,
            params,
            stage,
            config.fit_max_cells,
            vector,
            config.refit,
            logger=context.log,
            contact=contact,
        )
        if models.shrunk:
            context.log.warning(
                f"{variant}: {models.fitted.n_train} cells; parameters shrunk to fit them: {models.shrunk}"
            )
        n_total, n_new = write_labels(emb_path, models, stage.path(out), vector, contact)
        context.log.info(f"{variant}: {models.mode}; {n_total} cells labelled, {n_new} by prediction")
        scored, points, staged_explorer = _score_and_explore(
            config, data, variant, stage.path(out), stage.path(explorer)
        )
        stage.remove_on_commit(files.skipped)  # an earlier "too few cells" note no longer holds
        url = _log_cluster_run(
            context,
            mlflow_tracking,
            variant,
            _cluster_tags(models, encoder_run),
            _cluster_params(config, models, variant),
            {
                "auto_k": models.record["auto_k"],
                "n_cells": n_total,
                "n_predicted": n_new,
                **{f"{c}.{k}": float(v) for c, m in scored.items() for k, v in m.items()},
            },
            artifacts={"explorer": staged_explorer},
        )
        stage.commit(
            [*models.commit_order, out, explorer]
        )  # the model's record before the labels it made, the page last
    hdb = scored["hdbscan"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "explorer": dg.MetadataValue.path(str(explorer)),
            "explorer_points": len(points),
            "mode": models.mode,
            "n_cells": n_total,
            "n_predicted_without_refit": n_new,
            "hdbscan_clusters": int(hdb["n_clusters"]),
            "noise_fraction": float(hdb["noise_fraction"]),
            "auto_k": models.record["auto_k"],
            "gmm_components": int(models.fitted.gmm.n_components),
            **({"parameters_shrunk_for_small_data": json.dumps(models.shrunk)} if models.shrunk else {}),
            **({"ari_hdbscan": float(hdb["ari"]), "nmi_hdbscan": float(hdb["nmi"])} if "ari" in hdb else {}),
            "mlflow_run": dg.MetadataValue.url(url),
        }
    )


def _score_and_explore(config: ClusterConfig, data: DataDirs, variant: str, labels_path, explorer_path):
    """(labeling metrics of a seeded sample, the explorer's points, the written explorer page)."""
    from gbm_assets.analysis.explorer import crop_thumbnails, sample_for_explorer, write_explorer
    from gbm_assets.analysis.truth import has_truth, true_morphotypes
    from gbm_assets.analysis.variant_report import labeling_metrics, sample_labels

    sample = sample_labels(labels_path, 20_000, seed=config.seed)
    truth = true_morphotypes(sample, data.raw)
    scored = labeling_metrics(sample, truth if has_truth(truth) else None, seed=config.seed)
    points = sample_for_explorer(
        sample_labels(labels_path, 5 * config.explorer_max_points, seed=config.seed),
        config.explorer_max_points,
        seed=config.seed,
    )
    page = write_explorer(explorer_path, variant, points, crop_thumbnails(data.crops, points["crop_id"]))
    return scored, points, page


def _cluster_tags(models, encoder_run: str) -> dict:
    return {
        "gbm.encoder_run_id": encoder_run,
        "gbm.mode": models.mode,
        "gbm.model_fingerprint": models.record["fingerprint"],
    }


def _cluster_params(config: ClusterConfig, models, variant: str) -> dict:
    """The MLflow params of a clustering run: the parameters the fitted models used."""
    fitted, record = models.fitted, models.record
    return {
        "variant": variant,
        "vector": record["vector"],
        "preprocess": fitted.config.preprocess,
        "neighbor_weight": fitted.config.neighbor_weight,
        "fit_max_cells": config.fit_max_cells,
        "gmm_components": fitted.gmm.n_components,
        "min_cluster_size": record["min_cluster_size"],
        "hdbscan_min_samples": fitted.params.get("hdbscan_min_samples", config.hdbscan_min_samples),
        "umap_neighbors": fitted.params.get("umap_neighbors", ""),
        "seed": config.seed,
        "n_train": record["n_train"],
    }


def _log_cluster_run(
    context,
    mlflow_tracking: MLflowTracking,
    variant: str,
    tags: dict,
    params: dict,
    metrics: dict,
    artifacts: dict | None = None,
) -> str:
    """One MLflow run "cluster-<variant>" with these tags (plus gbm.variant), params, metrics and artifacts; its URL."""
    import mlflow

    retry = mlflow_tracking.retrying
    with mlflow_tracking.start_run(context, run_name=f"cluster-{variant}") as run:
        retry(mlflow.set_tags, {**tags, "gbm.variant": variant})
        if params:
            retry(mlflow.log_params, params)
        retry(mlflow.log_metrics, metrics)
        for folder, path in (artifacts or {}).items():
            retry(mlflow.log_artifact, str(path), folder)
        return mlflow_tracking.run_url(run)


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
    from gbm_assets.imaging.plate_coordinates import cell_finding_quality

    out_dir = data.composition_dir
    done = [v for v in variant_names() if data.labels_file(v).is_file() or data.cluster_models(v).skipped.is_file()]
    if not done:
        raise FileNotFoundError(f"no cluster labels under {data.clusters}: materialize clusters first")
    clustered = [v for v in done if data.labels_file(v).is_file()]
    with Staging() as stage:
        staged_dir = stage.directory(out_dir, last=[data.composition_report.name])
        sections = [_variant_section(context, data, name, staged_dir) for name in done]
        comparison = comparison_table(data.evaluation, done)
        write_report(staged_dir, comparison, sections, cell_finding=cell_finding_quality(data.coordinates, data.masks))
        summary = markdown_summary(comparison, sections)
        with mlflow_tracking.start_run(context, run_name="composition-report") as run:
            mlflow_tracking.retrying(mlflow.log_artifacts, str(staged_dir), "report")
            url = mlflow_tracking.run_url(run)
        # Logged: the files move in, report.html last; files of an earlier report that this one
        # no longer has (a variant's figures) are removed.
        stage.commit([out_dir])
    path = data.composition_report
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(str(path)),
            "summary": dg.MetadataValue.md(summary),
            "variants": ", ".join(done),
            **({"not_clustered": ", ".join(sorted(set(done) - set(clustered)))} if set(done) - set(clustered) else {}),
            "mlflow_run": dg.MetadataValue.url(url),
        }
    )


def _variant_section(context, data: DataDirs, name: str, staged_dir):
    """The report section of one variant: its figures under staged_dir/<name>, or why it was not clustered."""
    from gbm_assets.analysis.cell_labels import clustered_on, skipped_reason
    from gbm_assets.analysis.report import VariantSection
    from gbm_assets.analysis.truth import true_morphotypes
    from gbm_assets.analysis.variant_report import build_section, sample_labels
    from gbm_assets.imaging.pixel_size import coordinates_pixel_sizes
    from gbm_assets.plate_removal import plates_gone

    if not data.labels_file(name).is_file():
        return VariantSection(name, notes=f"Not clustered: {skipped_reason(data.cluster_models(name))}.")
    gone = plates_gone(data.labels_file(name), data.crops)
    if gone:  # its cells include a removed plate's: out of date, and their crops cannot be shown
        context.log.warning(f"report: {name} left out: made with removed plate(s) {', '.join(gone)}")
        return VariantSection(
            name,
            notes=f"Left out: its clusters include plate(s) {', '.join(gone)}, whose crops were removed; "
            f"`gbm-assets run --variants {name}` rebuilds it without them.",
        )
    context.log.info(f"report: {name}")
    labels = sample_labels(data.labels_file(name), 20_000)
    labels["morphotype"] = true_morphotypes(labels, data.raw)
    meta = json.loads(data.cluster_models(name).record.read_text())
    section = build_section(
        name,
        labels,
        data.crops,
        staged_dir / name,
        data.confusion_figures(name),
        auto_k=meta["auto_k"],
        labels_path=data.labels_file(name),
        embeddings_path=data.embeddings_file(name),
        pixel_size_um=coordinates_pixel_sizes(data.coordinates),  # {plate: µm}: areas in µm² when all known
    )
    section.notes = clustered_on(meta)
    if data.explorer_file(name).is_file():
        section.explorer = os.path.relpath(data.explorer_file(name), data.composition_dir)
    return section
