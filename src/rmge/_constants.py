"""Constants shared across rmge: registry keys, default names and value-kind labels."""

from __future__ import annotations

from typing import NamedTuple


class _RegistryKeys(NamedTuple):
    X_KEY: str = "X"
    LABELS_KEY: str = "labels"
    DOMAIN_KEY: str = "domain"
    BATCH_KEY: str = "batch"
    INDICES_KEY: str = "ind_x"


REGISTRY_KEYS = _RegistryKeys()

#: Default name of the domain column written by :func:`rmge.pp.prepare`.
DOMAIN_KEY = "domain"
#: Default values of the domain column.
REFERENCE_DOMAIN = "reference"
SPATIAL_DOMAIN = "spatial"
#: Layer in which :func:`rmge.pp.prepare` keeps counts.
COUNTS_LAYER = "counts"
#: Label given to cells that fit no reference type.
UNKNOWN_LABEL = "Unknown"

#: Kinds of values a matrix can hold, as told by :func:`rmge.pp.detect_value_kind`.
COUNTS = "counts"
NORMALIZED = "normalized"
LOG_NORMALIZED = "log_normalized"
