"""Pure analysis: evaluation, clustering, figures, reports (no Dagster)."""
