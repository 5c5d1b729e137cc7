"""xray-edge: chest X-ray screening (COVID-19 / normal / viral pneumonia) on cheap hardware.

Research screening aid only, not a diagnostic device.
"""
import os

# onnxruntime reads this once, when it is first imported (by the runtime, training, export or
# the benchmark): no telemetry uploader, device id or event queue under ~/.cache. See session.py.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.3.0"
