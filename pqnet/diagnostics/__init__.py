"""Diagnostics of posteriors and quantized networks."""

from .metrics import classification_metrics, entropy, expected_calibration_error

__all__ = ["classification_metrics", "entropy", "expected_calibration_error"]
