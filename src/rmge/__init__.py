"""rmge: Robust MetaGene Extractor for label transfer to sparse spatial transcriptomics."""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, pl, pp, tl
from ._constants import REGISTRY_KEYS
from .model import RMGEModel, RMGEModule

try:
    __version__ = version("rmge")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

__all__ = ["RMGEModel", "RMGEModule", "REGISTRY_KEYS", "datasets", "io", "pl", "pp", "tl", "__version__"]
