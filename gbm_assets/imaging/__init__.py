"""Pure image handling: reading, plate layout, synthetic plates, cell finding, crops (no Dagster)."""
