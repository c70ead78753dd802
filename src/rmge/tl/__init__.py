"""Tools: metrics of a label transfer."""

from ._metrics import expected_calibration_error, transfer_metrics

__all__ = ["expected_calibration_error", "transfer_metrics"]
