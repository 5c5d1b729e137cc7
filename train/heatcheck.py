"""Does the heatmap point at the lungs? The share of the Grad-CAM heat of the most likely class that
falls inside the lung fields the shipped lung model finds on the model's own input, per image.

Heat on the lungs is what a reader expects; heat on a side marker, the film's edge or the abdomen
says the label rests on something else. Fine-tuning makes the heatmap layer (block5_conv4) a
trained layer, so this is measured for every trained model (``metrics.json``: ``heat_in_lungs``).
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from xray_edge.recipe import LungCrop
from xray_edge.lungs import lung_mask, model_input, probabilities


def heat_in_lungs(model: Any, x: np.ndarray, lungs: LungCrop, batch_size: int = 16) -> dict[str, Any]:
    """Median and quartiles over images ``x`` (N, S, S, 1) of the share of the most likely class's
    Grad-CAM heat inside the lung mask (resized to the heatmap), and the share of the image the
    mask covers (what a heatmap spread evenly would score)."""
    shares, areas = [], []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        out = model.predict(batch, verbose=0)
        cams, logits = np.asarray(out["cam"], np.float64), np.asarray(out["logits"])
        probs = probabilities(lungs, np.stack([model_input(im[..., 0], lungs.size) for im in batch]))
        for cam, k, p in zip(cams, logits.argmax(axis=1), probs):
            heat = cam[..., k]
            mask = cv2.resize(lung_mask(p, lungs.threshold).astype(np.uint8), heat.shape[::-1],
                              interpolation=cv2.INTER_AREA).astype(np.float64)
            total = heat.sum()
            if total > 0:
                shares.append(float((heat * mask).sum() / total))
                areas.append(float(mask.mean()))
    q = np.percentile(shares, [25, 50, 75]) if shares else [None] * 3
    return {"images": len(shares), "heat_in_lungs_quartiles": [None if v is None else float(v) for v in q],
            "lung_area_median": float(np.median(areas)) if areas else None,
            "note": "share of the most likely class's Grad-CAM heat inside the lung mask of the model input"}
