"""gbm-assets: unsupervised morphology of glioblastoma cells from phase-contrast images."""

__version__ = "0.1.0"
