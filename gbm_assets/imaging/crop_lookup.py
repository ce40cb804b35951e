"""Kept for existing imports: crops by crop_id come from gbm_assets.imaging.crop_dataset.read_crops."""

from gbm_assets.imaging.crop_dataset import read_crops

__all__ = ["read_crops"]
