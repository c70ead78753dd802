"""Preprocessing: combine a reference and a spatial dataset, gene activity from peaks."""

from rmge._validation import detect_value_kind

from ._gene_activity import gene_activity
from ._prepare import prepare

__all__ = ["prepare", "gene_activity", "detect_value_kind"]
