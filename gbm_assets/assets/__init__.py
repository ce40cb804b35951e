"""The thin Dagster layer: partitions, resources, assets, checks and sensors. Logic lives in the pure core."""
