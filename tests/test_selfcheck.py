"""Same answer on every CPU: every int8 weight of the shipped models is in the range where
onnxruntime's AVX2 kernels cannot saturate, and this CPU gives the shipped models' pinned outputs on
the fixed inputs (a saturating or otherwise drifting kernel fails here, on whatever CPU CI runs)."""
import copy
import json
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest

from xray_edge import selfcheck
from xray_edge.export.quantize import AVX2_SAFE_WEIGHT, int8_weight_ranges

SHIPPED = sorted(Path(str(resources.files("xray_edge.models"))).glob("*.onnx"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_int8_weight_is_in_the_avx2_safe_range(path):
    ranges = int8_weight_ranges(onnx.load(str(path)))
    assert ranges, f"{path.name}: no int8 weights found"
    wide = {name: v for name, v in ranges.items() if v > AVX2_SAFE_WEIGHT}
    assert not wide, f"{path.name}: int8 weights beyond +-{AVX2_SAFE_WEIGHT} saturate on AVX2-only CPUs: {wide}"


def test_this_cpu_gives_the_pinned_outputs_of_the_shipped_models():
    pinned = json.loads(selfcheck.pins_path().read_text())
    assert selfcheck.compare(pinned, selfcheck.outputs()) == []


def test_the_fixed_inputs_are_the_same_bits_every_time():
    a, b = selfcheck.fixed_inputs(64), selfcheck.fixed_inputs(64)
    assert a.dtype == np.float32 and a.shape == (selfcheck.N_INPUTS, 64, 64, 1) and np.array_equal(a, b)
    assert 0 <= a.min() and a.max() <= 1 and a.std() > 0.1


def test_a_drift_is_reported():
    here = selfcheck.outputs()
    drifted = copy.deepcopy(here)
    drifted["logits"] = (np.asarray(here["logits"]) * 1.01).tolist()
    mask = bytearray(bytes.fromhex(here["lung_mask"][0]))
    mask[100] ^= 0xFF  # 8 pixels flipped
    drifted["lung_mask"][0] = bytes(mask).hex()
    problems = selfcheck.compare(here, drifted)
    assert any(p.startswith("logits:") for p in problems) and any(p.startswith("lung mask: 8 pixels") for p in problems)
    assert selfcheck.compare(here, here) == []
    assert "other model files" in selfcheck.compare(here | {"sha256": "0" * 64}, here)[0]
