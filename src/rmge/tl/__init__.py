"""Tools: metrics of a label transfer, cell pairing, feature transfer and spatial smoothing."""

from ._mapping import CellPairing, map_cells, transfer_features, transfer_obs
from ._metrics import expected_calibration_error, transfer_metrics
from ._smoothing import smooth_probabilities, spatial_neighbors

__all__ = [
    "expected_calibration_error",
    "transfer_metrics",
    "CellPairing",
    "map_cells",
    "transfer_features",
    "transfer_obs",
    "smooth_probabilities",
    "spatial_neighbors",
]
