"""Scoring cell detections against ground truth: point-in-mask and within-distance matching.

Both give the same dict (tp, fp, fn, precision, recall, f1) so that real frames with instance
masks and synthetic plates with known centres can be compared on one scale.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist


def _summary(tp: int, n_detected: int, n_truth: int) -> dict:
    fp, fn = n_detected - tp, n_truth - tp
    precision = tp / n_detected if n_detected else 0.0
    recall = tp / n_truth if n_truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def _as_points(xy) -> np.ndarray:
    return np.asarray(xy, dtype=float).reshape(-1, 2)


def score_point_in_mask(detections_xy, truth_labels: np.ndarray) -> dict:
    """Score detected centres (x, y) against an instance label image.

    A detection is a true positive when it falls inside a labelled cell that no earlier
    detection has claimed; a second detection in the same cell (over-splitting) is a false
    positive, as is one on background. Cells no detection claims are misses.
    """
    points = _as_points(detections_xy)
    truth_labels = np.asarray(truth_labels)
    n_truth = int(np.count_nonzero(np.unique(truth_labels)))
    h, w = truth_labels.shape
    cols = np.rint(points[:, 0]).astype(int)
    rows = np.rint(points[:, 1]).astype(int)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    hit = truth_labels[rows[inside], cols[inside]]
    tp = int(np.count_nonzero(np.unique(hit[hit != 0])))
    return _summary(tp, len(points), n_truth)


def score_within_distance(detections_xy, truth_xy, max_dist: float = 8.0) -> dict:
    """Score detected centres against true centres with one-to-one matching within max_dist.

    Matching is optimal (Hungarian) rather than greedy, so a detection never takes a truth
    that another detection needs to be matched at all.
    """
    detected, truth = _as_points(detections_xy), _as_points(truth_xy)
    if len(detected) == 0 or len(truth) == 0:
        return _summary(0, len(detected), len(truth))
    distance = cdist(detected, truth)
    # A forbidden pair costs more than any set of allowed matches, so the assignment first
    # maximises the number of matches within max_dist, then minimises their total distance.
    forbidden = max_dist * (min(distance.shape) + 1) + 1.0
    cost = np.where(distance <= max_dist, distance, forbidden)
    rows, cols = linear_sum_assignment(cost)
    tp = int(np.count_nonzero(distance[rows, cols] <= max_dist))
    return _summary(tp, len(detected), len(truth))
