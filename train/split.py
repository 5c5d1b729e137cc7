"""Honest splits: exact duplicates, near-duplicates and same-patient images are grouped (connected
components) and every group lands in exactly one split (stratified group split).

Near-duplicates: a 64-bit DCT perceptual hash shortlists pairs (Hamming distance <= a threshold);
the normalised cross-correlation (NCC) of 64x64 thumbnails confirms them. On chest X-rays pHash
alone is not specific: all radiographs share the same low-frequency layout, so on the CXR3 set
distance <= 4 already pairs 39 images of different classes, while NCC >= 0.95 keeps only
follow-up-like pairs (different radiographs of one set stay below 0.97)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

_PERSON = re.compile(r"^person(\d+)_", re.IGNORECASE)  # Kermany: person<N>_virus_<M>
_STUDY = re.compile(r"^((?:NORMAL2-)?IM)-(\d+)-", re.IGNORECASE)  # Kermany normals: IM-<N>-0001[-000k]


def phash_bits(grey: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hash: 32x32 area resize, 2-D DCT, lowest 8x8 frequencies > their median."""
    small = cv2.resize(grey.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].ravel()
    return low > np.median(low)


def thumbnail(grey: np.ndarray) -> np.ndarray:
    """64x64 area-resized image, zero mean and unit norm (dot product of two = their NCC)."""
    t = cv2.resize(grey.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA).ravel()
    t -= t.mean()
    norm = np.linalg.norm(t)
    return t / norm if norm > 0 else t


def hamming_pairs(bits: np.ndarray, threshold: int, chunk: int = 2048) -> np.ndarray:
    """All pairs (i < j) whose hashes differ in at most ``threshold`` bits, as an (M, 2) array."""
    b = bits.astype(np.float32)
    nb = 1.0 - b
    pairs = []
    for start in range(0, len(b), chunk):
        d = b[start:start + chunk] @ nb.T + nb[start:start + chunk] @ b.T
        i, j = np.nonzero(d <= threshold + 0.5)
        i += start
        keep = i < j
        pairs.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=int)


def patient_key(path: str) -> str | None:
    """Patient/study id where the file name carries one (Kermany ``person<N>_``, ``[NORMAL2-]IM-<N>-``)."""
    name = Path(path).name
    if m := _PERSON.match(name):
        return f"person{int(m[1])}"
    if m := _STUDY.match(name):
        return f"{m[1].upper()}-{int(m[2])}"
    return None


def _same_key_links(keys: Sequence[str | None]) -> np.ndarray:
    """(first index, index) for every later item sharing a non-None key with an earlier one."""
    first: dict[str, int] = {}
    links = []
    for i, k in enumerate(keys):
        if k is None:
            continue
        if k in first:
            links.append((first[k], i))
        else:
            first[k] = i
    return np.array(links, dtype=int).reshape(-1, 2)


def near_duplicates(bits: np.ndarray, thumbs: np.ndarray, hamming: int, ncc: float) -> tuple[np.ndarray, int]:
    """Pairs within ``hamming`` pHash bits whose thumbnail NCC is >= ``ncc``; also the shortlist size."""
    pairs = hamming_pairs(bits, hamming)
    scores = np.einsum("ij,ij->i", thumbs[pairs[:, 0]], thumbs[pairs[:, 1]])
    return pairs[scores >= ncc], len(pairs)


def group_images(paths: Sequence[str], pixel_hashes: Sequence[str], bits: np.ndarray, thumbs: np.ndarray,
                 hamming: int, ncc: float, given: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, Any]]:
    """Group ids (connected components over exact-pixel, near-duplicate, same-patient and
    ``given`` links: images sharing a non-empty given group, e.g. a study id from the data's
    manifest) and statistics on the links found."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(paths)
    near, shortlisted = near_duplicates(bits, thumbs, hamming, ncc)
    exact = _same_key_links(list(pixel_hashes))
    patient = _same_key_links([patient_key(p) for p in paths])
    manifest = _same_key_links([g or None for g in given] if len(given) else [None] * n)
    e = np.concatenate([near, exact, patient, manifest])
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
    _, groups = connected_components(graph, directed=False)
    sizes = np.bincount(groups)
    stats = {
        "phash_hamming_threshold": hamming,
        "phash_shortlisted_pairs": shortlisted,
        "ncc_threshold": ncc,
        "exact_duplicate_links": len(exact),
        "near_duplicate_pairs": len(near),
        "same_patient_links": len(patient),
        "manifest_group_links": len(manifest),
        "groups": int(len(sizes)),
        "images_in_multi_image_groups": int(sizes[sizes > 1].sum()),
        "largest_group": int(sizes.max()),
    }
    return groups, stats


def stratified_group_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float,
                           val_fraction: float, seed: int) -> np.ndarray:
    """'train'/'val'/'test' per image, stratified by ``labels`` (pass class x origin strata to
    keep every origin's share of every class). Test is one fold of StratifiedGroupKFold with
    round(1/test_fraction) folds; validation is one fold of the rest with
    round((1 - test share) / val_fraction) folds (val_fraction is a share of the whole set)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_test = max(2, round(1 / test_fraction))
    n_val = max(2, round((1 - 1 / n_test) / val_fraction))
    split = np.full(len(labels), "train", dtype=object)
    x = np.zeros(len(labels))
    try:
        rest, test = next(StratifiedGroupKFold(n_test, shuffle=True, random_state=seed).split(x, labels, groups))
        tr, va = next(StratifiedGroupKFold(n_val, shuffle=True, random_state=seed).split(
            x[rest], labels[rest], groups[rest]))
    except ValueError as e:
        raise ValueError(f"cannot split the dataset into train/val/test groups ({e})") from None
    split[test] = "test"
    split[rest[va]] = "val"
    return split
