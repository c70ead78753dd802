"""Tools: metrics of a label transfer and of the alignment, results for scanpy, cell pairing, smoothing."""

from ._alignment import alignment_metrics
from ._mapping import CellPairing, map_cells, transfer_features, transfer_obs
from ._metrics import expected_calibration_error, transfer_metrics
from ._results import add_results
from ._smoothing import smooth_probabilities, spatial_neighbors

__all__ = [
    "add_results",
    "alignment_metrics",
    "expected_calibration_error",
    "transfer_metrics",
    "CellPairing",
    "map_cells",
    "transfer_features",
    "transfer_obs",
    "smooth_probabilities",
    "spatial_neighbors",
]
