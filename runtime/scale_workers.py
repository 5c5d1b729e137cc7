"""What runs inside the Ray workers of ``classify --ray``: decoding a chunk of files (a CPU task)
and classifying it (an actor holding one model session). Both use the runtime's own code
(``pipeline.prepare``, ``pipeline.run_batch``, ``classify.row_for``), so a row made here is the
row ``classify`` makes on one machine. Neither raises for a file: every failure becomes that
file's error row, so only a dying process makes Ray retry a chunk.

A chunk travels as one dataset row: ``{"chunk": name, "paths": [bytes, ...]}`` ->
``{"chunk": name, "prepared": pickled [Prepared, ...]}`` -> ``{"chunk": name, "rows": JSON lines}``.
Paths are bytes and rows ASCII JSON, so any Linux file name passes through Arrow unchanged.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .classify import open_model, row_for
from .contract import ModelContractError, Preprocessing
from .pipeline import Prepared, Result, prepare, run_batch
from .results import make_row


def node_address() -> str:
    """This node's address in the Ray cluster (for reasons that name where something failed)."""
    import ray

    return ray.util.get_node_ip_address()


def prepare_chunk(row: dict[str, Any], spec: Preprocessing, max_pixels: int) -> dict[str, Any]:
    """Decode and preprocess a chunk's files. A file this node cannot find says so, naming the
    node: the driver listed it, so the storage is not the same on every node."""
    prepared = [prepare(os.fsdecode(p), spec, max_pixels) for p in row["paths"]]
    for p in prepared:
        if p.image is None and not os.path.lexists(p.path):
            p.error = (f"{p.error} on Ray node {node_address()} (every node must see the files at the paths "
                       "the driver lists)")
    return {"chunk": row["chunk"], "prepared": pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL)}


class ChunkClassifier:
    """A Ray Data actor: the model opened once, with every check ``classify`` makes
    (``open_model``) and the same file as the driver's (sha256), then chunks of prepared files
    through it in ``batch_size`` batches, as ``classify`` batches them."""

    def __init__(self, model_args: dict[str, Any], threads: int, sha256: str, batch_size: int,
                 heatmaps: tuple[str, str] | None = None):
        """``model_args``: ``open_model``'s arguments as ``classify`` gave them (paths absolute);
        ``heatmaps``: (folder to write into, the folder as the user named it) or None."""
        try:
            self.model = open_model(**model_args, threads=threads)
        except ModelContractError as e:
            raise ModelContractError(f"{e} (on Ray node {node_address()})") from None
        if self.model.sha256 != sha256:
            raise ModelContractError(f"{self.model.path} on Ray node {node_address()} has sha256 "
                                     f"{self.model.sha256[:12]}..., the driver's model {sha256[:12]}...: "
                                     "install the same model on every node")
        self.batch_size = batch_size
        self.heatmaps = heatmaps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        return {"chunk": list(batch["chunk"]), "rows": [self.rows(blob) for blob in batch["prepared"]]}

    def rows(self, blob: bytes) -> str:
        """The chunk's results rows as JSON lines, in the chunk's order."""
        prepared: list[Prepared] = pickle.loads(blob)
        rows = []
        for start in range(0, len(prepared), self.batch_size):
            batch = prepared[start:start + self.batch_size]
            try:
                rows += [self.row(r) for r in run_batch(self.model, batch, cam=self.heatmaps is not None)]
            except Exception as e:  # a bug or a full disk must not cost the other chunks
                failure = f"cannot classify on Ray node {node_address()} ({type(e).__name__}: {str(e)[:200]})"
                rows += [make_row(Result(p.path, None, failure, p.ms), self.model, None) for p in batch]
        return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows)

    def row(self, result: Result) -> dict[str, Any]:
        if self.heatmaps is None:
            return row_for(result, self.model)
        folder, named = self.heatmaps
        row = row_for(result, self.model, Path(folder))
        if row["heatmap"]:  # the name as classify writes it, from the folder as the user named it
            row["heatmap"] = str(Path(named) / os.path.basename(row["heatmap"]))
        return row
