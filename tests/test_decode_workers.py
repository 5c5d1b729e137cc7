"""The default number of decoding threads follows the core count (rule and measurements in
pipeline.default_workers)."""
import os

import pytest

from xray_edge.pipeline import default_workers


@pytest.mark.parametrize("cores, workers", [(None, 2), (1, 1), (2, 2), (3, 2), (4, 2), (6, 3), (8, 4), (64, 4)])
def test_default_workers_by_core_count(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_workers() == workers
