"""Partitions: one dynamic partition per plate found under data/raw/."""

import dagster as dg

plates = dg.DynamicPartitionsDefinition(name="plates")
