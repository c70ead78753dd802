"""Plotting: spatial label and confidence maps, confusion matrices, metagenes and training history."""

from ._plots import confusion_matrix, history, metagenes, save_figure, spatial_confidence, spatial_labels

__all__ = ["spatial_labels", "spatial_confidence", "confusion_matrix", "metagenes", "history", "save_figure"]
