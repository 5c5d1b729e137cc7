"""The input gate's statistics: class means and a shared, shrunk covariance of the training
images' pooled VGG-19 features, and the distance threshold calibrated on validation images."""
from __future__ import annotations

import numpy as np

from xray_edge.contract import Gate

FEATURE = "global average of VGG-19 block5_pool (the class head's pooled input)"


def fit_mahalanobis(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means (C, D) and a whitening matrix W (D, D) with W @ W.T the inverse of the
    Ledoit-Wolf shrunk covariance of the class-centred features."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(x, np.float64)
    means = np.stack([x[y == c].mean(axis=0) for c in range(n_classes)])
    cov = LedoitWolf(assume_centered=True).fit(x - means[y]).covariance_
    return means, np.linalg.cholesky(np.linalg.inv(cov))


def distances(x: np.ndarray, means: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """Smallest squared Mahalanobis distance of each row of ``x`` to a class mean (as the graph's
    ``ood_distance`` output computes it)."""
    z = (np.asarray(x, np.float64) @ whiten)[:, None, :] - (means @ whiten)[None]
    return (z * z).sum(axis=-1).min(axis=1)


def calibrate(val_distances: np.ndarray, quantile: float) -> Gate:
    """The gate whose threshold is the ``quantile`` of the validation images' distances."""
    threshold = float(np.quantile(val_distances, quantile))
    return Gate(threshold=threshold, quantile=quantile, feature=FEATURE,
                val_rejection_rate=float(np.mean(val_distances > threshold)))
