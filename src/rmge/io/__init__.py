"""Readers of spatial transcriptomics output files."""

from ._stereo import read_gef, read_gem, read_stereo_seq

__all__ = ["read_stereo_seq", "read_gem", "read_gef"]
