"""From image files to model outputs: decode + preprocess in a thread pool, running ahead of
inference (OpenCV and onnxruntime release the GIL), then batched through the model.

    for results in classify_paths(model, paths, batch_size=8):
        ...  # one list of Result per batch, in input order; bad files come back as errors

``prepared_batches`` is the decode half on its own (used by the benchmark to time it);
``prepare`` (one file) and ``run_batch`` (one batch through the model) are the two halves that
``classify --ray`` runs as separate Ray stages.
"""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .contract import Preprocessing
from .decode import DEFAULT_MAX_PIXELS, DecodeError, read_grey
from .lungs import finder_for
from .preprocess import min_decoded_side, preprocess
from .session import LoadedModel, predict

NO_LUNGS = "the lung crop found no lung fields: the whole image was classified"
PREFETCH_BATCHES = 2  # batches decoded ahead of the one being run through the model


@dataclass
class Prepared:
    """One file made ready for the model, or the reason it could not be."""

    path: str
    image: np.ndarray | None  # (S, S, 1) float32 model input; None on error
    error: str  # "" when ok
    ms: float  # decode + preprocess wall time
    note: str = ""  # what the preprocessing could not do as the recipe intends (NO_LUNGS), else ""
    lung_box: tuple[int, int, int, int] | None = None  # the lung crop's box in the decoded image, if one was found


@dataclass
class Result:
    """One file's outcome: the model's outputs for it, or the reason it failed."""

    path: str
    probs: np.ndarray | None  # (C,) float64; None on error
    error: str  # "" when ok
    ms: float  # decode + preprocess + this file's share of its batch's inference time
    age: np.ndarray | None = None  # (len(AGE_GROUPS),) age-group probabilities, if the model has them
    ood: float | None = None  # gate distance, if the model has one
    cam: np.ndarray | None = None  # (h, w, C) Grad-CAM maps, when asked for
    image: np.ndarray | None = None  # the (S, S, 1) model input, when the maps were asked for
    note: str = ""  # Prepared.note

    @property
    def ok(self) -> bool:
        return self.probs is not None


def default_workers() -> int:
    """Decoding threads: one per core up to 2, then half the cores, at most 4 (onnxruntime's
    threads, one per physical core by default, take every core while a batch runs; decoding
    shares them).

    Measured on a 2-core x86-64 machine busy with other work (this process got about one core),
    2 threads against 1, medians of 5 interleaved rounds: where decoding set the pace (a tiny
    model), images/s x1.07 for 2500x2500 16-bit PNG, x1.40 for 3000x3000 DICOM, x1.19 for
    3000x3000 JPEG, x0.97 for JPEG 2000 DICOM (its decoder holds Python's lock); a third thread
    added nothing sure (medians x1.01-1.11 against 1). Where the shipped model set the pace
    (it did on that machine) the ratios were 0.94-1.06 for those and 224x224 PNG, in two runs:
    nothing lost. Half the cores on larger machines is not measured."""
    cores = os.cpu_count() or 2
    return min(4, max(min(cores, 2), cores // 2))


def prepare(path: str | os.PathLike, spec: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prepared:
    """Decode (large JPEG and JPEG 2000 at a reduced resolution) and preprocess one file; never
    raises (a recipe's lung model that cannot be loaded is refused earlier, by
    ``session.load_model``)."""
    start = time.perf_counter()
    boxes: list[tuple[int, int, int, int] | None] = []  # the lung box found, kept for the note

    def lung_box(grey: np.ndarray) -> tuple[int, int, int, int] | None:
        boxes.append(find(grey))
        return boxes[-1]

    try:
        find = finder_for(spec)
        grey, reduction = read_grey(path, max_pixels, min_decoded_side(spec))
        image = preprocess(grey, spec, reduction, lung_box if find else None)
        error = ""
    except DecodeError as e:
        image, error = None, str(e)
    except MemoryError:
        image, error = None, "out of memory while decoding"
    except Exception as e:  # a decoder bug must not stop the batch
        image, error = None, f"cannot decode ({type(e).__name__}: {e})"
    note = NO_LUNGS if image is not None and boxes == [None] else ""
    return Prepared(str(path), image, error, (time.perf_counter() - start) * 1000, note, boxes[0] if boxes else None)


def prepared_batches(paths: Iterable[str | os.PathLike], spec: Preprocessing, batch_size: int = 8,
                     workers: int | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[list[Prepared]]:
    """Yield lists of up to ``batch_size`` Prepared items in input order, while the next
    ``PREFETCH_BATCHES`` batches are already being decoded by ``workers`` threads."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    todo = iter(paths)
    window: deque[Future[Prepared]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="xray-edge-decode")
    try:
        def fill() -> None:
            while len(window) < batch_size * (PREFETCH_BATCHES + 1):
                path = next(todo, None)
                if path is None:
                    return
                window.append(pool.submit(prepare, path, spec, max_pixels))

        fill()
        while window:
            batch = [window.popleft().result() for _ in range(min(batch_size, len(window)))]
            fill()  # keep decoding while the caller runs this batch through the model
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def classify_paths(model: LoadedModel, paths: Iterable[str | os.PathLike], batch_size: int = 8,
                   workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                   cam: bool = False) -> Iterator[list[Result]]:
    """Yield one list of Result per batch, in input order. With ``cam`` each result also carries
    its Grad-CAM maps and model input (for heatmaps). A batch the model fails on comes back as
    error results; the run goes on."""
    for batch in prepared_batches(paths, model.record.preprocessing, batch_size, workers, max_pixels):
        yield run_batch(model, batch, cam)


def run_batch(model: LoadedModel, batch: list[Prepared], cam: bool = False) -> list[Result]:
    """One batch of prepared files through the model (one inference call for those that
    decoded), as Results in the batch's order; an inference failure becomes error results."""
    ready = [p for p in batch if p.image is not None]
    out, failure, share = None, "", 0.0
    if ready:
        start = time.perf_counter()
        try:
            out = predict(model, np.stack([p.image for p in ready]), cam=cam)
        except Exception as e:
            failure = f"inference failed ({type(e).__name__}: {str(e).strip()[:200]})"
        share = (time.perf_counter() - start) * 1000 / len(ready)
    results, k = [], 0
    for p in batch:
        if p.image is None:
            results.append(Result(p.path, None, p.error, p.ms))
        elif out is None:
            results.append(Result(p.path, None, failure, p.ms + share))
        else:
            results.append(Result(p.path, out.probs[k], "", p.ms + share,
                                  age=None if out.age is None else out.age[k],
                                  ood=None if out.ood is None else float(out.ood[k]),
                                  cam=None if out.cam is None else out.cam[k], image=p.image if cam else None,
                                  note=p.note))
            k += 1
    return results
