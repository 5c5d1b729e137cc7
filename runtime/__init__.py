"""xray-edge: chest X-ray screening (COVID-19 / normal / viral pneumonia) on cheap hardware.

Research screening aid only, not a diagnostic device.
"""
__version__ = "0.1.0"
