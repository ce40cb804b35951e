"""Partitions: one dynamic partition per plate found under data/raw/, one static per model variant."""

import dagster as dg

from gbm_assets.models.variants import variant_names

plates = dg.DynamicPartitionsDefinition(name="plates")
variants = dg.StaticPartitionsDefinition(variant_names())
