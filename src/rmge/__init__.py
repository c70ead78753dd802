"""rmge: Robust MetaGene Extractor for label transfer to sparse spatial transcriptomics."""

from importlib.metadata import PackageNotFoundError, version

# scvi-tools (1.4.2 and earlier) prints set-up arguments with `rich.pretty.pprint` in
# `view_anndata_setup` and `view_setup_args` but imports only `rich.table`, which recent rich
# releases no longer make import `rich.pretty`; importing it here keeps those methods working.
import rich.pretty  # noqa: F401

from . import datasets, io, pl, pp, tl
from ._constants import REGISTRY_KEYS
from .model import RMGEModel, RMGEModule

try:
    __version__ = version("rmge")
except PackageNotFoundError:  # pragma: no cover - source tree without installation
    __version__ = "0.0.0"

__all__ = ["RMGEModel", "RMGEModule", "REGISTRY_KEYS", "datasets", "io", "pl", "pp", "tl", "__version__"]
