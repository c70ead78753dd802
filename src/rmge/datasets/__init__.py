"""Demo and synthetic datasets with known cell types."""

from ._demo import PBMC_CELL_TYPE_ORDER, PBMC_CELL_TYPES, pbmc_counts, simulated_stereo_seq, synthetic

__all__ = ["pbmc_counts", "simulated_stereo_seq", "synthetic", "PBMC_CELL_TYPES", "PBMC_CELL_TYPE_ORDER"]
