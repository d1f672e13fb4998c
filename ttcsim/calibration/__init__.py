"""Calibration: fitting profile parameters to measured traces and run records."""
